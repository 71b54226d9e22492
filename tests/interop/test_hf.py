"""HF folders: export -> transformers loads them unchanged -> import is lossless; bad input is named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamalab.commands.convert import Config as ConvertConfig
from llamalab.commands.convert import main as convert
from llamalab.common import LlamalabError
from llamalab.interop.hf import export_hf, import_hf, load_hf
from llamalab.model import ModelConfig, Transformer
from llamalab.model.folder import load_model, save_model
from tests.conftest import shared_path

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [False, True])
def test_export_load_import_roundtrip(tmp_path, tied):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=16,
                      max_seq_len=128, rope_theta=20000.0, tie_embeddings=tied)
    model = Transformer(cfg).eval()
    tok = shared_path("tokenizer/llama_spm/llama_tokenizer.model")
    ours = save_model(tmp_path / "ours", model, tokenizer_path=tok)
    convert(ConvertConfig(src=str(ours), dst=str(tmp_path / "hf")))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings == tied
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
    # tokenizer loads unchanged through AutoTokenizer and agrees with ours
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    from llamalab.tokenizer import Tokenizer

    text = "Hello world, 12345 tokens 🦙"
    assert hf_tok(text)["input_ids"] == Tokenizer(tok).encode(text, bos=True)
    # back to llamalab: bit-identical weights
    convert(ConvertConfig(src=str(tmp_path / "hf"), dst=str(tmp_path / "back")))
    back, meta = load_model(tmp_path / "back")
    same = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
            "max_seq_len", "tie_embeddings")
    assert {k: getattr(back.cfg, k) for k in same} == {k: getattr(model.cfg, k) for k in same}
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_import_a_folder_written_by_transformers(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
                                      max_position_embeddings=64, rope_theta=1e6)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.cfg.hidden_dim == 160 and model.cfg.rope_theta == 1e6 and model.cfg.kv_heads == 2
    x = torch.randint(0, 200, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def _hf_folder(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=50, multiple_of=8, max_seq_len=32))
    return export_hf(model, tmp_path / "hf")


def test_unsupported_architecture(tmp_path):
    d = _hf_folder(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlamalabError, match=r"config.json: unsupported architecture.*MistralForCausalLM"):
        import_hf(d, tmp_path / "out")


def test_unsupported_rope_scaling_refused(tmp_path):
    d = _hf_folder(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 8.0}  # llama3/linear/dynamic/yarn: test_rope_scaling*
    cfg.pop("rope_parameters")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlamalabError, match="rope scaling type 'longrope'"):
        import_hf(d, tmp_path / "out")


def test_shape_mismatch_names_the_tensor(tmp_path):
    d = _hf_folder(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LlamalabError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(16, 32\)"):
        import_hf(d, tmp_path / "out")
    sd = load_file(str(_hf_folder(tmp_path / "b") / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 32)
    save_file(sd, str(tmp_path / "b" / "hf" / "model.safetensors"))
    with pytest.raises(LlamalabError, match=r"mlp.up_proj.weight has shape \(3, 32\).*intermediate_size=88"):
        import_hf(tmp_path / "b" / "hf", tmp_path / "out")


def test_pickle_weights_refused(tmp_path):
    d = _hf_folder(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(LlamalabError, match="only pickle weights found.*never unpickles"):
        import_hf(d, tmp_path / "out")


def test_corrupt_weights_and_checksums(tmp_path):
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=50, multiple_of=8, max_seq_len=32))
    d = save_model(tmp_path / "m", model)
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(LlamalabError, match="model.safetensors: checksum mismatch"):
        load_model(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LlamalabError, match="not a readable safetensors file"):
        load_model(d, verify=False)
    with pytest.raises(LlamalabError, match="model folder not found"):
        load_model(tmp_path / "missing")


def test_export_carries_the_chat_template(tmp_path):
    """A model folder with a chat template exports an HF tokenizer whose apply_chat_template matches ours."""
    transformers = pytest.importorskip("transformers")
    from llamalab.tokenizer import Tokenizer
    from llamalab.tokenizer.templates import render

    tok_file = shared_path("tokenizer/llama_spm/llama_tokenizer.model")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=64)
    model = Transformer(cfg)
    save_model(tmp_path / "m", model, tokenizer_path=tok_file, extra={"chat_template": "vicuna"})
    convert(ConvertConfig(src=str(tmp_path / "m"), dst=str(tmp_path / "hf"), to="hf"))
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>A chat between") and text.endswith("USER: Another? ASSISTANT:")
    ids, _ = render(conv, "vicuna", Tokenizer(tok_file))
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
