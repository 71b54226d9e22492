"""Sampling is numerically safe for every value the server accepts, and still the distribution of the reference.

The reference is Hugging Face's logits processors (repetition penalty, temperature, top-k, top-p, applied in
that order by ``generate``); the extremes (``1e-300``, the smallest subnormal) must give a finite distribution
that is the greedy limit, where a float32 computation gives NaN.
"""

from __future__ import annotations

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.inference.sampling import SamplingParams, apply_penalties, choose, make_generator, row_probs

V = 200


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 4


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=17), dict(top_p=0.8),
                                dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)])
def test_distribution_matches_transformers(kw):
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    p = SamplingParams(**kw)
    logits = _logits(1)
    seen_ids = torch.tensor([3, 7, 11, int(logits.argmax())])
    seen = torch.zeros(V, dtype=torch.bool)
    seen[seen_ids] = True
    ours = row_probs(apply_penalties(logits, p, torch.zeros(V), seen) if p.penalised else logits, p)

    x, ids = logits[None].clone(), seen_ids[None]
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    ref = x.softmax(-1)[0].double()
    assert transformers is not None
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()


EXTREMES = [dict(temperature=1e-300), dict(repetition_penalty=1e-300), dict(top_p=1e-300),
            dict(temperature=5e-324), dict(temperature=1e-300, repetition_penalty=1e-300, top_p=1e-300, top_k=1),
            dict(repetition_penalty=10.0, presence_penalty=-2.0, frequency_penalty=2.0, temperature=2.0),
            dict(repetition_penalty=5e-324, temperature=2.0)]


@pytest.mark.parametrize("kw", EXTREMES, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw in EXTREMES])
def test_extreme_values_sample_without_nan(kw):
    p = SamplingParams(**kw).validate()
    logits = torch.stack([_logits(s) for s in range(4)])
    counts = torch.zeros(4, V)
    counts[:, :5] = 3
    seen = torch.zeros(4, V, dtype=torch.bool)
    seen[:, 5:9] = True
    toks = choose(logits, [p] * 4, [make_generator(s) for s in range(4)], counts, seen)
    assert all(0 <= t < V for t in toks)
    for i in range(4):
        row = apply_penalties(logits[i], p, counts[i], seen[i]) if p.penalised else logits[i]
        probs = row_probs(row, p)
        assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-9
        if p.temperature < 1e-200 or p.top_p < 1e-200:  # the greedy limit: all mass on the best (penalised) token
            assert float(probs[int(row.argmax())]) == pytest.approx(1.0) and toks[i] == int(row.argmax())


def test_float32_would_have_failed():
    """The case the server hit: in float32, 1e-300 is 0 and the distribution is NaN (so the fix is not vacuous)."""
    x = _logits()
    assert torch.isnan((x / torch.tensor(1e-300, dtype=torch.float32)).softmax(-1)).any()


def test_nan_logits_fail_one_row_only():
    logits = torch.stack([_logits(0), torch.full((V,), float("nan")), _logits(2)])
    p = SamplingParams(temperature=0.8, seed=1)
    errors: dict[int, Exception] = {}
    toks = choose(logits, [p] * 3, [make_generator(s) for s in range(3)], torch.zeros(3, V),
                  torch.zeros(3, V, dtype=torch.bool), on_error=errors.__setitem__)
    assert list(errors) == [1] and isinstance(errors[1], LlamalabError) and toks[1] == -1
    alone = choose(logits[[0, 2]], [p] * 2, [make_generator(0), make_generator(2)], torch.zeros(2, V),
                   torch.zeros(2, V, dtype=torch.bool))
    assert [toks[0], toks[2]] == alone  # the other rows drew exactly what they draw without the bad one
    with pytest.raises(LlamalabError, match="NaN"):
        choose(logits, [p] * 3, [make_generator(s) for s in range(3)], torch.zeros(3, V),
               torch.zeros(3, V, dtype=torch.bool))
