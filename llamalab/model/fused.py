"""Fused fp32 CPU kernels (``csrc/ops.c``, compiled on first use like the quantised GEMM:
:mod:`llamalab.native`) for the work around the matmuls that PyTorch's eager ops spread over many passes:

- training (forward and backward): RMSNorm, SwiGLU's ``silu(a) * b``, RoPE and causal self-attention (flash-style,
  GQA without repeating K/V), used by the model's layers; the fused output head's per-row cross-entropy and its
  gradient (``xent_rows``, :mod:`llamalab.train.fused_ce`);
- decoding: one layer's RoPE, KV-cache write and attention for one new token per sequence (``attn_decode``, used by
  the inference runner's eager fp32 path).

Why: these ops are memory-bound (or, in decode, dispatch-bound), and eager autograd makes one pass over the
activations (and one temporary tensor) per elementary op: RMSNorm is ~6 ops forward and ~10 backward, RoPE in real
arithmetic ~8 and ~12, a decode layer's attention ~15 small ops. Each kernel reads its inputs once and writes its
outputs once. Measured forward + backward, 2 threads, AVX-512 VM (fp32; stories110M's shapes, 8 x 256 tokens):
RMSNorm 7.5 -> 1.3 ms, SwiGLU 9.8 -> 6.3 ms, RoPE of q and k 10.9 -> 2.5 ms; the tiny preset's shapes 2.4 -> 0.7,
3.2 -> 1.8, 3.2 -> 0.4 ms; attention 1.2-1.5x PyTorch's CPU flash kernel forward + backward at head sizes 32-64
(1.1x at 1,024 positions). ``llamalab run``'s pretraining 417 -> 362 s before the attention kernel; SmolLM2 int4
decode at batch 1, 1 thread, 57 -> 70 tok/s (``attn_decode``). The GEMMs stay PyTorch's (MKL / oneDNN).

When they are used (each call decides; otherwise the plain PyTorch expression runs, with the same math):
plain fp32 CPU tensors (not DTensors: tensor parallelism keeps PyTorch's ops), contiguous where the kernel reads
them, not inside ``torch.compile`` (inductor fuses these itself), and the library built (a C compiler with
OpenMP; ``LLAMALAB_KERNELS=0`` turns every native kernel off). Results differ from PyTorch's by rounding only
(~1e-6 relative: sums in another order, an exp polynomial with ~1e-7 error); a fixed thread count gives the same
bits every time, so resume stays bit-exact. Under bf16 autocast the inputs are bf16 and PyTorch's ops run.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

import llamalab.native as native

SOURCE = Path(__file__).parent / "csrc" / "ops.c"

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()
_tried = False
_why = ""


def load() -> ctypes.CDLL | None:
    """The compiled ops library, or None (the reason in :func:`why_not`) where it cannot be built or is turned off."""
    if _tried:
        return _lib
    with _lock:  # NOTE: a second thread (the server's) waits for the first build rather than seeing None
        return _load()


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _why
    if not _tried:
        _tried = True
        _lib, _why = native.load(SOURCE, _bind)
        if _lib is None and not native.switched_off():
            print(f"llamalab: RMSNorm/SwiGLU/RoPE/attention use PyTorch's ops ({_why})", file=sys.stderr)
    return _lib


def open_library(path: Path) -> ctypes.CDLL:
    """Load a build of ``ops.c`` and declare its functions' C types (tests load the AVX2 build this way)."""
    return native.open_library(path, _bind)


def _bind(lib: ctypes.CDLL) -> None:
    p, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.rmsnorm_fwd.argtypes = [p, p, p, p, i64, i64, f32, cint]
    lib.rmsnorm_bwd.argtypes = [p, p, p, p, p, p, p, i64, i64, cint]
    lib.swiglu_fwd.argtypes = [p, p, p, i64, cint]
    lib.swiglu_bwd.argtypes = [p, p, p, p, p, i64, cint]
    lib.rope.argtypes = [p, p, p, i64, i64, i64, i64, f32, cint]
    lib.attn_decode.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, f32, cint]
    lib.xent_rows.argtypes = [p, p, p, i64, i64, i64, cint, cint]
    lib.attn_fwd.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, f32, cint]
    lib.attn_bwd.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, f32, cint]
    lib.attn_fwd.restype = lib.attn_bwd.restype = cint


def why_not() -> str:
    return _why


def _usable(*ts: torch.Tensor) -> bool:
    """All plain fp32 CPU tensors (Parameters count; DTensors and other subclasses do not), contiguous, outside
    torch.compile, and the library loaded."""
    for t in ts:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.dtype != torch.float32 or t.device.type != "cpu" \
                or not t.is_contiguous() or t.numel() == 0:
            return False
    return not torch.compiler.is_compiling() and load() is not None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        M = x.numel() // D
        y = torch.empty_like(x)
        rstd = torch.empty(M, dtype=torch.float32)
        _lib.rmsnorm_fwd(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), M, D, eps, torch.get_num_threads())
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        gy = gy.contiguous()
        D = x.shape[-1]
        M = x.numel() // D
        nt = torch.get_num_threads()
        gx, gw, part = torch.empty_like(x), torch.empty(D, dtype=torch.float32), torch.empty(nt, D)
        _lib.rmsnorm_bwd(x.data_ptr(), w.data_ptr(), rstd.data_ptr(), gy.data_ptr(), gx.data_ptr(), gw.data_ptr(),
                         part.data_ptr(), M, D, nt)
        return gx, gw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = torch.empty_like(a)
        _lib.swiglu_fwd(a.data_ptr(), b.data_ptr(), h.data_ptr(), a.numel(), torch.get_num_threads())
        ctx.save_for_backward(a, b)
        return h

    @staticmethod
    def backward(ctx, gh: torch.Tensor):
        a, b = ctx.saved_tensors
        gh = gh.contiguous()
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        _lib.swiglu_bwd(a.data_ptr(), b.data_ptr(), gh.data_ptr(), ga.data_ptr(), gb.data_ptr(), a.numel(),
                        torch.get_num_threads())
        return ga, gb


def _rope_call(x: torch.Tensor, cs: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    _lib.rope(x.data_ptr(), cs.data_ptr(), y.data_ptr(), B, T, H, D, sign, torch.get_num_threads())
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cs)
        return _rope_call(x, cs, 1.0)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (cs,) = ctx.saved_tensors
        return _rope_call(gy.contiguous(), cs, -1.0), None  # the transposed rotation


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, H, D = q.shape
        Hk = k.shape[2]
        out, lse = torch.empty_like(q), torch.empty(B, H, T, dtype=torch.float32)
        if _lib.attn_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), B, T, H, Hk, D,
                         D ** -0.5, torch.get_num_threads()):
            raise MemoryError(f"attention: no memory for the transposed keys of {tuple(k.shape)}")
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, gout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        gout = gout.contiguous()
        B, T, H, D = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if _lib.attn_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), gout.data_ptr(),
                         dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, T, H, k.shape[2], D, D ** -0.5,
                         torch.get_num_threads()):
            raise MemoryError("attention backward: no memory for its scratch")
        return dq, dk, dv


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Causal ``softmax(q k^T / sqrt(D)) v`` with q (B, T, H, D) and k, v (B, T, Hk, D) in the projections' layout
    (GQA: query head h reads key head h // (H / Hk)); (B, T, H, D), or None where the kernel does not apply."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] \
            or k.shape[2] == 0 or q.shape[2] % k.shape[2] or q.shape[1] < 2 or not _usable(q, k, v):
        return None
    return _Attention.apply(q, k, v)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim through the kernel, or None where it does not apply."""
    if weight.shape != x.shape[-1:] or not _usable(x, weight):
        return None
    return _RMSNorm.apply(x, weight, eps)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` (the kernel where it applies, else PyTorch's two ops)."""
    if a.shape == b.shape and _usable(a, b):
        return _SwiGLU.apply(a, b)
    return F.silu(a) * b


def rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor | None:
    """x (B, T, H, D) with adjacent pairs rotated by ``cos_sin`` (T, D/2, 2) through the kernel, or None where it
    does not apply."""
    if x.dim() != 4 or cos_sin.shape != (x.shape[1], x.shape[3] // 2, 2) or x.shape[3] % 2 or not _usable(x, cos_sin):
        return None
    return _RoPE.apply(x, cos_sin)


def attn_decode(qkv: torch.Tensor, cos_sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """One decode step's attention for n sequences in one call (the inference runner's eager fp32 CPU path).

    ``qkv`` (n, H + 2 Hk, D) fp32 contiguous: this token's q, k, v heads; sequence b sits in cache slot b at
    position ``pos[b]`` (int64). q and k are rotated by ``cos_sin[pos[b]]`` (S, D/2, 2) *in place*, k and v written
    into ``k_cache`` / ``v_cache`` (slots, Hk, S, D) at that position, and the causal attention over positions
    [0, pos[b]] returned as (n, H * D). The caller checks :func:`load` first; shapes are checked here.
    NOTE: the positions are not (a host sync per layer): the caller keeps them in [0, S), as the runner's
    ``decode`` does before each step.
    """
    n, heads, D = qkv.shape
    S = k_cache.shape[2]
    if n_kv_heads < 1 or n_heads % n_kv_heads or D % 2 or heads != n_heads + 2 * n_kv_heads \
            or k_cache.shape[1:] != (n_kv_heads, S, D) or v_cache.shape != k_cache.shape or k_cache.shape[0] < n \
            or cos_sin.shape[1:] != (D // 2, 2) or cos_sin.shape[0] < S or pos.shape != (n,):
        raise ValueError(f"attn_decode: qkv {tuple(qkv.shape)}, caches {tuple(k_cache.shape)}, table "
                         f"{tuple(cos_sin.shape)}, pos {tuple(pos.shape)} do not fit H={n_heads}, Hk={n_kv_heads}")
    if not all(t.is_contiguous() and t.dtype == torch.float32 for t in (qkv, cos_sin, k_cache, v_cache)) \
            or pos.dtype != torch.int64 or not pos.is_contiguous():
        raise ValueError("attn_decode: fp32 contiguous tensors and int64 positions expected")
    out = torch.empty(n, n_heads * D, dtype=torch.float32)
    _lib.attn_decode(qkv.data_ptr(), cos_sin.data_ptr(), pos.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                     out.data_ptr(), n, n_heads, n_kv_heads, D, S, D ** -0.5, torch.get_num_threads())
    return out


def xent_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad: bool) -> torch.Tensor | None:
    """Per-row cross-entropy of ``logits`` (n, V) fp32 against ``targets`` (n,) int64, or None where the kernel does
    not apply. With ``grad`` the logits are overwritten by their gradient ``softmax - onehot`` (zero rows where the
    target is ``ignore_index``); without, by scratch. Targets outside [0, V) other than ``ignore_index`` raise, as
    ``F.cross_entropy`` does."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or targets.dtype != torch.int64 \
            or not targets.is_contiguous() or not _usable(logits):
        return None
    V = logits.shape[1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise IndexError(f"target {int(targets[bad][0])} is out of bounds for a vocabulary of {V}")
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    _lib.xent_rows(logits.data_ptr(), targets.data_ptr(), loss.data_ptr(), logits.shape[0], V, ignore_index, grad,
                   torch.get_num_threads())
    return loss
