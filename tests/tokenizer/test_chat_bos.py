"""The llama3 chat template against transformers' apply_chat_template with Meta's own Jinja, and the BOS rule
at the places that encode prompts (chat render, engine, log-likelihood scoring), on tokenizers trained here."""

from __future__ import annotations

import pytest
import torch

from llamalab.tokenizer import load_folder_tokenizer
from llamalab.tokenizer.templates import LLAMA3_JINJA, render, render_text, stop_token_ids
from tests.tokenizer.cases import CHATML_SPECIALS, L3_SPECIALS, hf_folder, train_bpe

transformers = pytest.importorskip("transformers")

# tokenizer_config.json "chat_template" of meta-llama/Meta-Llama-3-8B-Instruct, verbatim (JSON-decoded)
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# the ChatML of SmolLM2's GGUF (tokenizer.chat_template) for conversations with a system message
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")

CONVS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "  padded system \n"}, {"role": "user", "content": "\n\n  spaces around  \t"},
     {"role": "assistant", "content": " Four. "}, {"role": "user", "content": "日本語で? 🦙 <|eot_id|> inside"}],
    [{"role": "user", "content": "def f(x):\n    return x\n"}, {"role": "assistant", "content": "Looks fine.\n"}],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def l3(tmp_path_factory):
    folder = hf_folder(tmp_path_factory.mktemp("l3"), train_bpe("llama3", L3_SPECIALS, 500),
                       {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|begin_of_text|>")
    return load_folder_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """SmolLM2's layout: BOS id is <|im_start|>, and no BOS is added (no post-processor)."""
    folder = hf_folder(tmp_path_factory.mktemp("chatml"), train_bpe("digits", CHATML_SPECIALS, 500),
                       {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    return load_folder_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _hf_ids(ref, conv, gen, template):
    text = ref.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=gen)
    return text, ref(text, add_special_tokens=False)["input_ids"]  # what apply_chat_template(tokenize=True) does


@pytest.mark.parametrize("gen", [True, False])
def test_llama3_template_renders_as_metas_jinja(l3, gen):
    ours, ref = l3
    assert LLAMA3_JINJA == META_LLAMA3_TEMPLATE
    for conv in CONVS:
        text, want = _hf_ids(ref, conv, gen, META_LLAMA3_TEMPLATE)
        ids, mask = render(conv, "llama3", ours, add_generation_prompt=gen)
        assert ids == want, conv
        assert render_text(conv, "llama3", add_generation_prompt=gen).replace("<s>", "<|begin_of_text|>") == text
        assert len(mask) == len(ids)
        answers = [m["content"].strip() for m in conv if m["role"] == "assistant"]
        eot = ours.piece_to_id("<|eot_id|>")
        trained = [i for i, m in zip(ids, mask) if m]
        assert trained.count(eot) == len(answers)  # each answer's closing <|eot_id|> is trained
        assert ours.decode(trained) == "".join(answers)


def test_llama3_stops_on_its_turn_tokens(l3):
    ours, _ = l3
    eot, eom = ours.piece_to_id("<|eot_id|>"), ours.piece_to_id("<|eom_id|>")
    assert {eot, eom} <= set(stop_token_ids("llama3", ours)) and ours.eos_id not in stop_token_ids("llama3", ours)
    ids, _ = render(CONVS[0], "llama3", ours)
    assert ids[0] == ours.bos_id == ours.piece_to_id("<|begin_of_text|>")


def test_chatml_has_no_extra_bos_when_the_tokenizer_adds_none(chatml):
    ours, ref = chatml
    assert not ours.add_bos and ours.bos_id == ours.piece_to_id("<|im_start|>")
    for conv in CONVS[1:3]:  # with a system message: SmolLM2's template adds no default one
        _, want = _hf_ids(ref, conv, True, CHATML_TEMPLATE)
        ids, _ = render(conv, "chatml", ours, add_generation_prompt=True)
        assert ids == want and ids[:2] != [ours.bos_id, ours.bos_id]
    assert stop_token_ids("chatml", ours) == []  # <|im_end|> is EOS itself here: the engine stops on it


def _engine(tok):
    from llamalab.inference.engine import Engine
    from llamalab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                                    max_seq_len=64)).eval()
    return Engine(model, tok, slots=1)


@pytest.mark.parametrize("which", ["l3", "chatml"])
def test_prompts_follow_the_bos_rule(which, request):
    """Engine prompts (generate, serve text prompts) and log-likelihood contexts start with BOS only when the
    tokenizer adds one."""
    from llamalab.eval.loglik import score_text_pairs

    ours, ref = request.getfixturevalue(which)
    engine = _engine(ours)
    assert engine.encode("Hello world") == ref("Hello world")["input_ids"]
    assert (engine.encode("Hello world")[0] == ours.bos_id) == ours.add_bos
    seen = []

    def logits_fn(x):
        seen.extend(x[:, 0].tolist())
        return torch.zeros(x.shape[0], x.shape[1], ours.vocab_size)

    score_text_pairs(logits_fn, ours, [("Question: 2+2? Answer:", " 4"), ("The sky is", " blue")], max_len=64)
    first = {ref("Question: 2+2? Answer:")["input_ids"][0], ref("The sky is")["input_ids"][0]}
    assert set(seen) == first and (ours.bos_id in seen) == ours.add_bos


def test_gguf_vocabularies_carry_their_bos_rule_and_pre_tokenizer():
    """GGUF: tokenizer.ggml.add_bos_token when present, else llama.cpp's default (SentencePiece and Llama 3's
    pre-tokenizer: BOS; other byte-level ones: none); tokenizer.ggml.pre picks the split (smollm: digits alone)."""
    pytest.importorskip("gguf")
    from llamalab.common import LlamalabError
    from llamalab.interop.gguf import gguf_tokenizer, read_gguf
    from llamalab.tokenizer.bpe import bytes_to_unicode
    from tests.conftest import shared_path

    kv = read_gguf(shared_path("tokenizer/llama_spm/ggml-vocab-llama-spm.gguf")).kv
    assert gguf_tokenizer(kv, "spm").add_bos
    assert not gguf_tokenizer({**kv, "tokenizer.ggml.add_bos_token": False}, "spm").add_bos

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["12", "<|begin_of_text|>"]
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["1 2"],
            "tokenizer.ggml.token_type": [1] * 257 + [3], "tokenizer.ggml.bos_token_id": 257,
            "tokenizer.ggml.eos_token_id": 257}
    llama3 = gguf_tokenizer({**base, "tokenizer.ggml.pre": "llama-bpe"}, "l3")
    assert llama3.add_bos and llama3.encode("x12", bos=llama3.add_bos) == [257, ord("x"), 256]
    assert not gguf_tokenizer({**base, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": False},
                              "l3").add_bos
    gpt2 = gguf_tokenizer({**base, "tokenizer.ggml.pre": "gpt2"}, "gpt2")
    smol = gguf_tokenizer({**base, "tokenizer.ggml.pre": "smollm"}, "smol")
    assert not gpt2.add_bos and gpt2.encode("12") == [256] and smol.encode("12") == [ord("1"), ord("2")]
    assert gpt2.encode("a<|begin_of_text|>") == [ord("a"), 257]  # control tokens match whole
    with pytest.raises(LlamalabError, match="tokenizer.ggml.pre='qwen9' is not supported"):
        gguf_tokenizer({**base, "tokenizer.ggml.pre": "qwen9"}, "q")
