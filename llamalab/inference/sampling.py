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
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """One row: logits (V,), counts (V,) of generated tokens, prompt_seen (V,) bool."""
    if p.repetition_penalty != 1.0:
        seen = prompt_seen | (counts > 0)
        pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Temperature, top-k, top-p and a draw for one row of (already penalised) logits (V,)."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p  # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def choose(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator],
           counts: torch.Tensor, prompt_seen: torch.Tensor) -> list[int]:
    """Next token of each row: logits (n, V); counts / prompt_seen (n, V) for penalties."""
    if all(p.greedy and not p.penalised for p in params):
        return logits.argmax(-1).tolist()
    out = []
    for i, p in enumerate(params):
        row = logits[i]
        if p.penalised:
            row = apply_penalties(row, p, counts[i], prompt_seen[i])
        out.append(sample_row(row, p, gens[i]))
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
