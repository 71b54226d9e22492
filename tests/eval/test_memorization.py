"""Memorization: a tiny model trained to overfit a few sequences reproduces them, not unseen ones;
per-checkpoint and per-chunk reports on a run folder; resumable."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llamalab.eval.memorization import (
    chunk_bounds,
    memorization_scores,
    memorize_run,
    sample_sequences,
    samples_from_pairs,
)
from llamalab.model import ModelConfig, Transformer

K, L = 12, 16


@pytest.fixture(scope="module")
def overfit():
    """(initial model, trained model, seen sequences, unseen sequences)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 64, (12, K + L), generator=g)
    seen, unseen = seqs[:6], seqs[6:]
    model = Transformer(cfg)
    init = Transformer(cfg)
    init.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(250):
        logits = model(seen[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), seen[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return init.eval(), model.eval(), seen.tolist(), unseen.tolist()


def test_trained_sequences_are_memorized_unseen_are_not(overfit):
    init, model, seen, unseen = overfit
    s_seen = memorization_scores(model, seen, K, L, batch_size=4)
    s_unseen = memorization_scores(model, unseen, K, L, batch_size=4)
    s_init = memorization_scores(init, seen, K, L)
    assert len(s_seen) == 6 and all(0.0 <= s <= 1.0 for s in s_seen + s_unseen)
    assert sum(s_seen) / 6 > 0.95 and sum(s == 1.0 for s in s_seen) >= 5
    assert sum(s_unseen) / 6 < 0.15 and not any(s == 1.0 for s in s_unseen)
    assert sum(s_init) / 6 < 0.15


def test_score_is_fraction_of_reproduced_tokens(overfit):
    _, model, seen, _ = overfit
    s = seen[0]
    base = memorization_scores(model, [s], K, L)[0]
    assert base == 1.0
    # a reference whose last 4 tokens differ from what the model reproduces scores 12/16
    changed = s[:K + L - 4] + [(t + 1) % 64 for t in s[K + L - 4:]]
    assert memorization_scores(model, [changed], K, L)[0] == pytest.approx(12 / 16)


def test_chunk_bounds_and_sampling():
    assert chunk_bounds(1, 100, 4) == [(1, 25), (26, 50), (51, 75), (76, 100)]
    assert chunk_bounds(1, 3, 8) == [(1, 1), (2, 2), (3, 3)]
    data = {s: [[s * 1000 + i] * 40 for i in range(3)] for s in range(1, 41)}
    samples, bounds = sample_sequences(list(data), lambda s: data[s], chunks=4, per_chunk=5, seed=0, min_len=30)
    assert len(samples) == 20 and len(bounds) == 4
    for smp in samples:
        a, b = bounds[smp.chunk]
        assert a <= smp.step <= b and len(smp.ids) == 30 and smp.ids[0] // 1000 == smp.step
    again, _ = sample_sequences(list(data), lambda s: data[s], chunks=4, per_chunk=5, seed=0, min_len=30)
    assert [(s.step, s.ids) for s in again] == [(s.step, s.ids) for s in samples]


def _fake_run(tmp_path, init, model):
    from llamalab.model.folder import save_model

    run = tmp_path / "run"
    for step, m, tokens in ((0, init, 0), (4, model, 4 * 6 * (K + L))):
        d = run / "checkpoints" / f"step_{step:06d}"
        save_model(d / "model", m)
        (d / "state.json").write_text(json.dumps({"step": step, "tokens_seen": tokens}))
    return run


def test_memorization_per_checkpoint_and_chunk(overfit, tmp_path, capsys):
    init, model, seen, unseen = overfit
    run = _fake_run(tmp_path, init, model)
    # the memorized sequences were consumed at steps 1-4 (chunk 0), the others belong to later steps 5-8
    pairs = [(1 + i % 4, s) for i, s in enumerate(seen)] + [(5 + i % 4, s) for i, s in enumerate(unseen)]
    samples, bounds = samples_from_pairs(pairs, chunks=2, min_len=K + L)
    assert bounds == [(1, 4), (5, 8)]
    opts = dict(batch_size=8, device="cpu", dtype="fp32")
    summary = memorize_run(run, samples, bounds, K, L, **opts)
    first, last = summary["checkpoints"]
    assert (first["step"], last["step"]) == (0, 4)
    c0, c1 = last["per_chunk"]
    assert c0["seen"] and not c1["seen"]
    assert c0["mean_score"] > 0.95 and c0["extractable"] >= 5
    assert c1["mean_score"] < 0.15 and c1["extractable"] == 0
    assert first["mean_score"] < 0.15
    for png in ("memorization_curve.png", "memorization_chunks.png", "memorization_hist.png"):
        assert (run / "eval" / png).stat().st_size > 1000
    figs = json.loads((run / "eval" / "figures.json").read_text())["memorization"]
    assert {f["path"] for f in figs} == {"memorization_curve.png", "memorization_chunks.png", "memorization_hist.png"}
    per = json.loads((run / "eval" / "step_000004" / "memorization.json").read_text())
    assert len(per["scores"]) == 12
    # resumable: a second pass recomputes nothing
    capsys.readouterr()
    again = memorize_run(run, samples, bounds, K, L, **opts)
    assert "skipped" in capsys.readouterr().out and again["checkpoints"] == summary["checkpoints"]


def test_too_short_sequence_is_an_error(overfit):
    from llamalab.common import LlamalabError

    _, model, seen, _ = overfit
    with pytest.raises(LlamalabError, match="sequence 1 has 10 tokens"):
        memorization_scores(model, [seen[0], seen[1][:10]], K, L)
