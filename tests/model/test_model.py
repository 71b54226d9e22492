"""The model against Hugging Face transformers (random weights, fp32, CPU) and its own KV cache."""

from __future__ import annotations

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.interop.hf import config_to_hf, state_to_hf
from llamalab.model import KVCache, ModelConfig, Transformer, flops_per_token, get_preset, num_params

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=128, multiple_of=16, max_seq_len=64),
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64),
    "tied": dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=100, multiple_of=8, max_seq_len=64,
                 tie_embeddings=True),
    "theta": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=128, multiple_of=16, max_seq_len=128,
                  rope_theta=500000.0, ffn_dim_multiplier=1.3),
}


def hf_twin(model: Transformer):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(model.cfg).items()
                                         if k not in ("architectures", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(state_to_hf(model), strict=False)
    assert not unexpected and all("rotary" in m or (model.cfg.tie_embeddings and m == "lm_head.weight")
                                  for m in missing)
    if model.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(name):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIGS[name])).eval()
    hf = hf_twin(model)
    x = torch.randint(0, model.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    assert ours.shape == theirs.shape == (3, 40, model.cfg.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_greedy_generation_matches_hf(name):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**CONFIGS[name])).eval()
    # make the distribution peaky enough that argmax is not decided by float noise
    with torch.no_grad():
        model.output.weight.mul_(8.0) if not model.cfg.tie_embeddings else model.tok_embeddings.weight.mul_(4.0)
    hf = hf_twin(model)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6))
    ids = prompt.clone()
    cache = KVCache(model.cfg, 1)
    with torch.no_grad():
        logits = model(ids, cache, 0)
        for i in range(32):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits = model(nxt, cache, ids.shape[1] - 1)
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None,
                          attention_mask=torch.ones_like(prompt))
    assert ids.tolist() == ref.tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_matches_full_forward(name):
    torch.manual_seed(2)
    model = Transformer(ModelConfig(**CONFIGS[name])).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2)
        parts = [model(x[:, :7], cache, 0), model(x[:, 7:12], cache, 7)]  # prefill, then a chunk
        parts += [model(x[:, i:i + 1], cache, i) for i in range(12, 30)]  # token by token
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_param_count_and_swiglu_rule():
    cfg = get_preset("llama-7b").model
    assert cfg.ffn_hidden_dim == 11008
    assert get_preset("llama2-70b").model.ffn_hidden_dim == 28672
    assert get_preset("llama2-34b").model.ffn_hidden_dim == 22016
    assert num_params(cfg) == 6_738_415_616  # the published LLaMA-7B count
    assert num_params(get_preset("llama2-70b").model) == 68_976_648_192
    small = Transformer(get_preset("tiny").model)
    assert small.num_params() == num_params(small.cfg)
    # 6N dominates; attention term is 12 L H Dh T
    c = get_preset("tiny").model
    assert flops_per_token(c, 0) == pytest.approx(
        6 * (num_params(c, embeddings=False) - c.n_layers * 2 * c.dim - c.dim))


def test_big_preset_builds_on_meta_without_memory():
    with torch.device("meta"):
        m = Transformer(get_preset("llama2-70b").model)
    assert all(p.is_meta for p in m.parameters())
    assert m.num_params() == 68_976_648_192


def test_init_styles():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=512, multiple_of=32, init="opt")
    m = Transformer(cfg)
    assert m.layers[0].attention.wq.weight.std().item() == pytest.approx(0.006, rel=0.05)
    assert m.layers[0].attention.wo.weight.std().item() == pytest.approx(0.006 / 4, rel=0.05)
    cfg2 = ModelConfig(dim=256, n_layers=8, n_heads=4, vocab_size=512, multiple_of=32, init="llama")
    m2 = Transformer(cfg2)
    assert m2.layers[0].feed_forward.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m2.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(m2.norm.weight == 1)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(LlamalabError, match=r"dim \(100\) must be divisible by model.n_heads \(3\)"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(LlamalabError, match=r"n_heads \(8\) must be divisible by model.n_kv_heads \(3\)"):
        ModelConfig(dim=64, n_heads=8, n_kv_heads=3)


def test_too_long_sequence_is_refused(tiny_config):
    m = Transformer(tiny_config)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m(torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("init,tie", [("llama", False), ("opt", False), ("llama", True)])
def test_seeded_init_is_one_rule_drawn_in_parameter_order(tiny_config, init, tie):
    """Each module owns its init (Attention, FeedForward, RMSNorm; embedding/output in Transformer),
    walked in named_parameters() order: a seed gives the weights it always gave (resume and the
    FSDP init, tests/train/test_distributed.py, rely on it)."""
    import dataclasses
    import math

    cfg = dataclasses.replace(tiny_config, init=init, tie_embeddings=tie)
    m = Transformer(cfg)
    m.init_weights(seed=5)
    g = torch.Generator().manual_seed(5)
    std = 0.02 if init == "llama" else 0.006
    for name, p in m.named_parameters():
        if p.ndim == 1:
            assert torch.all(p == 1), name
            continue
        resid = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
        s = std / math.sqrt(2 * cfg.n_layers) if resid else std
        assert torch.equal(p, torch.empty(p.shape).normal_(0.0, s, generator=g)), name
    assert not tie or m.output.weight is m.tok_embeddings.weight


def test_keep_returns_only_the_chosen_positions_logits(tiny_config):
    """``keep`` (HF's logits_to_keep, as a mask): the same logits as the full forward at those positions, in
    row-major order, with gradients to the weights."""
    torch.manual_seed(0)
    m = Transformer(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (3, 12))
    keep = torch.rand(3, 12) < 0.3
    keep[1] = False  # a row with nothing kept
    full = m(tokens)
    got = m(tokens, keep=keep)
    assert got.shape == (int(keep.sum()), tiny_config.vocab_size)
    torch.testing.assert_close(got, full[keep], rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert m.output.weight.grad is not None and m.layers[0].attention.wq.weight.grad.abs().sum() > 0
