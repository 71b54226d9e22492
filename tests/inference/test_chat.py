"""Chat templates (shared with SFT), the terminal chat loop and the generate command."""

from __future__ import annotations

import io

import pytest

from llamalab.common import LlamalabError
from llamalab.tokenizer.templates import TEMPLATES, render, render_text, resolve_template

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"}]


def test_llama2_matches_meta_chat_completion(llama_tok):
    ids, mask = render(CONV, "llama2", llama_tok, add_generation_prompt=True)
    meta = (llama_tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? ",
                             bos=True, eos=True) + llama_tok.encode("[INST] 2+2? [/INST]", bos=True))
    assert ids == meta
    assert llama_tok.decode([i for i, m in zip(ids, mask) if m]).strip() == "Hello! How can I help?"
    assert ids[[k for k, m in enumerate(mask) if m][-1]] == llama_tok.eos_id  # EOS closing the turn is trained


@pytest.mark.parametrize("template", TEMPLATES)
def test_loss_mask_covers_exactly_the_answers(llama_tok, template):
    conv = CONV[:3] + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No more."}]
    ids, mask = render(conv, template, llama_tok, add_generation_prompt=False)
    assert len(ids) == len(mask)
    answer = llama_tok.decode([i for i, m in zip(ids, mask) if m and i != llama_tok.eos_id])
    assert "Hello! How can I help?" in answer and "No more." in answer
    assert "Hi there" not in answer and "Be brief" not in answer
    text = render_text(conv, template, add_generation_prompt=False)
    assert "Be brief." in text and "No more." in text
    gen = render_text(CONV, template, add_generation_prompt=True)
    assert gen.rstrip().endswith(("[/INST]", "ASSISTANT:", "### Response:", "<|im_start|>assistant",
                                  "<|start_header_id|>assistant<|end_header_id|>"))


def test_bad_conversations_name_the_message():
    with pytest.raises(LlamalabError, match=r"messages\[1\].role"):
        render_text([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "llama2")
    with pytest.raises(LlamalabError, match=r"messages\[0\].content"):
        render_text([{"role": "user", "content": 3}], "llama2")
    with pytest.raises(LlamalabError, match="unknown template"):
        render_text([{"role": "user", "content": "a"}], "nope")


def test_template_travels_with_metadata_and_can_be_overridden():
    assert resolve_template({"chat_template": "chatml"}) == "chatml"
    assert resolve_template({"chat_template": "chatml"}, "vicuna") == "vicuna"
    assert resolve_template({}) == "llama2"
    with pytest.raises(LlamalabError, match="--chat-template"):
        resolve_template({}, "bogus")


def test_terminal_chat_keeps_the_conversation(model_folder):
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams
    from llamalab.inference.terminal import repl

    engine = Engine.from_folder(model_folder, slots=1)
    out = io.StringIO()
    seen = []
    orig = engine.add

    def spy(ids, params=None, request_id=None):
        seen.append(list(ids))
        return orig(ids, params, request_id)

    engine.add = spy
    turns = repl(engine, "llama2", SamplingParams(max_tokens=8, temperature=0), "Be brief.",
                 ["hello", "/system Be kind.", "and again", "/reset", "fresh", "/quit", "never"], out)
    assert turns == 3
    tok = engine.tokenizer
    assert "<<SYS>>\nBe brief." in tok.decode(seen[0])
    second = tok.decode(seen[1])
    assert "Be kind." in second and "hello" in second and "and again" in second  # history kept
    assert "and again" not in tok.decode(seen[2])  # /reset
    assert out.getvalue().count("assistant: ") == 3


def test_generate_command(model_folder, tmp_path, capsys):
    from llamalab.cli import main

    assert main(["generate", str(model_folder), "--prompt", "Once upon a time", "--max-tokens", "8",
                 "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Once upon a time") and "8 new tokens" in cap.err
    f = tmp_path / "p.txt"
    f.write_text("Hello\nThe sky is\n")
    assert main(["generate", str(model_folder), "--prompts-file", str(f), "--max-tokens", "5",
                 "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.count("=== ") == 2
    assert main(["generate", str(model_folder), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


CONVERSATIONS = [
    CONV,
    CONV[1:],  # no system prompt
    CONV[:3],  # ends with an answer
    [{"role": "user", "content": "  padded  "}],
    CONV[:3] + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No more."}],
]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("gen", [True, False])
def test_hf_jinja_template_renders_like_ours(template, gen):
    """The Jinja written into an HF export renders every conversation exactly like render_text."""
    pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from llamalab.tokenizer.templates import hf_chat_template

    # the environment transformers' apply_chat_template uses
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    tpl = env.from_string(hf_chat_template(template))
    for conv in CONVERSATIONS:
        if not gen and conv[-1]["role"] == "assistant":
            continue
        ours = render_text(conv, template, add_generation_prompt=gen)
        theirs = tpl.render(messages=conv, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
        assert theirs == ours, (template, gen, conv)
