"""The one loader: every format llamalab reads gives the same model, tokenizer and meta as the
llamalab folder that ``llamalab convert`` would make of it (same logits, same ids, same chat template)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.model.folder import detect_format, load, save_model
from tests.conftest import shared_path
from tests.inference.conftest import small_model

TOK = "tokenizer/llama_spm/llama_tokenizer.model"
X = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204]])
TEXT = "Hello world, 12345 🦙"


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(X % loaded.model.cfg.vocab_size)


def _same(a, b, exact: bool = True) -> None:
    """Two Loaded agree: logits, tokenizer ids (with BOS), special ids and meta."""
    if exact:
        assert torch.equal(_logits(a), _logits(b))
    else:
        torch.testing.assert_close(_logits(a), _logits(b), atol=1e-5, rtol=1e-5)
    assert a.tokenizer.encode(TEXT, bos=True) == b.tokenizer.encode(TEXT, bos=True)
    assert (a.tokenizer.bos_id, a.tokenizer.eos_id) == (b.tokenizer.bos_id, b.tokenizer.eos_id)
    assert a.meta == b.meta


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("load") / "tiny"
    return save_model(d, small_model(3), tokenizer_path=shared_path(TOK), extra={"chat_template": "chatml"})


def test_llamalab_folder(folder):
    loaded = load(folder, device="cpu", dtype="fp32")
    assert detect_format(folder) == "llamalab" and loaded.path == folder
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded), small_model(3)(X), atol=0, rtol=0)
    assert loaded.meta["chat_template"] == "chatml"
    assert not loaded.model.training


def test_run_folder_resolves_to_final_model_then_newest_checkpoint(folder, tmp_path):
    from llamalab.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(folder, run.checkpoint(10) / "model")
    shutil.copytree(folder, run.checkpoint(200) / "model")
    assert detect_format(run.root) == "run"
    assert load(run.root, device="cpu").path == run.checkpoint(200) / "model"
    shutil.copytree(folder, run.model)
    loaded = load(run.root, device="cpu")
    assert loaded.path == run.model
    _same(loaded, load(folder, device="cpu"))


def test_hf_folder_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llamalab.interop.hf import import_hf

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                                      max_position_embeddings=64, rope_theta=1e6)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(shared_path(TOK), tmp_path / "hf" / "tokenizer.model")
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja}))
    assert detect_format(tmp_path / "hf") == "huggingface"
    loaded = load(tmp_path / "hf", device="cpu", dtype="fp32")
    assert loaded.path == tmp_path / "hf" and loaded.meta["hf_chat_template"] == jinja
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded), hf(X).logits, atol=1e-5, rtol=1e-5)
    _same(loaded, load(import_hf(tmp_path / "hf", tmp_path / "ours"), device="cpu"))
    assert not list(tmp_path.glob("hf/*.tmp-*")), "loading must not write"


def test_hf_folder_with_tokenizer_json_takes_special_ids_from_config(tmp_path):
    pytest.importorskip("gguf")
    from llamalab.interop.gguf import bpe_tokenizer_json, read_gguf
    from llamalab.interop.hf import export_hf
    from llamalab.model import ModelConfig, Transformer
    from tests.interop.test_gguf import _write_gpt2_gguf

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=320, multiple_of=16, max_seq_len=32)
    torch.manual_seed(2)
    model = Transformer(cfg).eval()
    _write_gpt2_gguf(tmp_path / "bpe.gguf", model)  # a byte-level BPE vocabulary with merges, BOS 0, EOS 1
    spec = bpe_tokenizer_json(read_gguf(tmp_path / "bpe.gguf").kv)
    spec.pop("llamalab")  # a HF tokenizer.json has no special ids: they come from config.json
    hf = export_hf(model, tmp_path / "hf", bos_id=0, eos_id=1)
    (hf / "tokenizer.json").write_text(json.dumps(spec))
    tok = load(hf, device="cpu").tokenizer
    ids = tok.encode("the world", bos=True, eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and tok.decode(ids) == "the world"


@pytest.mark.parametrize("gtype", ["f32", "q8_0"])
def test_gguf_exported_by_us(folder, tmp_path, gtype):
    pytest.importorskip("gguf")
    from llamalab.interop.gguf import export_gguf_folder, import_gguf

    path = export_gguf_folder(folder, tmp_path / "m.gguf", gtype)
    assert detect_format(path) == "gguf"
    loaded = load(path, device="cpu", dtype="fp32")
    assert loaded.path == path and loaded.meta["chat_template"] == "chatml"
    _same(loaded, load(import_gguf(path, tmp_path / "back"), device="cpu"))
    ref = load(folder, device="cpu")
    assert loaded.tokenizer.encode(TEXT, bos=True) == ref.tokenizer.encode(TEXT, bos=True)
    if gtype == "f32":  # lossless: the GGUF file gives the llamalab folder's logits
        assert torch.equal(_logits(loaded), _logits(ref))
    assert loaded.tokenizer.path is None and len(loaded.tokenizer.sha256()) == 64  # built in memory


def test_gguf_with_bpe_tokenizer(tmp_path):
    pytest.importorskip("gguf")
    from llamalab.interop.gguf import import_gguf
    from llamalab.model import ModelConfig, Transformer
    from tests.interop.test_gguf import _write_gpt2_gguf

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=16, max_seq_len=64)
    torch.manual_seed(1)
    _write_gpt2_gguf(tmp_path / "bpe.gguf", Transformer(cfg).eval())
    loaded = load(tmp_path / "bpe.gguf", device="cpu")
    _same(loaded, load(import_gguf(tmp_path / "bpe.gguf", tmp_path / "bpe"), device="cpu"))
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("naïve café")) == "naïve café"


def test_generate_reads_a_gguf_file_like_its_folder(folder, tmp_path, capsys):
    pytest.importorskip("gguf")
    from llamalab.commands.generate import Config, main
    from llamalab.interop.gguf import export_gguf_folder

    path = export_gguf_folder(folder, tmp_path / "m.gguf", "f32")
    run = lambda ckpt: main(Config(model=str(ckpt), prompt="Once upon", max_tokens=6, temperature=0))  # noqa: E731
    assert run(path) == run(folder)


def test_unknown_inputs_are_named(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(LlamalabError, match="x.bin: not a GGUF file"):
        load(bad)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text("{}")
    with pytest.raises(LlamalabError, match="neither a llamalab nor a Hugging Face"):
        load(tmp_path / "odd")
    with pytest.raises(LlamalabError, match="not a model folder.*not a run folder"):
        load(tmp_path)
    with pytest.raises(LlamalabError, match="model not found"):
        load(tmp_path / "missing")
