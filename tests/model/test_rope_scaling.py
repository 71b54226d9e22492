"""RoPE scaling (llama3, linear, dynamic, yarn): the same frequencies and logits as transformers.

Reference: transformers' ``LlamaForCausalLM`` with random weights (tiny configs, fp32, CPU), imported through
``llamalab.interop.hf.load_hf`` from the folder transformers saved. The weights are drawn wider than HF's
default (initializer_range 0.1) so that attention is sharp enough for the rotary frequencies to matter: each
logits test also checks that plain RoPE gives clearly different logits, so it could fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.inference.runner import Runner
from llamalab.model import KVCache, ModelConfig, Transformer
from llamalab.model.config import RopeScaling
from llamalab.model.folder import load_model, save_model
from llamalab.model.layers import dynamic_decode_freqs_cis, precompute_freqs_cis, rope_inv_freq

transformers = pytest.importorskip("transformers")

# name: (HF rope_scaling, max_position_embeddings, tokens in the test sequence)
CASES = {
    "llama3": (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                    original_max_position_embeddings=64), 512, 96),
    "linear": (dict(rope_type="linear", factor=4.0), 512, 96),
    "dynamic": (dict(rope_type="dynamic", factor=4.0), 64, 100),  # 100 tokens: past the original 64
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64), 256, 120),
    "yarn-mscale": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16.0,
                         beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0, truncate=False), 256, 120),
    "yarn-attention-factor": (dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32,
                                   attention_factor=1.3), 256, 120),
}
HEAD_DIM = 16


def _hf_config(name: str, **kw):
    rs, mpe, _ = CASES[name]
    args = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=mpe, rope_scaling=dict(rs),
                initializer_range=0.1)
    return transformers.LlamaConfig(**{**args, **kw})


def _pair(name: str, tmp_path, **kw):
    """(transformers model, the same model imported by llamalab from the folder transformers saved)."""
    from llamalab.interop.hf import load_hf

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_hf_config(name, **kw)).eval()
    hf.save_pretrained(tmp_path / name)
    return hf, load_hf(tmp_path / name)


def _plain(model: Transformer) -> Transformer:
    plain = Transformer(dataclasses.replace(model.cfg, rope_scaling=None)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


def _tokens(name: str, n: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, n or CASES[name][2]), generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = _hf_config(name)
    rs = CASES[name][0]
    from llamalab.interop.hf import config_from_hf

    cfg = config_from_hf({**hc.to_dict(), "architectures": ["LlamaForCausalLM"]})
    lens = [None, 64, 65, 100, 250] if name == "dynamic" else [None]
    for seq_len in lens:
        hf_seq = None if seq_len is None else torch.tensor(seq_len)
        want, want_scale = ROPE_INIT_FUNCTIONS[rs["rope_type"]](hc, "cpu", seq_len=hf_seq)
        got, scale = rope_inv_freq(HEAD_DIM, cfg.rope_theta, cfg.rope_scaling, seq_len)
        assert torch.equal(got, want), (name, seq_len)
        assert scale == want_scale
    plain, _ = rope_inv_freq(HEAD_DIM, cfg.rope_theta, None)
    if name != "dynamic":
        assert not torch.equal(plain, got)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(tmp_path, name):
    hf, model = _pair(name, tmp_path)
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.rope_type == CASES[name][0]["rope_type"]
    x = _tokens(name)
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        assert (_plain(model)(x) - want).abs().max() > 0.1  # the scaling matters at this size


def test_dynamic_runs_past_the_original_context_and_is_plain_rope_within_it(tmp_path):
    hf, model = _pair("dynamic", tmp_path)
    assert model.cfg.rope_scaling.original_max_position_embeddings == 64
    assert model.cfg.max_seq_len == 256  # HF's max_position_embeddings x factor
    x = _tokens("dynamic", 60)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), _plain(model)(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "linear", "yarn", "yarn-mscale"])
def test_kv_cache_decode_equals_full_forward(tmp_path, name):
    _, model = _pair(name, tmp_path)
    x = _tokens(name)
    T, T0 = x.shape[1], x.shape[1] - 8
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, batch_size=1, max_seq_len=T)
        parts = [model(x[:, :T0], kv_cache=cache, start_pos=0)]
        parts.append(model(x[:, T0:T0 + 3], kv_cache=cache, start_pos=T0))  # a chunk after the prefix
        for t in range(T0 + 3, T):
            parts.append(model(x[:, t:t + 1], kv_cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def _hf_cached_decode(hf, x: torch.Tensor, T0: int) -> torch.Tensor:
    import inspect

    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # transformers 5.x
    with torch.no_grad():
        out = hf(x[:, :T0], use_cache=True)
        logits = [out.logits]
        for t in range(T0, x.shape[1]):
            out = hf(x[:, t:t + 1], use_cache=True, **{name: getattr(out, name)})
            logits.append(out.logits)
    return torch.cat(logits, 1)


def test_dynamic_kv_cache_decode_equals_transformers(tmp_path):
    """Dynamic NTK: each forward uses the frequencies of its own length, so a cached decode differs from one
    full forward (cached keys keep the frequencies they were rotated with): ours equals HF's cached decode."""
    hf, model = _pair("dynamic", tmp_path)
    x = _tokens("dynamic")
    T, T0 = x.shape[1], 70  # prefill already past the original 64, then one token at a time
    want = _hf_cached_decode(hf, x, T0)
    with torch.no_grad():
        cache = KVCache(model.cfg, batch_size=1, max_seq_len=T)
        got = [model(x[:, :T0], kv_cache=cache, start_pos=0)]
        for t in range(T0, T):
            got.append(model(x[:, t:t + 1], kv_cache=cache, start_pos=t))
        got = torch.cat(got, 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got[:, T0:] - model(x)[:, T0:]).abs().max() > 1e-3  # not what one full forward gives


@pytest.mark.parametrize("name", list(CASES))
def test_runner_equals_model(tmp_path, name):
    """The fast decode path builds its own rotary tables: prefill and decode equal the model's cached decode."""
    _, model = _pair(name, tmp_path)
    x = _tokens(name)
    T, T0 = x.shape[1], x.shape[1] - 6
    with torch.no_grad():
        cache = KVCache(model.cfg, batch_size=1, max_seq_len=T)
        want = [model(x[:, :T0], kv_cache=cache, start_pos=0)[0]]
        for t in range(T0, T):
            want.append(model(x[:, t:t + 1], kv_cache=cache, start_pos=t)[0])
    runner = Runner(model, slots=2, max_seq_len=T)
    got = [runner.prefill(1, x[0, :T0].tolist(), all_logits=True)]
    runner.move_slot(1, 0)
    for t in range(T0, T):
        got.append(runner.decode(x[0, t:t + 1]))
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=1e-4, rtol=1e-4)


def test_runner_dynamic_slots_at_different_positions_in_one_decode(tmp_path):
    _, model = _pair("dynamic", tmp_path)
    x = _tokens("dynamic")
    lens = [90, 67]  # both past the original context, at different positions
    runner = Runner(model, slots=2, max_seq_len=100)
    for slot, n in enumerate(lens):
        runner.prefill(slot, x[0, :n].tolist())
    got = runner.decode(torch.stack([x[0, n] for n in lens]))
    with torch.no_grad():
        for row, n in enumerate(lens):
            cache = KVCache(model.cfg, batch_size=1, max_seq_len=100)
            model(x[:, :n], kv_cache=cache, start_pos=0)
            want = model(x[:, n:n + 1], kv_cache=cache, start_pos=n)[0, 0]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)


def test_dynamic_decode_table_rows_are_their_own_lengths():
    s = RopeScaling("dynamic", factor=4.0, original_max_position_embeddings=16)
    table = dynamic_decode_freqs_cis(HEAD_DIM, 40, 10000.0, s)
    for m in (0, 15, 16, 17, 39):
        row = precompute_freqs_cis(HEAD_DIM, m + 1, 10000.0, s, seq_len=m + 1 if m + 1 > 16 else None)[m]
        torch.testing.assert_close(table[m], row, atol=1e-6, rtol=1e-6)


def test_128k_vocabulary(tmp_path):
    """Llama 3's 128,256-token vocabulary with its llama3 scaling, tied embeddings (as Llama 3.2), small dims."""
    from llamalab.interop.hf import load_hf

    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        initializer_range=0.1, bos_token_id=128000, eos_token_id=128001,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))
    hf = transformers.LlamaForCausalLM(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.cfg.vocab_size == 128256 and model.cfg.tie_embeddings and model.cfg.max_seq_len == 131072
    x = torch.tensor([[128000, 9906, 1917, 128255, 0, 127999] + list(range(100, 140))])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "dynamic", "yarn-mscale"])
def test_training_backward_and_model_folder_keep_the_scaling(tmp_path, name):
    _, model = _pair(name, tmp_path)
    x = _tokens(name)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[0, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    save_model(tmp_path / "folder", model)
    back, _ = load_model(tmp_path / "folder")
    assert back.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_config_json_and_errors_name_the_field():
    cfg = ModelConfig(dim=64, n_heads=4, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 64})
    assert isinstance(cfg.rope_scaling, RopeScaling)
    from llamalab.config import from_dict

    assert from_dict(ModelConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(LlamalabError, match=r"model\.rope_scaling\.low_freq_factor is required by rope_type 'llama3'"):
        RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64, high_freq_factor=4.0)
    with pytest.raises(LlamalabError, match=r"model\.rope_scaling\.beta_fast is not used by rope_type 'linear'"):
        RopeScaling("linear", factor=2.0, beta_fast=32.0)
    with pytest.raises(LlamalabError, match=r"model\.rope_scaling\.rope_type must be one of .*'longrope'"):
        RopeScaling("longrope", factor=2.0)
    with pytest.raises(LlamalabError, match=r"model\.rope_scaling\.factor must be positive"):
        RopeScaling("linear", factor=0.0)
    with pytest.raises(LlamalabError, match=r"model\.rope_scaling: unknown field\(s\) \['scale'\]"):
        ModelConfig(dim=64, n_heads=4, rope_scaling={"rope_type": "linear", "scale": 2.0})
