"""Memorization of training data per checkpoint and per data chunk (LLM360; Biderman et al. 2023).

    llamalab eval memorization runs/tiny --k 32 --l 32 --chunks 8 --per-chunk 64

Training sequences are sampled through the run's record: the steps are split into ``--chunks``
equal ranges ("data chunks": which step consumed the data) and ``--per-chunk`` sequences are drawn
(seeded) from the global batches of each range, read back from the shards exactly as the trainer
read them. Each checkpoint is prompted with the first ``k`` tokens of each sequence and greedily
continues ``l`` tokens. Reported per checkpoint and per chunk:
- memorization score: the fraction of the ``l`` tokens reproduced at their position (LLM360's
  definition; the continuation is the model's own, not teacher-forced);
- exactly extractable: sequences with all ``l`` tokens reproduced (Biderman et al.'s
  "memorized", k=32 l=32 in both papers);
- whether the chunk had been trained on at that checkpoint (its steps <= the checkpoint's step).

Outputs: ``RUN/eval/step_XXXXXX/memorization.json`` per checkpoint (per-sequence scores; resumable,
recomputed only when the sample or k/l changes), ``RUN/eval/memorization.json`` (the summary) and
three PNGs: score vs tokens seen, a checkpoint x chunk heatmap and the score histogram of the last
checkpoint. The core (:func:`memorization_scores`, :func:`evaluate_memorization`) takes any
iterable of ``(step, token_ids)``, so it works without a run folder.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from llamalab.common import (
    LlamalabError,
    Progress,
    print0,
    read_json,
    resolve_device,
    resolve_dtype,
    write_json_atomic,
)
from llamalab.eval.sweep import Checkpoint, find_checkpoints, select_every
from llamalab.report.html import refresh_report


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder (runs/<name>)"})
    k: int = field(default=32, metadata={"help": "prompt length in tokens"})
    l: int = field(default=32, metadata={"help": "continuation length compared with the training data"})
    chunks: int = field(default=8, metadata={"help": "number of data chunks (equal ranges of steps)"})
    per_chunk: int = field(default=64, metadata={"help": "sequences sampled per chunk"})
    every: int = field(default=1, metadata={"help": "every Nth checkpoint (the last one always)"})
    batch_size: int = 32
    seed: int = 0
    force: bool = False
    device: str = "auto"
    dtype: str = "auto"
    plots: bool = True

    def validate(self) -> None:
        if not self.run:
            raise LlamalabError("run: give a run folder (llamalab eval memorization RUN)")
        for name in ("k", "l", "chunks", "per_chunk", "every", "batch_size"):
            if getattr(self, name) < 1:
                raise LlamalabError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Sample:
    step: int
    ids: list[int]
    chunk: int = 0


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def memorization_scores(model: torch.nn.Module, sequences: Sequence[Sequence[int]], k: int, l: int,
                        batch_size: int = 32, label: str = "memorization") -> list[float]:
    """Fraction of the ``l`` tokens after a ``k``-token prompt that greedy decoding reproduces."""
    from llamalab.eval.generate_util import generate_ids

    for i, s in enumerate(sequences):
        if len(s) < k + l:
            raise LlamalabError(f"sequence {i} has {len(s)} tokens; k + l = {k + l} are needed")
    if k + l > model.cfg.max_seq_len:
        raise LlamalabError(f"k + l = {k + l} exceeds the model's context ({model.cfg.max_seq_len})")
    out: list[float] = []
    bar = Progress(len(sequences), label, "seq")
    for b in range(0, len(sequences), batch_size):
        batch = [list(s[:k + l]) for s in sequences[b:b + batch_size]]
        gen = generate_ids(model, [s[:k] for s in batch], l)
        for s, g in zip(batch, gen):
            truth = s[k:k + l]
            out.append(sum(int(a == t) for a, t in zip(g, truth)) / l)
        bar.update(len(batch))
    bar.close()
    return out


def summarize(scores: Sequence[float]) -> dict[str, float]:
    n = max(len(scores), 1)
    return {"n": len(scores), "mean_score": sum(scores) / n, "extractable": sum(s == 1.0 for s in scores),
            "extractable_fraction": sum(s == 1.0 for s in scores) / n}


def chunk_bounds(first_step: int, last_step: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous, inclusive step ranges covering [first_step, last_step] (fewer if few steps)."""
    n = last_step - first_step + 1
    chunks = max(1, min(chunks, n))
    edges = [first_step + (n * i) // chunks for i in range(chunks + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(chunks)]


def assign_chunks(samples: list[Sample], bounds: list[tuple[int, int]]) -> list[Sample]:
    for s in samples:
        s.chunk = next((i for i, (a, b) in enumerate(bounds) if a <= s.step <= b), len(bounds) - 1)
    return samples


def evaluate_memorization(model: torch.nn.Module, samples: Sequence[Sample], k: int, l: int,
                          checkpoint_step: int, n_chunks: int, batch_size: int = 32) -> dict:
    """Per-sequence scores, and per-chunk and overall summaries, for one model."""
    scores = memorization_scores(model, [s.ids for s in samples], k, l, batch_size, f"memorization @{checkpoint_step}")
    per_chunk = []
    for c in range(n_chunks):
        idx = [i for i, s in enumerate(samples) if s.chunk == c]
        if not idx:
            continue
        steps = [samples[i].step for i in idx]
        per_chunk.append({"chunk": c, "first_step": min(steps), "last_step": max(steps),
                          "seen": max(steps) <= checkpoint_step, **summarize([scores[i] for i in idx])})
    return {"overall": summarize(scores), "per_chunk": per_chunk, "scores": scores}


# ----------------------------------------------------------------------------- sampling


def sample_sequences(steps: Sequence[int], sequences_at: Callable[[int], Sequence[Sequence[int]]],
                     chunks: int, per_chunk: int, seed: int, min_len: int) -> tuple[list[Sample], list[tuple[int, int]]]:
    """Draw ``per_chunk`` (step, sequence) pairs from each of ``chunks`` equal step ranges (seeded).

    ``sequences_at(step)`` returns the sequences the trainer consumed at ``step``."""
    if not steps:
        raise LlamalabError("no training steps to sample from")
    steps = sorted(set(steps))
    bounds = chunk_bounds(steps[0], steps[-1], chunks)
    rng = random.Random(seed)
    samples: list[Sample] = []
    for c, (a, b) in enumerate(bounds):
        in_chunk = [s for s in steps if a <= s <= b]
        if not in_chunk:
            continue
        picks = sorted(rng.choice(in_chunk) for _ in range(per_chunk))
        cache: dict[int, Sequence[Sequence[int]]] = {}
        for step in picks:
            if step not in cache:
                cache[step] = sequences_at(step)
            seqs = [s for s in cache[step] if len(s) >= min_len]
            if seqs:
                samples.append(Sample(step, [int(t) for t in rng.choice(seqs)[:min_len]], c))
    return samples, bounds


def samples_from_pairs(pairs: Iterable[tuple[int, Sequence[int]]], chunks: int, min_len: int) -> tuple[list[Sample], list[tuple[int, int]]]:
    """Samples from an iterable of ``(step, token_ids)``, chunked by step."""
    samples = [Sample(int(s), [int(t) for t in ids[:min_len]]) for s, ids in pairs if len(ids) >= min_len]
    if not samples:
        raise LlamalabError(f"no training sequence with at least {min_len} tokens")
    bounds = chunk_bounds(min(s.step for s in samples), max(s.step for s in samples), chunks)
    return assign_chunks(samples, bounds), bounds


def run_sequence_source(run: Path) -> tuple[list[int], Callable[[int], list[list[int]]]]:
    """Steps logged in ``metrics.jsonl`` and a function step -> the token windows of its global batch,
    read through the run's data manifest (``llamalab.data.which_step``)."""
    try:
        from llamalab.data.which_step import open_run_dataset
    except ImportError as e:
        raise LlamalabError(f"reading a run's training data needs llamalab.data.which_step ({e})") from None
    path = run / "metrics.jsonl"
    if not path.exists():
        raise LlamalabError(f"{path}: not found (the step -> batch record of the run)")
    batch_of: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LlamalabError(f"{path}:{n}: not valid JSON") from None
            if "step" in row and "batch" in row:
                batch_of[int(row["step"])] = int(row["batch"])
    ds, meta = open_run_dataset(run)
    try:
        global_seqs, seed = int(meta["plan"]["global_seqs"]), int(meta["config"]["seed"])
    except (KeyError, TypeError):
        raise LlamalabError(f"{run / 'meta.json'}: needs plan.global_seqs and config.seed") from None

    def at(step: int) -> list[list[int]]:
        windows = ds.batch_windows(batch_of[step], global_seqs, seed)
        return [ds.tokens(ds.window(w)).tolist() for w in windows]

    return sorted(batch_of), at


# ----------------------------------------------------------------------------- a run


def sample_hash(samples: Sequence[Sample], k: int, l: int) -> str:
    h = hashlib.sha256(f"{k},{l}".encode())
    for s in samples:
        h.update(f"{s.step}:{s.chunk}:{','.join(map(str, s.ids))};".encode())
    return h.hexdigest()[:16]


def memorize_run(run: str | Path, samples: list[Sample], bounds: list[tuple[int, int]], cfg: Config,
                 checkpoints: list[Checkpoint] | None = None) -> dict:
    """Score every selected checkpoint on ``samples`` (resumable) and write the summary and plots."""
    from llamalab.checkpoint import load_model

    run = Path(run)
    ckpts = checkpoints if checkpoints is not None else select_every(find_checkpoints(run), cfg.every)
    if not ckpts:
        raise LlamalabError(f"{run / 'checkpoints'}: no checkpoint (step_*/model)")
    digest = sample_hash(samples, cfg.k, cfg.l)
    dev = resolve_device(cfg.device)
    rows = []
    for n, ck in enumerate(ckpts, start=1):
        out = run / "eval" / ck.name / "memorization.json"
        if out.exists() and not cfg.force and read_json(out, what="memorization result").get("sample_hash") == digest:
            print0(f"memorization {n}/{len(ckpts)} {ck.name}: done, skipped")
            rows.append(read_json(out, what="memorization result"))
            continue
        model, _ = load_model(ck.model, device=dev, dtype=resolve_dtype(cfg.dtype, dev))
        res = evaluate_memorization(model, samples, cfg.k, cfg.l, ck.step, len(bounds), cfg.batch_size)
        res.update(step=ck.step, tokens_seen=ck.tokens_seen, k=cfg.k, l=cfg.l, sample_hash=digest,
                   samples=[{"step": s.step, "chunk": s.chunk} for s in samples])
        write_json_atomic(out, res)
        rows.append(res)
        del model
    summary = {"k": cfg.k, "l": cfg.l, "chunks": [{"chunk": i, "first_step": a, "last_step": b}
                                                   for i, (a, b) in enumerate(bounds)],
               "n_sequences": len(samples), "sample_hash": digest,
               "checkpoints": [{"step": r["step"], "tokens_seen": r["tokens_seen"], **r["overall"],
                                "per_chunk": r["per_chunk"]} for r in rows]}
    write_json_atomic(run / "eval" / "memorization.json", summary)
    if cfg.plots:
        figs = plot_memorization(run, summary, rows[-1]["scores"])
        index_path = run / "eval" / "figures.json"
        index = read_json(index_path, what="figure index") if index_path.exists() else {}
        index["memorization"] = figs
        write_json_atomic(index_path, index)
    return summary


def plot_memorization(run: Path, summary: dict, last_scores: list[float]) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cks = summary["checkpoints"]
    k, l = summary["k"], summary["l"]
    figs = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [c["tokens_seen"] for c in cks]
    ax.plot(x, [c["mean_score"] for c in cks], marker="o", label="mean memorization score")
    ax.plot(x, [c["extractable_fraction"] for c in cks], marker="s", label="exactly extractable")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("fraction")
    ax.set_title(f"memorization (k={k}, l={l})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "eval" / "memorization_curve.png", dpi=110)
    plt.close(fig)
    figs.append({"path": "memorization_curve.png", "caption": f"mean memorization score and fraction of exactly "
                 f"extractable sequences vs tokens seen ({summary['n_sequences']} sampled training sequences)"})

    n_chunks = len(summary["chunks"])
    grid = [[float("nan")] * n_chunks for _ in cks]
    for i, c in enumerate(cks):
        for pc in c["per_chunk"]:
            grid[i][pc["chunk"]] = pc["mean_score"]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(cks) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_yticks(range(len(cks)), [str(c["step"]) for c in cks])
    ax.set_xticks(range(n_chunks), [f"{c['first_step']}-{c['last_step']}" for c in summary["chunks"]], rotation=45)
    ax.set_xlabel("data chunk (steps that consumed it)")
    ax.set_ylabel("checkpoint step")
    fig.colorbar(im, ax=ax, label="memorization score")
    fig.tight_layout()
    fig.savefig(run / "eval" / "memorization_chunks.png", dpi=110)
    plt.close(fig)
    figs.append({"path": "memorization_chunks.png", "caption": "mean memorization score per checkpoint (rows) "
                 "and data chunk (columns, by the steps that consumed it)"})

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(last_scores, bins=[i / l for i in range(l + 2)], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("memorization score")
    ax.set_ylabel("sequences")
    ax.set_title(f"score distribution at step {cks[-1]['step']}")
    fig.tight_layout()
    fig.savefig(run / "eval" / "memorization_hist.png", dpi=110)
    plt.close(fig)
    figs.append({"path": "memorization_hist.png", "caption": "distribution of memorization scores at the last checkpoint"})
    return figs


def print_summary(summary: dict) -> None:
    print0(f"{'step':>8} {'tokens':>12} {'mean score':>10} {'extractable':>11}")
    for c in summary["checkpoints"]:
        print0(f"{c['step']:>8} {c['tokens_seen']:>12,} {c['mean_score']:>10.4f} {c['extractable']:>6}/{c['n']:<4}")


def main(cfg: Config) -> dict:
    cfg.validate()
    t0 = time.perf_counter()
    run = Path(cfg.run)
    steps, at = run_sequence_source(run)
    samples, bounds = sample_sequences(steps, at, cfg.chunks, cfg.per_chunk, cfg.seed, cfg.k + cfg.l)
    if not samples:
        raise LlamalabError(f"{run}: no training sequence of at least k + l = {cfg.k + cfg.l} tokens")
    print0(f"memorization: {len(samples)} training sequences from {len(bounds)} chunks of steps {steps[0]}..{steps[-1]}")
    summary = memorize_run(run, samples, bounds, cfg)
    print_summary(summary)
    print0(f"memorization done in {time.perf_counter() - t0:.1f}s: {len(summary['checkpoints'])} checkpoint(s), "
           f"{len(samples)} sequences; results in {run / 'eval'}/")
    refresh_report(Path(cfg.run))
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
