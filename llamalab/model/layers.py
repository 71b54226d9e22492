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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init: WeightInit) -> None:
        """Gate and up at ``init.std``; the down projection writes the residual: ``init.resid_std``."""
        init.normal_(self.w1.weight, init.std)
        init.normal_(self.w2.weight, init.resid_std)
        init.normal_(self.w3.weight, init.std)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex e^{i m theta_j} for positions m < end and j < dim/2: shape (end, dim/2), complex64."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (end, dim/2)
    return torch.polar(torch.ones_like(freqs), freqs)


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
        cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
    shape = (1, xq.shape[1], 1, xq.shape[-1] // 2)
    cos, sin = cos.reshape(shape), sin.reshape(shape)  # (1, T, 1, D/2)
    return _rotate(xq, cos, sin), _rotate(xk, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).type_as(x)
