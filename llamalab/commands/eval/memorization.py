"""Memorization of training data per checkpoint and data chunk (LLM360; Biderman et al. 2023).

    llamalab eval memorization runs/tiny --k 32 --l 32 --chunks 8 --per-chunk 64

Samples ``--per-chunk`` training sequences from each of ``--chunks`` equal step ranges of the run
(read back exactly as the trainer read them), prompts every checkpoint with their first k tokens
and compares its greedy l-token continuation with the data. Writes ``RUN/eval/memorization.json``,
per-checkpoint results (resumable) and three PNGs; refreshes the run report. ``--model`` scores other
models instead (any path the loader reads: a model folder, an HF folder, a .gguf export), each into
``RUN/eval/model-<name>/``. Details:
:mod:`llamalab.eval.memorization`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, print0
from llamalab.eval.memorization import memorize_run, print_summary, run_sequence_source, sample_sequences
from llamalab.eval.sweep import model_checkpoint
from llamalab.report.html import refresh_report
from llamalab.run_dir import RunDir


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder (runs/<name>)"})
    model: list[str] = field(default_factory=list, metadata={
        "help": "models to score instead of the run's checkpoints: a model folder, an HF folder or a .gguf file "
                "(an export of the run, say); taken as trained through the run's last step"})
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


def main(cfg: Config) -> dict:
    cfg.validate()
    t0 = time.perf_counter()
    run = RunDir(cfg.run)
    steps, at = run_sequence_source(run.root)
    samples, bounds = sample_sequences(steps, at, cfg.chunks, cfg.per_chunk, cfg.seed, cfg.k + cfg.l)
    if not samples:
        raise LlamalabError(f"{run.root}: no training sequence of at least k + l = {cfg.k + cfg.l} tokens")
    print0(f"memorization: {len(samples)} training sequences from {len(bounds)} chunks "
           f"of steps {steps[0]}..{steps[-1]}")
    models = [model_checkpoint(m, steps[-1]) for m in cfg.model] or None
    summary = memorize_run(run.root, samples, bounds, cfg.k, cfg.l, every=cfg.every, batch_size=cfg.batch_size,
                           force=cfg.force, device=cfg.device, dtype=cfg.dtype, plots=cfg.plots, checkpoints=models)
    print_summary(summary)
    print0(f"memorization done in {time.perf_counter() - t0:.1f}s: {len(summary['checkpoints'])} checkpoint(s), "
           f"{len(samples)} sequences; results in {run.eval}/")
    refresh_report(Path(cfg.run))
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
