"""Sampling parameters and the per-step choice of the next token for a batch of rows.

Each row carries its own parameters and its own ``torch.Generator`` (seeded per request), so a
request gives the same tokens whether it runs alone or batched with others. The common case, all
rows greedy without penalties, is a single ``argmax``; other rows are processed one by one (a
batch here is at most a few dozen rows, and per-row parameters differ anyway).

Order of operations (as in Hugging Face / vLLM): repetition penalty (Keskar et al. 2019: divide
positive logits, multiply negative ones, over prompt and generated tokens), OpenAI presence and
frequency penalties (generated tokens only), temperature, top-k, top-p (nucleus, Holtzman et al.
2020, keeping at least one token), then a draw. Log-probabilities reported to the caller are those
of the model's own distribution (log-softmax of the raw logits, before any of the above), which is
what scoring harnesses expect.

Numerical safety: every accepted value samples without NaN. A sampled row is processed in float64
(a float32 ``1e-300`` is 0), the logits are shifted so that their maximum is 0 *before* dividing by
the temperature (so a tiny temperature sends the others to ``-inf`` and the best stays 0: the greedy
limit, ties shared), and a penalty that overflows is clamped to the largest finite value. A row whose
logits are NaN (a broken model) raises :class:`LlamalabError` for that row only; ``choose`` reports
such a row through ``on_error`` instead of failing the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from llamalab.common import LlamalabError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the top k
    prompt_logprobs: int | None = None  # same, for the prompt tokens (echo scoring)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> "SamplingParams":
        """Raise LlamalabError naming the first bad field."""
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"in [0, {MAX_LOGPROBS}]"),
            ("stop", len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
             "at most 16 non-empty strings"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise LlamalabError(f"{name} must be {want}, got {getattr(self, name)!r}")
        return self


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def apply_penalties(logits: torch.Tensor, p: SamplingParams, counts: torch.Tensor,
                    prompt_seen: torch.Tensor) -> torch.Tensor:
    """One row: logits (V,), counts (V,) of generated tokens, prompt_seen (V,) bool (float64 out)."""
    logits = logits.double()
    if p.repetition_penalty != 1.0:
        seen = prompt_seen | (counts > 0)
        pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        c = counts.double()
        logits = logits - p.frequency_penalty * c - p.presence_penalty * (c > 0).double()
    return logits


def row_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution one row is drawn from (float64, sums to 1): temperature, top-k, top-p.

    Safe for every accepted value (see the module docstring); raises LlamalabError on NaN logits.
    """
    x = logits.double()
    if bool(torch.isnan(x).any()):
        raise LlamalabError("sampling: the model produced NaN logits")
    x = x.clamp(max=torch.finfo(torch.float64).max)  # an overflowing penalty: +inf -> largest finite
    top = x.max()
    if not bool(torch.isfinite(top)):
        raise LlamalabError("sampling: every logit is -inf")
    x = (x - top) / p.temperature  # <= 0; the best token(s) stay exactly 0 for any temperature > 0
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p  # mass before this token already >= top_p (never the first)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, idx, sorted_x)
    return x.softmax(-1)


def sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Temperature, top-k, top-p and a draw for one row of (already penalised) logits (V,)."""
    if p.greedy:
        if bool(torch.isnan(logits).any()):
            raise LlamalabError("sampling: the model produced NaN logits")
        return int(logits.argmax())
    return int(torch.multinomial(row_probs(logits, p), 1, generator=gen))


def choose(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator],
           counts: torch.Tensor, prompt_seen: torch.Tensor,
           on_error: Callable[[int, Exception], None] | None = None) -> list[int]:
    """Next token of each row: logits (n, V); counts / prompt_seen (n, V) for penalties.

    With ``on_error``, a row that fails calls ``on_error(row, exception)`` and gets token -1; the
    other rows are sampled as if it were not there (each row has its own generator). Without it the
    exception propagates.
    """
    if all(p.greedy and not p.penalised for p in params) and not bool(torch.isnan(logits).any()):
        return logits.argmax(-1).tolist()
    out = []
    for i, p in enumerate(params):
        try:
            row = logits[i]
            if p.penalised:
                row = apply_penalties(row, p, counts[i], prompt_seen[i])
            out.append(sample_row(row, p, gens[i]))
        except Exception as e:  # noqa: BLE001 - reported per row; the batch goes on
            if on_error is None:
                raise
            on_error(i, e)
            out.append(-1)
    return out


def top_logprobs(logits: torch.Tensor, chosen: list[int], ks: list[int | None]
                 ) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per row: (log-prob of the chosen token, [(id, log-prob)] of the top k) or None when not asked."""
    if all(k is None for k in ks):
        return [None] * len(ks)
    lp = torch.log_softmax(logits.float(), dim=-1)
    out: list[tuple[float, list[tuple[int, float]]] | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        top: list[tuple[int, float]] = []
        if k > 0:
            v, ix = torch.topk(lp[i], k)
            top = list(zip(ix.tolist(), v.tolist()))
        out.append((float(lp[i, chosen[i]]), top))
    return out
