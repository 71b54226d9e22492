"""The LLaMA building blocks: RMSNorm, the SwiGLU feed-forward, and rotary embeddings (RoPE).

Weight init: every module owns its rule in an ``init_weights(init)`` method (as in torchtitan),
and :class:`WeightInit` owns how one tensor is drawn. ``Transformer.init_weights`` walks the modules
with a plain :class:`WeightInit`; FSDP's ``init_sharded_weights`` (``llamalab.train.fsdp``) walks
them with a subclass that draws each full matrix and keeps this rank's shard. The rule is written
once; the two walks draw the same numbers in the same order, so a sharded init equals an unsharded
one with the same seed.

RoPE follows Meta's reference code: ``precompute_freqs_cis`` builds unit complex numbers
e^{i m theta_j} and ``apply_rotary_emb`` rotates adjacent pairs (x[2j], x[2j+1]) of each head by
them. Hugging Face rotates halves (x[j], x[j + D/2]) instead; the two agree once the q/k projection
rows are permuted, which the HF converter does (``llamalab.interop.hf``).

RoPE scaling (``ModelConfig.rope_scaling``: ``llama3``, ``linear``, ``dynamic``, ``yarn``) changes only the
frequencies theta_j (:func:`rope_inv_freq`, written after transformers' ``modeling_rope_utils`` expression by
expression, so the float32 numbers agree) and, for ``yarn``, the length of the unit complex numbers (HF
multiplies cos and sin by its ``attention_factor``). ``dynamic`` depends on the sequence length: a forward
over positions [start, end) with end beyond the original context uses the frequencies for ``seq_len = end``,
as HF computes them from ``max(position_ids) + 1`` (:func:`dynamic_seq_len`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llamalab.model import fused
from llamalab.model.config import RopeScaling


@dataclass
class WeightInit:
    """How to draw one weight tensor: normal(0, std), or ones for norms.

    ``std`` is for every matrix and the embedding, ``resid_std`` for the projections that write
    into the residual stream (attention ``wo``, feed-forward ``w2``). With a ``generator`` (a seeded
    CPU one) the numbers are drawn on the CPU and copied, so a given seed gives the same weights on
    any device (NOTE: on the CPU itself ``normal_`` draws in place, a different stream than
    ``randn``; kept so that CPU weights of a given seed never change).
    """

    std: float
    resid_std: float
    generator: torch.Generator | None = None

    @classmethod
    def for_model(cls, init: str, n_layers: int, seed: int | None = None) -> WeightInit:
        """``llama``: std 0.02; ``opt``: 0.006 (OPT, Megatron-LM); residual outputs / sqrt(2 * n_layers)."""
        std = 0.02 if init == "llama" else 0.006
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        return cls(std, std / math.sqrt(2 * n_layers), gen)

    def normal_(self, w: torch.Tensor, std: float) -> None:
        if self.generator is not None and w.device.type != "cpu":
            w.copy_(torch.randn(w.shape, generator=self.generator).mul_(std).to(w))
        else:
            w.normal_(0.0, std, generator=self.generator)

    def ones_(self, w: torch.Tensor) -> None:
        w.fill_(1.0)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (pre-norm, no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused.rms_norm(x, self.weight, self.eps)  # the fused CPU kernel where it applies (fp32)
        if y is not None:
            return y
        return self._norm(x.float()).type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def init_weights(self, init: WeightInit) -> None:
        init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down (residual output)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(fused.swiglu(self.w1(x), self.w3(x)))  # silu(w1 x) * w3 x

    def init_weights(self, init: WeightInit) -> None:
        """Gate and up at ``init.std``; the down projection writes the residual: ``init.resid_std``."""
        init.normal_(self.w1.weight, init.std)
        init.normal_(self.w2.weight, init.resid_std)
        init.normal_(self.w3.weight, init.std)


def rope_inv_freq(dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None,
                  seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The RoPE frequencies theta_j (dim/2,) in fp32 and the factor applied to cos/sin (1.0 but for yarn).

    Mirrors transformers' ``modeling_rope_utils`` (the default, ``_compute_linear_scaling_rope_parameters``,
    ``_compute_dynamic_ntk_parameters``, ``_compute_yarn_parameters``, ``_compute_llama3_parameters``).
    ``seq_len`` matters only to ``dynamic``: None (or up to the original context) gives plain RoPE.
    """
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if scaling is None:
        return 1.0 / (theta ** exps), 1.0
    kind, factor = scaling.rope_type, scaling.factor
    if kind == "linear":
        return 1.0 / (theta ** exps) / factor, 1.0
    if kind == "dynamic":
        orig = scaling.original_max_position_embeddings
        if seq_len is None:  # HF's init: python floats
            base = theta * ((factor * orig / orig) - (factor - 1)) ** (dim / (dim - 2))
        else:  # HF's forward: seq_len is max(position_ids) + 1, an int64 tensor
            seq = torch.maximum(torch.tensor(seq_len), torch.tensor(orig))
            base = theta * ((factor * seq / orig) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exps), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(dim, theta, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(dim, theta, scaling)
    raise ValueError(f"unknown rope_type {kind!r}")


def _llama3_inv_freq(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    factor, low, high = s.factor, s.low_freq_factor, s.high_freq_factor
    old_context_len = s.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def yarn_attention_factor(s: RopeScaling) -> float:
    """YaRN's cos/sin factor: ``attention_factor`` when given, else from ``factor`` (and ``mscale``s) as HF does."""
    if s.attention_factor is not None:
        return s.attention_factor

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return float(get_mscale(s.factor, s.mscale) / get_mscale(s.factor, s.mscale_all_dim))
    return get_mscale(s.factor)


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    factor, orig = s.factor, s.original_max_position_embeddings
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1
    truncate = True if s.truncate is None else s.truncate

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, yarn_attention_factor(s)


def dynamic_seq_len(scaling: RopeScaling | None, end: int) -> int | None:
    """``end`` when a forward ending at position ``end`` needs dynamic-NTK frequencies of its own, else None."""
    if scaling is None or scaling.rope_type != "dynamic" or end <= scaling.original_max_position_embeddings:
        return None
    return end


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, scaling: RopeScaling | None = None,
                         seq_len: int | None = None, start: int = 0) -> torch.Tensor:
    """Complex a·e^{i m theta_j} for positions start <= m < end and j < dim/2: shape (end - start, dim/2),
    complex64; theta_j and a (1, or yarn's attention factor) from :func:`rope_inv_freq`."""
    inv_freq, scale = rope_inv_freq(dim, theta, scaling, seq_len)
    t = torch.arange(start, end, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (end - start, dim/2)
    return torch.polar(torch.full_like(freqs, scale), freqs)


def dynamic_decode_freqs_cis(dim: int, end: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """For one-token decoding under ``dynamic``: row m is e^{i m theta_j(seq_len = m + 1)}, (end, dim/2) complex.

    A token decoded at position m is a forward ending at m + 1 (HF: ``max(position_ids) + 1``), so each row
    has its own frequencies beyond the original context; below it the rows are plain RoPE's.
    """
    table = precompute_freqs_cis(dim, end, theta, scaling)
    orig = scaling.original_max_position_embeddings
    if end <= orig:
        return table
    pos = torch.arange(orig, end)
    seq = pos + 1
    factor = scaling.factor
    base = theta * ((factor * seq / orig) - (factor - 1)) ** (dim / (dim - 2))  # (n,), as HF per seq_len
    inv = 1.0 / (base[:, None] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)[None, :])
    angles = pos.float()[:, None] * inv
    table[orig:] = torch.polar(torch.ones_like(angles), angles)
    return table


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k. xq: (B, T, H, D), xk: (B, T, Hkv, D); freqs_cis: (T, D/2) complex, or its
    ``view_as_real`` (T, D/2, 2) = (cos, sin).

    NOTE: the rotation is written in real arithmetic (x0·cos − x1·sin, x0·sin + x1·cos on each
    pair), the same numbers as Meta's complex multiply, because torch.compile's inductor cannot
    generate code for complex tensors and runs them as separate eager kernels, unfused. Measured
    (bench/train_throughput.py, stories15M 32x256, CPU): compiled 2,330 -> 2,466 tokens/s, eager
    2,227 -> 2,287.
    """
    if freqs_cis.is_complex():
        cos, sin = freqs_cis.real, freqs_cis.imag
    else:
        q, k = fused.rope(xq, freqs_cis), fused.rope(xk, freqs_cis)  # the fused CPU kernel where it applies
        if q is not None and k is not None:
            return q, k
        cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
    shape = (1, xq.shape[1], 1, xq.shape[-1] // 2)
    cos, sin = cos.reshape(shape), sin.reshape(shape)  # (1, T, 1, D/2)
    return rotate_pairs(xq, cos, sin), rotate_pairs(xk, cos, sin)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) with each adjacent pair (x[2j], x[2j+1]) rotated by (cos, sin), broadcastable to
    (B, T, H, D/2), in fp32 real arithmetic; returned in x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).type_as(x)
