"""Evaluate every checkpoint of a run and plot metric vs tokens seen (LLM360's curves for Amber).

    llamalab eval sweep runs/tiny --task arc_easy,perplexity --path ARC-Easy-Dev.jsonl,heldout.txt

Results go to ``RUN/eval/step_XXXXXX/<task>.json`` in the format of ``llamalab eval run``;
resumable (a current result is kept; ``--force`` recomputes), so the sweep can follow a training
run that is still writing checkpoints. At the end ``RUN/eval/curves.json``, ``curve_<task>.png``
and ``figures.json`` are rewritten and the run report refreshed. ``--model`` evaluates other models
instead (any path the loader reads: a model folder, an HF folder, a .gguf export), each into
``RUN/eval/model-<name>/``. Details: :mod:`llamalab.eval.sweep`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0
from llamalab.eval.run import EvalSettings, check_task_files
from llamalab.eval.sweep import curve_table, sweep, write_curves
from llamalab.eval.tasks import get_task
from llamalab.report.html import refresh_report
from llamalab.run_dir import RunDir


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder (runs/<name>)"})
    model: list[str] = field(default_factory=list, metadata={
        "help": "models to evaluate instead of the run's checkpoints: a model folder, an HF folder or a .gguf file; "
                "results in RUN/eval/model-<name>/"})
    task: list[str] = field(default_factory=list, metadata={"help": "comma-separated task names or .json files"})
    path: list[str] = field(default_factory=list, metadata={"help": "data file per task (same order)"})
    fewshot_path: list[str] = field(default_factory=list, metadata={"help": "few-shot file per task"})
    num_fewshot: int = -1
    limit: int = field(default=0, metadata={"help": "first N items of each task (0: all)"})
    every: int = field(default=1, metadata={"help": "evaluate every Nth checkpoint (the last one always)"})
    force: bool = field(default=False, metadata={"help": "recompute results that already exist"})
    batch_size: int = 16
    max_new_tokens: int = 0
    timeout: float = 10.0
    allow_unsandboxed: bool = field(default=False, metadata={
        "help": "run HumanEval programs without OS isolation where namespaces are unavailable (unsafe; "
                "or LLAMALAB_ALLOW_UNSANDBOXED=1)"})
    device: str = "auto"
    dtype: str = "auto"
    plots: bool = field(default=True, metadata={"help": "write PNG curves (needs matplotlib)"})

    def settings(self) -> EvalSettings:
        return EvalSettings(num_fewshot=self.num_fewshot, limit=self.limit, batch_size=self.batch_size,
                            max_new_tokens=self.max_new_tokens, timeout=self.timeout,
                            allow_unsandboxed=self.allow_unsandboxed)

    def validate(self) -> None:
        if not self.run:
            raise LlamalabError("run: give a run folder (llamalab eval sweep RUN --task ... --path ...)")
        if self.every < 1:
            raise LlamalabError(f"every must be >= 1, got {self.every}")
        check_task_files(self.task, self.path, self.fewshot_path)


def main(cfg: Config) -> list[dict[str, Any]]:
    cfg.validate()
    t0 = time.perf_counter()
    tasks = [get_task(t, cfg.num_fewshot) for t in cfg.task]
    new = sweep(cfg.run, tasks, cfg.path, cfg.settings(), fewshot_paths=cfg.fewshot_path, every=cfg.every,
                force=cfg.force, device=cfg.device, dtype=cfg.dtype, models=cfg.model)
    curves = write_curves(cfg.run, cfg.plots)
    print0(curve_table(curves))
    print0(f"sweep done in {time.perf_counter() - t0:.1f}s: {len(new)} new result(s); "
           f"curves in {RunDir(cfg.run).eval}/")
    refresh_report(Path(cfg.run))
    return new


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
