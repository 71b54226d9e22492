"""RoPE scaling through Hugging Face config.json and GGUF: exported, read back, and equal to the reference.

HF: a llamalab model with scaling exports to a folder transformers loads with the same logits, and imports
back to the same config. GGUF: export then ``llamalab.model.folder.load`` gives the same scaling and logits;
llama3 travels as llama.cpp's ``rope_freqs.weight`` (checked against transformers' llama3 frequencies), and a
file written the way llama.cpp's converter writes it (that tensor, no llamalab keys) reads back as llama3.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.model import ModelConfig, Transformer
from llamalab.model.config import RopeScaling
from llamalab.model.layers import WeightInit

SCALINGS = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                   original_max_position_embeddings=64),
    "linear": dict(rope_type="linear", factor=2.5),
    "dynamic": dict(rope_type="dynamic", factor=4.0, original_max_position_embeddings=32),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "yarn-all": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16.0,
                     beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0, attention_factor=1.3, truncate=False),
}


def _model(name: str | None, **kw) -> Transformer:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, max_seq_len=128,
                      rope_scaling=dict(SCALINGS[name]) if name else None, **kw)
    model = Transformer(cfg).eval()
    model.init_weights(init=WeightInit(0.1, 0.1, torch.Generator().manual_seed(0)))  # wide: RoPE matters
    return model


def _x(n: int = 100) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))


def _plain_logits(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    import dataclasses

    plain = Transformer(dataclasses.replace(model.cfg, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        return plain(x)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("name", list(SCALINGS))
def test_hf_export_loads_in_transformers_and_imports_back(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from llamalab.interop.hf import export_hf, load_hf

    model = _model(name)
    export_hf(model, tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["rope_parameters"]["rope_type"] == SCALINGS[name]["rope_type"]
    if name == "dynamic":  # HF's max_position_embeddings is the original context of dynamic NTK
        assert hf_cfg["max_position_embeddings"] == 32
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = _x()
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=1e-5)
    assert (_plain_logits(model, x) - want).abs().max() > 0.1
    back = load_hf(tmp_path / "hf")
    assert (back.cfg.rope_scaling, back.cfg.max_seq_len) == (model.cfg.rope_scaling, model.cfg.max_seq_len)


def _hf_folder(tmp_path, rope: dict | None, **top) -> object:
    from llamalab.interop.hf import export_hf

    d = export_hf(_model(None), tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(top)
    if rope is not None:
        cfg["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_hf_old_style_fields_are_read_as_transformers_reads_them(tmp_path):
    from llamalab.interop.hf import load_hf

    # transformers 4's "type"; a top-level original_max_position_embeddings wins over the one inside
    d = _hf_folder(tmp_path, {"type": "yarn", "factor": 2, "original_max_position_embeddings": 16},
                   original_max_position_embeddings=48)
    s = load_hf(d).cfg.rope_scaling
    assert (s.rope_type, s.factor, s.original_max_position_embeddings) == ("yarn", 2.0, 48)


def test_hf_import_errors_name_the_field(tmp_path):
    from llamalab.interop.hf import import_hf

    cases = [({"rope_type": "longrope", "factor": 2.0}, r"rope scaling type 'longrope' \(field rope_scaling"),
             ({"rope_type": "linear"}, r"field rope_scaling\.factor is missing"),
             ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0},
              r"field rope_scaling\.low_freq_factor is required by rope_type 'llama3'"),
             ({"rope_type": "linear", "factor": -1}, r"field rope_scaling\.factor must be positive"),
             ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial rotary")]
    for i, (rope, msg) in enumerate(cases):
        d = _hf_folder(tmp_path / str(i), rope)
        with pytest.raises(LlamalabError, match=r"config\.json: .*" + msg):
            import_hf(d, tmp_path / f"out{i}")


def test_hf_keys_a_type_does_not_read_are_named(tmp_path, capsys):
    from llamalab.interop.hf import load_hf

    d = _hf_folder(tmp_path, {"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    assert load_hf(d).cfg.rope_scaling == RopeScaling("linear", factor=2.0)
    assert "rope_scaling.low_freq_factor not read by rope_type 'linear'" in capsys.readouterr().out


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("name", list(SCALINGS))
def test_gguf_round_trip_keeps_the_scaling(tmp_path, name):
    pytest.importorskip("gguf")
    from llamalab.interop.gguf import export_gguf
    from llamalab.model.folder import load

    model = _model(name)
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    back = load(path, device="cpu", dtype=torch.float32, with_tokenizer=False).model
    assert back.cfg.rope_scaling == model.cfg.rope_scaling
    x = _x()
    with torch.no_grad():
        want = back(x)
        torch.testing.assert_close(want, model(x), atol=0, rtol=0)
    assert (_plain_logits(model, x) - want).abs().max() > 0.1


def _converter_rope_factors(hf_rope: dict, theta: float, dim: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors), as written there."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = hf_rope.get("factor", 8.0)
    low_freq_factor = hf_rope.get("low_freq_factor", 1.0)
    high_freq_factor = hf_rope.get("high_freq_factor", 4.0)
    old_context_len = hf_rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32)


def test_llama3_rope_freqs_tensor_is_llama_cpps_and_gives_transformers_frequencies():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llamalab.interop.gguf import llama3_rope_factors

    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)  # Llama 3.1 8B
    s = RopeScaling(**rope)
    factors = llama3_rope_factors(128, 500000.0, s)
    torch.testing.assert_close(factors, _converter_rope_factors(rope, 500000.0, 128), atol=0, rtol=1e-6)
    hc = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_theta=500000.0,
                                  max_position_embeddings=131072, rope_scaling=dict(rope))
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    torch.testing.assert_close(plain / factors, want, atol=0, rtol=1e-6)


@pytest.mark.parametrize("factor,head_dim", [(8.0, 128), (32.0, 64), (32.0, 128)])
def test_llama3_scaling_fitted_back_from_a_llama_cpp_tensor(factor, head_dim):
    from llamalab.interop.gguf import llama3_from_rope_factors

    rope = dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)  # Llama 3.1 and 3.2
    got = llama3_from_rope_factors(_converter_rope_factors(rope, 500000.0, head_dim), head_dim, 500000.0, "f.gguf")
    assert got == RopeScaling(**rope)
    with pytest.raises(LlamalabError, match="rope_freqs.weight holds per-frequency factors that do not follow"):
        llama3_from_rope_factors(torch.linspace(1, 3, head_dim // 2), head_dim, 500000.0, "f.gguf")


@pytest.mark.parametrize("original,high", [(256, 4.0), (100, 1.5)])  # one smoothed frequency; none
def test_llama3_fit_of_a_small_head_reproduces_the_tensor(original, high):
    from llamalab.interop.gguf import llama3_from_rope_factors, llama3_rope_factors

    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=high,
                original_max_position_embeddings=original)
    factors = _converter_rope_factors(rope, 10000.0, 16)
    got = llama3_from_rope_factors(factors, 16, 10000.0, "f.gguf")
    torch.testing.assert_close(llama3_rope_factors(16, 10000.0, got), factors, atol=0, rtol=1e-5)


def _write_gguf(path, model: Transformer, keys=None, rope_freqs: torch.Tensor | None = None) -> None:
    """A plain-RoPE export of ``model`` plus ``keys`` (setters on the writer) and a rope_freqs tensor."""
    import gguf

    from llamalab.interop.gguf import add_llama_keys, name_map

    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_keys(w, model.cfg)
    for k in keys or ():
        k(w)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    sd = model.state_dict()
    for g, ours in name_map(model.cfg).items():
        w.add_tensor(g, sd[ours].float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_cpp_style_llama3_gguf_reads_as_llama3(tmp_path):
    pytest.importorskip("gguf")
    from llamalab.model.folder import load

    model = _model("llama3")
    rope = SCALINGS["llama3"]
    _write_gguf(tmp_path / "m.gguf", model, rope_freqs=_converter_rope_factors(rope, 10000.0, 16))
    back = load(tmp_path / "m.gguf", device="cpu", dtype=torch.float32, with_tokenizer=False).model
    assert back.cfg.rope_scaling == RopeScaling(**rope)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)


def test_gguf_rope_errors_name_the_key(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from llamalab.model.folder import load

    model = _model(None)
    _write_gguf(tmp_path / "a.gguf", model, keys=[lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)])
    with pytest.raises(LlamalabError, match=r"a\.gguf: llama\.rope\.scaling\.type='longrope' is not supported"):
        load(tmp_path / "a.gguf", device="cpu", with_tokenizer=False)
    # llamalab's llama3 keys with a rope_freqs tensor that disagrees with them
    keys = [lambda w: w.add_string("llamalab.rope.scaling.type", "llama3"),
            lambda w: w.add_float32("llamalab.rope.scaling.factor", 8.0),
            lambda w: w.add_float32("llamalab.rope.scaling.low_freq_factor", 1.0),
            lambda w: w.add_float32("llamalab.rope.scaling.high_freq_factor", 8.0),
            lambda w: w.add_uint32("llamalab.rope.scaling.original_context_length", 64)]
    _write_gguf(tmp_path / "b.gguf", model, keys=keys, rope_freqs=torch.full((8,), 2.0))
    with pytest.raises(LlamalabError, match=r"b\.gguf: tensor rope_freqs\.weight does not match"):
        load(tmp_path / "b.gguf", device="cpu", with_tokenizer=False)
    _write_gguf(tmp_path / "c.gguf", model, rope_freqs=torch.full((4,), 2.0))
    with pytest.raises(LlamalabError, match=r"c\.gguf: tensor rope_freqs\.weight has shape \(4,\)"):
        load(tmp_path / "c.gguf", device="cpu", with_tokenizer=False)
    # an old file's linear key
    _write_gguf(tmp_path / "d.gguf", model, keys=[lambda w: w.add_float32("llama.rope.scale_linear", 2.0)])
    assert load(tmp_path / "d.gguf", device="cpu", with_tokenizer=False).model.cfg.rope_scaling == \
        RopeScaling("linear", factor=2.0)
