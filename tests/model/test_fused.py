"""The fused CPU kernels (RMSNorm, SwiGLU, RoPE: llamalab/model/fused.py) against the PyTorch expressions they
stand in for, forward and backward; and the cases where PyTorch's ops must run instead."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from llamalab.model import fused
from llamalab.model.layers import RMSNorm, rotate_pairs

needs_lib = pytest.mark.skipif(fused.load() is None, reason=f"fused ops not built: {fused.why_not()}")


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_library_builds_where_a_compiler_exists():
    if shutil.which("cc"):
        assert fused.load() is not None, fused.why_not()


def _ref_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _grads(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


def _close(a, b, tol=2e-5):
    scale = max(b.abs().max().item(), 1e-6)
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item() / scale


@needs_lib
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(3, 5, 33), (4, 256, 128), (2, 64, 768)])  # odd width; below / above PAR_MIN
def test_rms_norm_matches_pytorch(shape, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = torch.rand(shape[-1], generator=g) + 0.5
    gy = torch.randn(shape, generator=g)
    y, (gx, gw) = _grads(lambda a, b: fused.rms_norm(a, b, 1e-5), [x, w], gy)
    ry, (rgx, rgw) = _grads(lambda a, b: _ref_norm(a, b, 1e-5), [x, w], gy)
    _close(y, ry)
    _close(gx, rgx)
    _close(gw, rgw)
    again = _grads(lambda a, b: fused.rms_norm(a, b, 1e-5), [x, w], gy)
    assert torch.equal(again[0], y) and torch.equal(again[1][1], gw)  # same threads, same bits


@needs_lib
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(7, 13), (4, 256, 352)])
def test_swiglu_matches_pytorch(shape, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=g) * 6  # silu's tails: sigmoid near 0 and 1
    a.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -88.0])  # past exp's range: clamped, no inf/nan
    b = torch.randn(shape, generator=g)
    gh = torch.randn(shape, generator=g)
    h, (ga, gb) = _grads(fused.swiglu, [a, b], gh)
    rh, (rga, rgb) = _grads(lambda u, v: F.silu(u) * v, [a, b], gh)
    assert torch.isfinite(h).all() and torch.isfinite(ga).all()
    _close(h, rh)
    _close(ga, rga)
    _close(gb, rgb)


@needs_lib
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,T,H,D", [(1, 3, 2, 6), (4, 256, 4, 32), (2, 64, 12, 64)])
def test_rope_matches_real_arithmetic(B, T, H, D, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(2)
    ang = torch.rand(T, D // 2, generator=g) * 6
    cs = torch.stack([ang.cos(), ang.sin()], -1) * 1.3  # a yarn-like factor: the backward is the transpose
    x = torch.randn(B, T, H, D, generator=g)
    gy = torch.randn(B, T, H, D, generator=g)
    y, (gx,) = _grads(lambda t: fused.rope(t, cs), [x], gy)
    shape = (1, T, 1, D // 2)
    ry, (rgx,) = _grads(lambda t: rotate_pairs(t, cs[..., 0].reshape(shape), cs[..., 1].reshape(shape)), [x], gy)
    _close(y, ry, 1e-6)
    _close(gx, rgx, 1e-6)


def test_pytorch_ops_where_the_kernel_does_not_apply(monkeypatch):
    x = torch.randn(2, 8, 16)
    w = torch.rand(16) + 0.5
    assert fused.rms_norm(x.bfloat16(), w, 1e-5) is None  # autocast / bf16 models
    assert fused.rms_norm(x.transpose(0, 1), w, 1e-5) is None  # not contiguous
    assert fused.rms_norm(x, torch.rand(8), 1e-5) is None  # weight of another width
    assert fused.rope(x.view(2, 8, 2, 8), torch.randn(8, 3, 2)) is None  # table for another head size
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused.rms_norm(x, w, 1e-5) is None  # inductor fuses these itself
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(fused.swiglu(a, b), F.silu(a) * b)  # PyTorch's two ops, bit for bit


@needs_lib
def test_model_layers_take_the_kernels_and_agree_with_pytorch(monkeypatch):
    from llamalab.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    for n in model.modules():
        if isinstance(n, RMSNorm):
            n.weight.data.uniform_(0.5, 1.5)
    tok = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(4))

    def loss_and_grads():
        model.zero_grad()
        loss = F.cross_entropy(model(tok[:, :-1]).flatten(0, 1), tok[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = {"n": 0}
    real = fused._usable

    def counting(*ts):
        ok = real(*ts)
        calls["n"] += ok
        return ok

    monkeypatch.setattr(fused, "_usable", counting)
    loss, grads = loss_and_grads()
    assert calls["n"] == 2 * (2 + 1 + 2 + 1) + 1  # per block: 2 norms, SwiGLU, RoPE of q and k, attention; final norm
    monkeypatch.setattr(fused, "_usable", lambda *ts: False)
    ref_loss, ref_grads = loss_and_grads()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for a, b in zip(grads, ref_grads):
        _close(a, b, 1e-4)


@needs_lib
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_sdpa(threads):
    """One decode step for 4 sequences at different positions (the first, across the kernel's 1024-position
    blocks, the cache's last), GQA 4 heads on 2: rotation, cache writes and attention against PyTorch's."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(5)
    n, H, Hk, D, S = 4, 4, 2, 16, 2100
    pos = torch.tensor([0, 1023, 1024, S - 1])
    qkv = torch.randn(n, H + 2 * Hk, D, generator=g)
    kc, vc = torch.randn(n + 1, Hk, S, D, generator=g), torch.randn(n + 1, Hk, S, D, generator=g)
    ang = torch.rand(S, D // 2, generator=g) * 6
    cs = torch.stack([ang.cos(), ang.sin()], -1)
    ref_k, ref_v, x = kc.clone(), vc.clone(), qkv.clone()
    c, s = cs[pos, :, 0][:, None], cs[pos, :, 1][:, None]  # (n, 1, D/2)
    qk = rotate_pairs(x[:, None, : H + Hk], c[:, None], s[:, None])[:, 0]  # (n, H + Hk, D)
    ref = []
    for b in range(n):
        p = int(pos[b])
        ref_k[b, :, p], ref_v[b, :, p] = qk[b, H:], x[b, H + Hk:]
        k = ref_k[b, :, : p + 1].repeat_interleave(H // Hk, 0)  # (H, p + 1, D)
        v = ref_v[b, :, : p + 1].repeat_interleave(H // Hk, 0)
        ref.append(F.scaled_dot_product_attention(qk[b, :H, None], k, v)[:, 0].reshape(-1))
    out = fused.attn_decode(qkv, cs, pos, kc, vc, H, Hk)
    _close(out, torch.stack(ref), 1e-5)
    assert torch.equal(kc, ref_k) or (kc - ref_k).abs().max() < 1e-6  # only the new positions changed
    assert torch.equal(vc, ref_v)
    assert torch.equal(kc[n], ref_k[n])  # the unused slot untouched
    with pytest.raises(ValueError, match="do not fit"):
        fused.attn_decode(qkv, cs, pos, kc, vc, H, 1)


@needs_lib
def test_cross_entropy_rows_match_pytorch(monkeypatch):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(37, 300, generator=g) * 10
    t = torch.randint(0, 300, (37,), generator=g)
    t[[0, 5]] = -100
    t[1] = 299
    ref = F.cross_entropy(logits, t, ignore_index=-100, reduction="none")
    want_grad = torch.softmax(logits, -1) - F.one_hot(t.clamp(min=0), 300)
    want_grad[t == -100] = 0
    x = logits.clone()
    loss = fused.xent_rows(x, t, -100, grad=True)
    _close(loss, ref, 1e-5)
    _close(x, want_grad, 1e-5)
    assert fused.xent_rows(logits.clone(), t, -100, grad=False).equal(loss)
    with pytest.raises(IndexError, match="300 is out of bounds"):
        fused.xent_rows(logits.clone(), torch.full((37,), 300), -100, grad=True)
    assert fused.xent_rows(logits.bfloat16(), t, -100, grad=True) is None
    # the fused output head takes it, and agrees with its own tensor-op path
    from llamalab.train.fused_ce import linear_cross_entropy_sum

    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (3, 11), generator=g)
    y[0, :4] = -100
    got = linear_cross_entropy_sum(h, w, y, chunk_rows=7)
    gh, gw = torch.autograd.grad(got, (h, w))
    monkeypatch.setattr(fused, "_usable", lambda *ts: False)
    want = linear_cross_entropy_sum(h, w, y, chunk_rows=7)
    wh, ww = torch.autograd.grad(want, (h, w))
    _close(got, want, 1e-5)
    _close(gh, wh, 1e-5)
    _close(gw, ww, 1e-5)


@needs_lib
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the AVX2 build is x86-64's")
def test_avx2_build_agrees(monkeypatch):
    """The library built for AVX2 machines (``-march=haswell``) on this one: every op against PyTorch. (Its exp
    clamps once kept SwiGLU scalar there, 1.5x slower than PyTorch's.)"""
    from llamalab import native

    monkeypatch.setattr(fused, "_lib", fused.open_library(native.build(fused.SOURCE, "haswell")))
    g = torch.Generator().manual_seed(7)
    a, b, gh = (torch.randn(4, 64, 352, generator=g) * 4 for _ in range(3))
    h, (ga, gb) = _grads(fused.swiglu, [a, b], gh)
    rh, (rga, rgb) = _grads(lambda u, v: F.silu(u) * v, [a, b], gh)
    _close(h, rh)
    _close(ga, rga)
    _close(gb, rgb)
    x, w = torch.randn(4, 64, 128, generator=g), torch.rand(128, generator=g) + 0.5
    y, (gx, gw) = _grads(lambda u, v: fused.rms_norm(u, v, 1e-5), [x, w], torch.ones(4, 64, 128))
    ry, (rgx, rgw) = _grads(lambda u, v: _ref_norm(u, v, 1e-5), [x, w], torch.ones(4, 64, 128))
    _close(y, ry)
    _close(gx, rgx)
    _close(gw, rgw)
    logits, t = torch.randn(9, 50, generator=g) * 5, torch.randint(0, 50, (9,), generator=g)
    _close(fused.xent_rows(logits.clone(), t, -100, grad=False), F.cross_entropy(logits, t, reduction="none"))
    q, kv = torch.randn(2, 70, 4, 32, generator=g), torch.randn(2, 70, 4, 32, generator=g)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), is_causal=True)
    _close(fused.attention(q, kv, kv), ref.transpose(1, 2), 1e-5)


@needs_lib
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,T,H,Hk,D", [(2, 77, 4, 2, 16), (3, 130, 6, 6, 48), (1, 65, 8, 2, 40), (2, 2, 2, 1, 32),
                                        (1, 300, 2, 2, 64)])
def test_causal_attention_matches_sdpa(B, T, H, Hk, D, threads):
    """Forward and backward against PyTorch's SDPA on repeated K/V: lengths that are not whole 32/64 blocks, GQA,
    head sizes with a register-blocked path (48, 64) and without (16, 40)."""
    from llamalab.model.attention import repeat_kv

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hk, D, generator=g), \
        torch.randn(B, T, Hk, D, generator=g)
    go = torch.randn(B, T, H, D, generator=g)

    def ref(q, k, v):
        n = H // Hk
        return F.scaled_dot_product_attention(q.transpose(1, 2), repeat_kv(k, n).transpose(1, 2),
                                              repeat_kv(v, n).transpose(1, 2), is_causal=True).transpose(1, 2)

    out, grads = _grads(fused.attention, [q, k * 3, v], go)  # k * 3: peaky rows, the online softmax's rescaling
    rout, rgrads = _grads(ref, [q, k * 3, v], go)
    _close(out, rout, 1e-5)
    for a, b in zip(grads, rgrads):
        _close(a, b, 1e-5)


def test_attention_kernel_declines_what_it_does_not_do():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8)
    assert fused.attention(q, k, k) is None  # one position: decoding uses attn_decode or SDPA
    q3, k3 = torch.randn(1, 5, 3, 8), torch.randn(1, 5, 2, 8)
    assert fused.attention(q3, k3, k3) is None  # 3 heads do not share 2 KV heads evenly
    assert fused.attention(q3.bfloat16(), k3.bfloat16(), k3.bfloat16()) is None


@needs_lib
def test_nan_propagates_and_large_inputs_stay_finite():
    """A NaN in gives NaN out (the exp's clamps must not hide it); past exp's range the results stay finite."""
    a = torch.tensor([float("nan"), -200.0, 88.5, 1.0] * 2500)
    h = fused.swiglu(a, torch.ones_like(a))
    assert torch.isnan(h[0]) and torch.isfinite(h[1:4]).all()
    logits = torch.randn(3, 40)
    logits[1, 5] = float("nan")
    loss = fused.xent_rows(logits, torch.tensor([1, 2, 3]), -100, grad=True)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    q = torch.randn(1, 40, 2, 16)
    q[0, 10, 0, 3] = float("nan")
    out = fused.attention(q, torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16))
    assert torch.isnan(out[0, 10, 0]).all() and torch.isfinite(out[0, :10]).all()
