"""A model config is checked before anything is allocated: ranges and types of every field, the weight file's
header against the config, and the memory the model needs. The same clear one-line errors come from a llamalab
folder's config.json, a Hugging Face config.json and GGUF metadata (tests/interop/test_hostile_gguf.py), each
naming the file and the field as that file calls it."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.model import ModelConfig, Transformer
from llamalab.model.config import PRESETS, ModelConfigError, get_preset
from llamalab.model.folder import load, save_model

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=64)


@pytest.mark.parametrize("field,value,want", [
    ("n_layers", 10**9, "model.n_layers must be between 1 and 4,096, got 1,000,000,000"),
    ("n_layers", 1e9, r"model.n_layers must be an integer, got 1000000000.0 \(float\)"),
    ("n_layers", True, r"model.n_layers must be an integer, got True \(bool\)"),
    ("n_layers", "6", r"model.n_layers must be an integer, got '6' \(str\)"),
    ("dim", 2**20, "model.dim must be between 2 and 131,072, got 1,048,576"),
    ("vocab_size", 10**12, "model.vocab_size must be between 1 and 4,194,304"),
    ("max_seq_len", 10**12, "model.max_seq_len must be between 1 and 16,777,216"),
    ("hidden_dim", -5, "model.hidden_dim must be between 1 and 524,288, got -5"),
    ("n_kv_heads", 0, "model.n_kv_heads must be between 1"),
    ("n_kv_heads", 3, r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
    ("n_heads", 3, r"model.dim \(64\) must be divisible by model.n_heads \(3\)"),
    ("rope_theta", float("nan"), "model.rope_theta must be a finite number above 0 .* got nan"),
    ("rope_theta", float("inf"), "model.rope_theta must be a finite number"),
    ("rope_theta", -1.0, "model.rope_theta must be a finite number above 0"),
    ("norm_eps", 0.0, "model.norm_eps must be a finite number above 0 and below 1"),
    ("norm_eps", "1e-5", "model.norm_eps must be a number"),
    ("ffn_dim_multiplier", 1e6, "model.ffn_dim_multiplier must be a finite number above 0 and below 64"),
    ("multiple_of", 0, "model.multiple_of must be between 1"),
    ("tie_embeddings", "yes", "model.tie_embeddings must be true or false"),
])
def test_every_field_is_range_and_type_checked(field, value, want):
    with pytest.raises(ModelConfigError, match=want) as e:
        ModelConfig(**{**SMALL, field: value})
    assert e.value.field in (field, "dim", "n_kv_heads")


def test_published_shapes_pass_the_limits():
    for name in PRESETS:
        get_preset(name).model.validate()
    # the largest dense LLaMA (3.1 405B) and a long-context one pass too
    ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, hidden_dim=53248,
                max_seq_len=131072, rope_theta=500000.0).validate()
    ModelConfig(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, max_seq_len=10_485_760)


# ----------------------------------------------------------------------------- a llamalab folder's config.json


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("cfg") / "m", Transformer(ModelConfig(**SMALL)))


def _edited(folder, tmp_path, edit) -> "os.PathLike":
    d = tmp_path / "edited"
    shutil.copytree(folder, d)
    meta = json.loads((d / "config.json").read_text())
    edit(meta)
    (d / "config.json").write_text(json.dumps(meta))
    return d


def _set(field, value):
    return lambda meta: meta["model"].__setitem__(field, value)


@pytest.mark.parametrize("edit,want", [
    (_set("n_layers", 1e9), r"config.json: model.n_layers must be an integer, got 1000000000.0"),
    (_set("n_layers", 10**9), "config.json: model.n_layers must be between 1 and 4,096"),
    (_set("dim", 2**20), "config.json: model.dim must be between 2 and 131,072"),
    (_set("vocab_size", 10**12), "config.json: model.vocab_size must be between"),
    (_set("max_seq_len", 10**12), "config.json: model.max_seq_len must be between"),
    (_set("hidden_dim", -5), "config.json: model.hidden_dim must be between 1 and 524,288, got -5"),
    (_set("rope_theta", float("nan")), "config.json: model.rope_theta must be a finite number .* got nan"),
    (_set("n_layers", 3), "config.json: model.n_layers is 3 but .*model.safetensors holds 2 layers"),
    (_set("n_layers", 1), "config.json: model.n_layers is 1 but .*model.safetensors holds 2 layers"),
    (_set("dim", 128), r"model.safetensors: tensor tok_embeddings.weight has shape \(300, 64\), .*config.json needs "
                       r"\(300, 128\)"),
    (_set("vocab_size", 301), r"tok_embeddings.weight has shape \(300, 64\), .*needs \(301, 64\)"),
    (_set("hidden_dim", 200), r"feed_forward.w1.weight has shape \(176, 64\), .*needs \(200, 64\)"),
    (_set("n_kv_heads", 4), r"attention.wk.weight has shape \(32, 64\), .*needs \(64, 64\)"),
    (lambda meta: meta.__setitem__("model", [1, 2]), "config.json:model: expected an object"),
])
def test_llamalab_config_json(folder, tmp_path, edit, want):
    d = _edited(folder, tmp_path, edit)
    with pytest.raises(LlamalabError, match=want) as e:
        load(d, device="cpu", verify=False, with_tokenizer=False)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_config_json_that_is_not_an_object_or_nests_without_end(folder, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(LlamalabError, match="config.json: a model config must be a JSON object, got list"):
        load(d, device="cpu", verify=False)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LlamalabError, match="config.json: JSON nested too deeply"):
        load(d, device="cpu", verify=False)


# ----------------------------------------------------------------------------- a Hugging Face config.json


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from llamalab.interop.hf import export_hf

    torch.manual_seed(0)
    return export_hf(Transformer(ModelConfig(**SMALL)), tmp_path_factory.mktemp("hf") / "hf")


@pytest.mark.parametrize("field,value,want", [
    ("num_hidden_layers", 1e9, r"num_hidden_layers must be an integer, got 1000000000.0"),
    ("num_hidden_layers", 10**9, "num_hidden_layers must be between 1 and 4,096"),
    ("hidden_size", 2**20, "hidden_size must be between 2 and 131,072"),
    ("hidden_size", "64", r"hidden_size must be an integer, got '64' \(str\)"),
    ("vocab_size", 10**12, "vocab_size must be between 1 and 4,194,304"),
    ("max_position_embeddings", 10**12, "max_position_embeddings must be between 1 and 16,777,216"),
    ("intermediate_size", -5, "intermediate_size must be between 1 and 524,288, got -5"),
    ("rope_theta", float("nan"), "rope_theta must be a finite number .* got nan"),
    ("rms_norm_eps", None, "rms_norm_eps must be a number, got None"),
    ("num_key_value_heads", 3, r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    ("num_hidden_layers", 3, "config.json: num_hidden_layers is 3 but .* holds 2 layers"),
    ("intermediate_size", 200, r"mlp.gate_proj.weight has shape \(176, 64\), .*needs \(200, 64\)"),
])
def test_hf_config_json(hf_folder, tmp_path, field, value, want):
    d = tmp_path / "hf"
    shutil.copytree(hf_folder, d)
    hf = json.loads((d / "config.json").read_text())
    hf[field] = value
    hf.pop("rope_parameters", None)  # rope_theta is read from rope_parameters first
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(LlamalabError, match=want) as e:
        load(d, device="cpu", with_tokenizer=False)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


# ----------------------------------------------------------------------------- memory


def test_memory_estimate_refuses_with_the_numbers_and_can_be_overridden(folder, hf_folder, tmp_path, monkeypatch):
    import llamalab.model.folder as F

    pytest.importorskip("gguf")
    from llamalab.interop.gguf import export_gguf_folder

    gguf_file = export_gguf_folder(folder, tmp_path / "m.gguf", "f32")
    n = 4 * sum(p.numel() for p in Transformer(ModelConfig(**SMALL)).parameters())
    monkeypatch.setattr(F, "available_memory", lambda: n // 2)  # less than the fp32 model alone
    monkeypatch.delenv(F.MEMORY_CHECK_ENV, raising=False)
    for path in (folder, hf_folder, gguf_file):
        with pytest.raises(LlamalabError, match=r"loading needs about .* of RAM \(.* parameters x 4 bytes in fp32 .*"
                                                r"only .* is available; set LLAMALAB_NO_MEMORY_CHECK=1") as e:
            load(path, device="cpu", with_tokenizer=False)
        assert str(path) in str(e.value)
    monkeypatch.setenv(F.MEMORY_CHECK_ENV, "1")
    for path in (folder, hf_folder, gguf_file):
        assert load(path, device="cpu", with_tokenizer=False).model.cfg.n_layers == 2


def test_memory_estimate_counts_model_weights_and_rotary_table(folder):
    from llamalab.model.config import num_params
    from llamalab.model.folder import check_memory

    cfg = ModelConfig(**SMALL)
    weights = (folder / "model.safetensors").stat().st_size
    need = check_memory(cfg, weights, "x")
    model = Transformer(cfg)
    fp32 = sum(t.numel() * 4 for t in model.parameters()) + model.freqs_cis.numel() * 4
    assert num_params(cfg) * 4 + weights <= need and fp32 + weights <= need <= 2 * (fp32 + weights)


def test_available_memory_is_plausible():
    from llamalab.model.folder import available_memory

    avail = available_memory()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert avail is None or 0 < avail <= total
    assert math.isfinite(total)


# ----------------------------------------------------------------------------- the weight file's header


def test_hostile_safetensors_header_and_checksums(folder, tmp_path):
    import struct

    d = tmp_path / "m"
    shutil.copytree(folder, d)
    blob = (d / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8:8 + n])
    k = "tok_embeddings.weight"

    def with_header(h):
        j = json.dumps(h).encode()
        return struct.pack("<Q", len(j)) + j + blob[8 + n:]

    cases = {
        "header length 2^62": struct.pack("<Q", 2**62) + blob[8:],
        "truncated": blob[:len(blob) // 2],
        "offset past the end": with_header({**header, k: {**header[k], "data_offsets": [0, 2**60]}}),
        "shape 2^40 x 2^40": with_header({**header, k: {**header[k], "shape": [2**40, 2**40]}}),
    }
    for name, data in cases.items():
        (d / "model.safetensors").write_bytes(data)
        with pytest.raises(LlamalabError, match="model.safetensors: not a readable safetensors file") as e:
            load(d, device="cpu", verify=False, with_tokenizer=False)
        assert "\n" not in str(e.value), name
    (d / "model.safetensors").write_bytes(blob)
    (d / "checksums.json").write_text("[1]")
    with pytest.raises(LlamalabError, match="checksums.json: a checksums file must be a JSON object"):
        load(d, device="cpu", with_tokenizer=False)
    (d / "checksums.json").write_text(json.dumps({"../../etc/passwd": "0" * 64}))
    with pytest.raises(LlamalabError, match="is not a path inside the folder"):
        load(d, device="cpu", with_tokenizer=False)
