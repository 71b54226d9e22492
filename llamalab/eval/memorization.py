"""Memorization of training data per checkpoint and per data chunk (LLM360; Biderman et al. 2023).

Training sequences are sampled through the run's record: the steps are split into ``chunks``
equal ranges ("data chunks": which step consumed the data) and ``per_chunk`` sequences are drawn
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
iterable of ``(step, token_ids)``, so it works without a run folder. The command is
:mod:`llamalab.commands.eval.memorization`.

Continuations are decoded by the inference engine (the sampler of ``generate`` and ``serve``) on
token ids only: checkpoints are loaded without their tokenizer, and EOS is an ordinary token (a
training sequence may hold one mid-window), so every continuation is exactly ``l`` tokens long.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from llamalab.common import LlamalabError, Progress, print0, read_json, write_json_atomic
from llamalab.data.order import batch_indices, open_run_dataset
from llamalab.eval.sweep import Checkpoint, add_figures, find_checkpoints, select_every
from llamalab.run_dir import RunDir

MEMORIZATION = "memorization"  # eval/memorization.json (summary), eval/<checkpoint>/memorization.json
Bounds = list[tuple[int, int]]  # inclusive (first step, last step) of each data chunk


@dataclass
class Sample:
    step: int
    ids: list[int]
    chunk: int = 0


# ----------------------------------------------------------------------------- scoring


class _IdsOnly:
    """The engine's tokenizer for id-only decoding: no text, no EOS (a memorized continuation may hold one)."""

    bos_id = eos_id = -1
    vocab_size = 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise LlamalabError("memorization decodes token ids only")

    def decode(self, ids: Sequence[int]) -> str:
        return ""

    def id_to_piece(self, i: int) -> str:
        return ""


def memorization_scores(model: torch.nn.Module, sequences: Sequence[Sequence[int]], k: int, l: int,
                        batch_size: int = 32, label: str = "memorization") -> list[float]:
    """Fraction of the ``l`` tokens after a ``k``-token prompt that greedy decoding reproduces.

    The continuation is decoded by :class:`llamalab.inference.engine.Engine` (``batch_size`` rows at a
    time, EOS an ordinary token), the sampler of ``generate`` and ``serve``."""
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    for i, s in enumerate(sequences):
        if len(s) < k + l:
            raise LlamalabError(f"sequence {i} has {len(s)} tokens; k + l = {k + l} are needed")
    if k + l > model.cfg.max_seq_len:
        raise LlamalabError(f"k + l = {k + l} exceeds the model's context ({model.cfg.max_seq_len})")
    engine = Engine(model, _IdsOnly(), slots=max(1, min(batch_size, len(sequences))))
    greedy = SamplingParams(max_tokens=l, temperature=0.0, ignore_eos=True)
    out: list[float] = []
    bar = Progress(len(sequences), label, "seq")
    for b in range(0, len(sequences), batch_size):
        batch = [list(s[:k + l]) for s in sequences[b:b + batch_size]]
        for s, gen in zip(batch, engine.generate([s[:k] for s in batch], greedy)):
            out.append(sum(int(a == t) for a, t in zip(gen.token_ids, s[k:])) / l)
        bar.update(len(batch))
    bar.close()
    return out


def summarize(scores: Sequence[float]) -> dict[str, float]:
    n = max(len(scores), 1)
    return {"n": len(scores), "mean_score": sum(scores) / n, "extractable": sum(s == 1.0 for s in scores),
            "extractable_fraction": sum(s == 1.0 for s in scores) / n}


def chunk_bounds(first_step: int, last_step: int, chunks: int) -> Bounds:
    """``chunks`` contiguous, inclusive step ranges covering [first_step, last_step] (fewer if few steps)."""
    n = last_step - first_step + 1
    chunks = max(1, min(chunks, n))
    edges = [first_step + (n * i) // chunks for i in range(chunks + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(chunks)]


def assign_chunks(samples: list[Sample], bounds: Bounds) -> list[Sample]:
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
                     chunks: int, per_chunk: int, seed: int, min_len: int) -> tuple[list[Sample], Bounds]:
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


def samples_from_pairs(pairs: Iterable[tuple[int, Sequence[int]]], chunks: int,
                       min_len: int) -> tuple[list[Sample], Bounds]:
    """Samples from an iterable of ``(step, token_ids)``, chunked by step."""
    samples = [Sample(int(s), [int(t) for t in ids[:min_len]]) for s, ids in pairs if len(ids) >= min_len]
    if not samples:
        raise LlamalabError(f"no training sequence with at least {min_len} tokens")
    bounds = chunk_bounds(min(s.step for s in samples), max(s.step for s in samples), chunks)
    return assign_chunks(samples, bounds), bounds


def run_sequence_source(run: str | Path) -> tuple[list[int], Callable[[int], list[list[int]]]]:
    """Steps logged in ``metrics.jsonl`` and a function step -> the token windows of its global batch,
    read through the run's data manifest (:mod:`llamalab.data.order`, as ``llamalab data which-step``)."""

    rd = RunDir(run)
    batch_of = batch_indices(rd.root)
    ds, meta = open_run_dataset(rd.root)
    try:
        global_seqs, seed = int(meta["plan"]["global_seqs"]), int(meta["config"]["seed"])
    except (KeyError, TypeError):
        raise LlamalabError(f"{rd.meta}: needs plan.global_seqs and config.seed") from None

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


def memorize_run(run: str | Path, samples: list[Sample], bounds: Bounds, k: int, l: int, *,
                 every: int = 1, batch_size: int = 32, force: bool = False, device: str = "auto",
                 dtype: str = "auto", plots: bool = True, checkpoints: list[Checkpoint] | None = None) -> dict:
    """Score every ``every``-th checkpoint (or ``checkpoints``) on ``samples`` and write the per-checkpoint
    results, the summary and (``plots``) the figures. Resumable: a checkpoint whose result was made
    from the same sample and k/l is read back, not recomputed (``force`` recomputes)."""
    from llamalab.model.folder import load

    rd = RunDir(run)
    ckpts = checkpoints if checkpoints is not None else select_every(find_checkpoints(rd.root), every)
    if not ckpts:
        raise LlamalabError(f"{rd.checkpoints}: no checkpoint (step_*/model)")
    digest = sample_hash(samples, k, l)
    rows = []
    for n, ck in enumerate(ckpts, start=1):
        out = rd.eval_result(ck.name, MEMORIZATION)
        if out.exists() and not force and read_json(out, what="memorization result").get("sample_hash") == digest:
            print0(f"memorization {n}/{len(ckpts)} {ck.name}: done, skipped")
            rows.append(read_json(out, what="memorization result"))
            continue
        if ck.step is None:
            raise LlamalabError(f"{ck.model}: records no training step; give it one (model_checkpoint(path, step))")
        model = load(ck.model, device, dtype, with_tokenizer=False).model
        res = evaluate_memorization(model, samples, k, l, ck.step, len(bounds), batch_size)
        res.update(step=ck.step, tokens_seen=ck.tokens_seen, k=k, l=l, sample_hash=digest,
                   samples=[{"step": s.step, "chunk": s.chunk} for s in samples])
        if ck.label:  # a model given by path (an export, an HF folder): named in the summary
            res["model"] = str(ck.model)
        write_json_atomic(out, res)
        rows.append(res)
        del model
    summary = {"k": k, "l": l, "chunks": [{"chunk": i, "first_step": a, "last_step": b}
                                         for i, (a, b) in enumerate(bounds)],
               "n_sequences": len(samples), "sample_hash": digest,
               "checkpoints": [{"step": r["step"], "tokens_seen": r["tokens_seen"], **r["overall"],
                                "per_chunk": r["per_chunk"], **({"model": r["model"]} if r.get("model") else {})}
                               for r in rows]}
    write_json_atomic(rd.eval_file(f"{MEMORIZATION}.json"), summary)
    if plots:
        add_figures(rd.root, MEMORIZATION, plot_memorization(rd.root, summary, rows[-1]["scores"]))
    return summary


def plot_memorization(run: str | Path, summary: dict, last_scores: list[float]) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cks = summary["checkpoints"]
    k, n_cont = summary["k"], summary["l"]
    figs = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    by_tokens = all(c["tokens_seen"] is not None for c in cks)  # models given by path may not record them
    x = [c["tokens_seen"] if by_tokens else c["step"] for c in cks]
    ax.plot(x, [c["mean_score"] for c in cks], marker="o", label="mean memorization score")
    ax.plot(x, [c["extractable_fraction"] for c in cks], marker="s", label="exactly extractable")
    ax.set_xlabel("tokens seen" if by_tokens else "step")
    ax.set_ylabel("fraction")
    ax.set_title(f"memorization (k={k}, l={n_cont})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RunDir(run).eval_file("memorization_curve.png"), dpi=110)
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
    fig.savefig(RunDir(run).eval_file("memorization_chunks.png"), dpi=110)
    plt.close(fig)
    figs.append({"path": "memorization_chunks.png", "caption": "mean memorization score per checkpoint (rows) "
                 "and data chunk (columns, by the steps that consumed it)"})

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(last_scores, bins=[i / n_cont for i in range(n_cont + 2)], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("memorization score")
    ax.set_ylabel("sequences")
    ax.set_title(f"score distribution at step {cks[-1]['step']}")
    fig.tight_layout()
    fig.savefig(RunDir(run).eval_file("memorization_hist.png"), dpi=110)
    plt.close(fig)
    figs.append({"path": "memorization_hist.png",
                 "caption": "distribution of memorization scores at the last checkpoint"})
    return figs


def print_summary(summary: dict) -> None:
    print0(f"{'step':>8} {'tokens':>12} {'mean score':>10} {'extractable':>11}")
    for c in summary["checkpoints"]:
        seen = f"{c['tokens_seen']:>12,}" if c["tokens_seen"] is not None else f"{'?':>12}"
        print0(f"{c['step']:>8} {seen} {c['mean_score']:>10.4f} {c['extractable']:>6}/{c['n']:<4}"
               + (f"  {c['model']}" if c.get("model") else ""))
