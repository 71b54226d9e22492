"""Exports keep the tokenizer and the chat template, for every tokenizer kind (SentencePiece; byte-level BPE in
SmolLM2's and Llama 3's shapes), checked against the tools that read them: transformers (AutoTokenizer,
LlamaForCausalLM, its GGUF loading), the gguf package's reader, and our own loader on the way back."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.interop.convert import convert
from llamalab.model.folder import load, save_model
from tests.conftest import shared_path
from tests.inference.conftest import small_model
from tests.interop.bpe_models import CHATML_JINJA, bpe_model_folder
from tests.tokenizer.cases import varied_strings

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

STRINGS = varied_strings()
KINDS = ("spm", "smollm", "llama3")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Botchan?"},
        {"role": "assistant", "content": "A teacher."}, {"role": "user", "content": "Where?"}]
PROMPT = "Botchan was a boy who"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-tok")
    spm = save_model(root / "model-spm", small_model(4), tokenizer_path=shared_path(
        "tokenizer/llama_spm/llama_tokenizer.model"), extra={"chat_template": "llama2"})
    return {"spm": spm, "smollm": bpe_model_folder(root, "smollm"), "llama3": bpe_model_folder(root, "llama3")}


def spm_gap(s: str) -> bool:
    """Where transformers' own SentencePiece conversion (LlamaTokenizer from tokenizer.model, transformers 5) encodes
    differently from sentencepiece whatever files we write: a leading space, runs of spaces, ``<s>`` typed as text."""
    return s.startswith((" ", "\n ")) or "  " in s or "<s>" in s or s.isspace()


def greedy(logits_of, ids: list[int], n: int = 8) -> list[int]:
    """n greedy tokens after ``ids``, the whole sequence re-read each step (no cache: nothing to share)."""
    out = list(ids)
    for _ in range(n):
        with torch.no_grad():
            out.append(int(logits_of(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def ours(loaded):
    return lambda x: loaded.model(x)


def hf_logits(model):
    return lambda x: model(x).logits


def rendered_ids(loaded, conv=CONV) -> list[int]:
    """The conversation as llamalab renders it for this model (its own template: ours or the source's Jinja)."""
    from llamalab.tokenizer.jinja_template import chat_template_for
    from llamalab.tokenizer.templates import render

    tpl = chat_template_for(loaded.meta)
    if isinstance(tpl, str):
        return render(conv, tpl, loaded.tokenizer)[0]
    return tpl.render(conv, loaded.tokenizer)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_export_keeps_tokenizer_template_and_stops(folders, kind, tmp_path):
    src = folders[kind]
    convert(src, tmp_path / "hf", to="hf")
    ref = load(src, device="cpu")
    tok = ref.tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    strings = STRINGS if kind != "spm" else [s for s in STRINGS if not spm_gap(s)]
    differ = [s for s in strings if hf_tok(s)["input_ids"] != tok.encode(s, bos=tok.add_bos)]
    assert not differ and len(strings) >= 160, differ[:5]
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(gen if isinstance(gen, list) else [gen]) == tok.stop_ids
    if kind == "llama3":
        assert len(tok.stop_ids) == 2  # <|end_of_text|> and <|eot_id|>, as generation_config.json listed them
    # the chat template: transformers' apply_chat_template gives the ids llamalab renders
    text = hf_tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == rendered_ids(ref)
    if kind == "smollm":
        assert hf_tok.chat_template == CHATML_JINJA  # the source's own Jinja, kept verbatim
    # transformers' model generates the same greedy tokens from the same prompt ids
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = hf_tok(PROMPT)["input_ids"]
    assert greedy(hf_logits(hf), ids) == greedy(ours(ref), ids)
    # and back: the imported folder holds the same tokenizer, stops and template
    back = load(convert(tmp_path / "hf", tmp_path / "back")[2], device="cpu")
    assert [back.tokenizer.encode(s, bos=back.tokenizer.add_bos) for s in STRINGS[:50]] == \
           [tok.encode(s, bos=tok.add_bos) for s in STRINGS[:50]]
    assert back.tokenizer.stop_ids == tok.stop_ids and rendered_ids(back) == rendered_ids(ref)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_export_writes_the_vocabulary_and_template(folders, kind, tmp_path):
    src = folders[kind]
    path = convert(src, tmp_path / "m.gguf", to="gguf", gguf_type="f32")[2]
    ref = load(src, device="cpu")
    tok = ref.tokenizer
    r = gguf.GGUFReader(str(path))  # the gguf package's own reader accepts the file

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field("tokenizer.ggml.model") == ("llama" if kind == "spm" else "gpt2")
    assert len(field("tokenizer.ggml.tokens")) == ref.model.cfg.vocab_size == len(field("tokenizer.ggml.token_type"))
    assert field("tokenizer.ggml.add_bos_token") == tok.add_bos
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (tok.bos_id, tok.eos_id)
    if kind != "spm":
        assert field("tokenizer.ggml.pre") == {"smollm": "smollm", "llama3": "llama-bpe"}[kind]
        assert len(field("tokenizer.ggml.merges")) > 100
    assert "tokenizer.chat_template" in r.fields
    # imported back (in memory and as a folder): the same tokens, stops, template and greedy continuation
    for back in (load(path, device="cpu"), load(convert(path, tmp_path / "back")[2], device="cpu")):
        btok = back.tokenizer
        assert [btok.encode(s, bos=btok.add_bos) for s in STRINGS] == [tok.encode(s, bos=tok.add_bos) for s in STRINGS]
        assert btok.stop_ids == tok.stop_ids and btok.add_bos == tok.add_bos
        assert rendered_ids(back) == rendered_ids(ref)
        ids = tok.encode(PROMPT, bos=tok.add_bos)
        assert greedy(ours(back), ids) == greedy(ours(ref), ids)
    # the imported folder holds Hugging Face's tokenizer files (no private format): AutoTokenizer reads them
    if kind != "spm":
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
        assert [hf_tok(s)["input_ids"] for s in STRINGS[:50]] == [tok.encode(s, bos=tok.add_bos) for s in STRINGS[:50]]
        assert "llamalab" not in json.loads((tmp_path / "back" / "tokenizer.json").read_text())
    # transformers' GGUF loading accepts the file: same ids, same logits
    t_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # (transformers' GGUF converter adds a special <|endoftext|> of its own to a 'llama-bpe' vocabulary lacking one)
    strings = [s for s in STRINGS if not (kind == "spm" and spm_gap(s)) and not (kind == "llama3" and
                                                                              "<|endoftext|>" in s)]
    assert [t_tok(s)["input_ids"] for s in strings] == [tok.encode(s, bos=tok.add_bos) for s in strings]
    t_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    x = torch.tensor([tok.encode(PROMPT, bos=tok.add_bos)])
    with torch.no_grad():
        torch.testing.assert_close(t_model(x).logits, ref.model(x), atol=1e-4, rtol=1e-4)


def test_spm_gguf_without_bos_keeps_its_rule(folders, tmp_path):
    """A SentencePiece GGUF saying add_bos_token false: import writes tokenizer_config.json, loading honours it."""
    from llamalab.interop.gguf import export_gguf
    from llamalab.tokenizer import Tokenizer

    tok = Tokenizer(shared_path("tokenizer/llama_spm/llama_tokenizer.model"))
    tok.add_bos = False
    path = export_gguf(small_model(4), tmp_path / "nobos.gguf", "f32", tokenizer=tok)
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"].contents() is False
    out = convert(path, tmp_path / "back")[2]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    back = load(out, device="cpu").tokenizer
    assert back.add_bos is False and back.encode("Hello", bos=back.add_bos)[0] != back.bos_id
    assert load(path, device="cpu").tokenizer.add_bos is False


def test_chatml_jinja_follows_the_bos_rule():
    from llamalab.tokenizer.jinja_template import SourceTemplate
    from llamalab.tokenizer.templates import hf_chat_template, render_text

    assert "bos_token" in hf_chat_template("chatml")
    for name in ("chatml", "llama2", "llama3", "vicuna", "alpaca"):
        jinja = hf_chat_template(name, add_bos=False)
        assert "bos_token" not in jinja, name
        text = SourceTemplate(jinja).render_text(CONV, True, "<s>", "</s>")
        want = render_text(CONV, name, True)
        assert text == want.replace("<s>", "").replace("<|begin_of_text|>", ""), name


def test_export_refuses_a_vocabulary_gguf_cannot_name(folders, tmp_path):
    """A tokenizer.json whose pre-tokenizer llama.cpp has no name for is refused, not written wrong."""
    from llamalab.common import LlamalabError
    from llamalab.interop.gguf import export_gguf
    from llamalab.tokenizer import BPETokenizer

    spec = json.loads((folders["smollm"] / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    tok = BPETokenizer.from_spec(spec)
    model = load(folders["smollm"], device="cpu").model
    with pytest.raises(LlamalabError, match="pre-tokenizer \\(Whitespace\\) is not one a GGUF file can name"):
        export_gguf(model, tmp_path / "x.gguf", "f32", tokenizer=tok)


def test_folders_imported_by_older_versions_still_load(folders, tmp_path):
    """Older imports wrote the GGUF's special ids under a private "llamalab" key of tokenizer.json (and nothing
    else); such folders keep loading with the same ids and BOS rule."""
    import shutil

    from llamalab.interop.gguf import bpe_tokenizer_json, read_gguf

    path = convert(folders["smollm"], tmp_path / "m.gguf", to="gguf", gguf_type="f32")[2]
    spec = bpe_tokenizer_json(read_gguf(path).kv)
    assert spec["llamalab"] == {"bos_id": 1, "eos_id": 2, "add_bos": False}
    old = tmp_path / "old"
    shutil.copytree(folders["smollm"], old)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "checksums.json"):
        (old / name).unlink()
    (old / "tokenizer.json").write_text(json.dumps(spec))
    tok, ref = load(old, device="cpu").tokenizer, load(folders["smollm"], device="cpu").tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (ref.bos_id, ref.eos_id, ref.add_bos)
    assert [tok.encode(s, bos=tok.add_bos) for s in STRINGS] == [ref.encode(s, bos=ref.add_bos) for s in STRINGS]
