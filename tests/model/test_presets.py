"""Llama 3.x presets: `llamalab info` prints the published parameter counts, and each preset builds the same
model as transformers' LlamaConfig with the values of the model's Hugging Face config.json (meta device)."""

from __future__ import annotations

import pytest
import torch

from llamalab.cli import main as cli_main
from llamalab.model.config import get_preset, num_params

# Meta's published counts (model cards / `sum(p.numel())` of the released checkpoints)
PUBLISHED = {"llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
             "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824}

# the fields of each model's config.json on the Hugging Face hub
HF_CONFIGS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False, rope_scaling=None),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                        tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("name", ["llama3-8b", "llama3.2-1b"])
def test_info_prints_the_published_parameter_count(name, capsys):
    assert cli_main(["info", "--preset", name]) == 0
    assert f"parameters        {PUBLISHED[name]:,} " in capsys.readouterr().out


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_llama3_shapes(name):
    m = get_preset(name).model
    assert num_params(m) == PUBLISHED[name]
    assert (m.vocab_size, m.kv_heads, m.rope_theta, m.norm_eps) == (128256, 8, 500000.0, 1e-5)
    assert m.tie_embeddings == name.startswith("llama3.2")
    scaling = {"llama3.1-405b": 8.0, "llama3.2-1b": 32.0, "llama3.2-3b": 32.0}.get(name)
    if scaling is None:
        assert m.rope_scaling is None and m.max_seq_len == 8192
    else:
        s = m.rope_scaling
        assert (s.rope_type, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) \
            == ("llama3", scaling, 1.0, 4.0, 8192) and m.max_seq_len == 131072


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_preset_equals_the_hf_config(name):
    transformers = pytest.importorskip("transformers")
    hf = HF_CONFIGS[name]
    m = get_preset(name).model
    assert (m.dim, m.ffn_hidden_dim, m.n_layers, m.n_heads, m.kv_heads, m.max_seq_len) == (
        hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
        hf["num_key_value_heads"], hf["max_position_embeddings"])
    cfg = transformers.LlamaConfig(vocab_size=128256, rms_norm_eps=1e-5, **hf)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied: the shared matrix counted once
    assert n == num_params(m) == PUBLISHED[name]
