"""Evaluate every checkpoint of a run and plot metric vs tokens seen (LLM360's curves for Amber).

    llamalab eval sweep runs/tiny --task arc_easy,perplexity --path ARC-Easy-Dev.jsonl,heldout.txt

Checkpoints are found as ``RUN/checkpoints/step_*/model`` (a model folder) with ``state.json``
(``step``, ``tokens_seen``). Results go to ``RUN/eval/step_XXXXXX/<task>.json`` in the format of
``llamalab eval run``. Resumable: a result whose data file (sha256), limit and few-shot setting
match is kept and not recomputed (``--force`` recomputes), so the sweep can follow a training run
that is still writing checkpoints. At the end ``RUN/eval/curves.json`` gathers every result and
``RUN/eval/curve_<task>.png`` plots the task's metrics against tokens seen; ``RUN/eval/figures.json``
lists the figures with captions for the run report.

Trade-off: one checkpoint is loaded at a time (memory bounded by one model), tasks run one after
another on it; checkpoints are not evaluated in parallel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0, read_json, write_json_atomic
from llamalab.eval.run import MAIN_METRIC, evaluate_task, load_model_and_tokenizer
from llamalab.eval.run import Config as RunConfig
from llamalab.eval.tasks import get_task
from llamalab.report.html import refresh_report


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder (runs/<name>)"})
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
    device: str = "auto"
    dtype: str = "auto"
    plots: bool = field(default=True, metadata={"help": "write PNG curves (needs matplotlib)"})

    def run_config(self) -> RunConfig:
        return RunConfig(model="-", task=self.task, path=self.path, fewshot_path=self.fewshot_path,
                         num_fewshot=self.num_fewshot, limit=self.limit, batch_size=self.batch_size,
                         max_new_tokens=self.max_new_tokens, timeout=self.timeout, output="",
                         device=self.device, dtype=self.dtype)

    def validate(self) -> None:
        if not self.run:
            raise LlamalabError("run: give a run folder (llamalab eval sweep RUN --task ... --path ...)")
        if self.every < 1:
            raise LlamalabError(f"every must be >= 1, got {self.every}")
        self.run_config().check_tasks()


@dataclass
class Checkpoint:
    step: int
    tokens_seen: int
    model: Path

    @property
    def name(self) -> str:
        return self.model.parent.name


def find_checkpoints(run: str | Path) -> list[Checkpoint]:
    """Checkpoints of a run in step order (``checkpoints/step_*/model`` + ``state.json``)."""
    run = Path(run)
    if not run.is_dir():
        raise LlamalabError(f"run folder not found: {run}")
    out = []
    for model in sorted((run / "checkpoints").glob("step_*/model")):
        if ".tmp-" in model.parent.name or not (model / "config.json").exists():
            continue  # being written
        state = read_json(model.parent / "state.json", what="checkpoint state")
        try:
            out.append(Checkpoint(int(state["step"]), int(state["tokens_seen"]), model))
        except (KeyError, TypeError, ValueError):
            raise LlamalabError(f"{model.parent / 'state.json'}: needs integer fields 'step' and 'tokens_seen'") from None
    return sorted(out, key=lambda c: c.step)


def select_every(ckpts: list[Checkpoint], every: int) -> list[Checkpoint]:
    chosen = ckpts[::every]
    if ckpts and chosen[-1] is not ckpts[-1]:
        chosen.append(ckpts[-1])
    return chosen


def result_is_current(path: Path, data_path: str, cfg: RunConfig) -> bool:
    """True when ``path`` holds a finished result for the same data file and settings."""
    from llamalab.common import sha256_file

    if not path.exists():
        return False
    try:
        old = read_json(path, what="eval result")
    except LlamalabError:
        return False  # unreadable: recompute
    opts = old.get("options", {})
    return (old.get("sha256") == sha256_file(data_path) and opts.get("limit") == cfg.limit
            and opts.get("num_fewshot") == cfg.num_fewshot and opts.get("max_new_tokens") == cfg.max_new_tokens)


def sweep(cfg: Config) -> list[dict[str, Any]]:
    """Evaluate the selected checkpoints; returns the new results (skipped ones are not returned)."""
    run = Path(cfg.run)
    rc = cfg.run_config()
    tasks = [get_task(t, cfg.num_fewshot) for t in cfg.task]
    ckpts = select_every(find_checkpoints(run), cfg.every)
    if not ckpts:
        raise LlamalabError(f"{run / 'checkpoints'}: no checkpoint (step_*/model) to evaluate")
    done: list[dict[str, Any]] = []
    skipped = 0
    for n, ck in enumerate(ckpts, start=1):
        todo = [(i, t) for i, t in enumerate(tasks)
                if cfg.force or not result_is_current(run / "eval" / ck.name / f"{t.name}.json", cfg.path[i], rc)]
        skipped += len(tasks) - len(todo)
        if not todo:
            print0(f"sweep {n}/{len(ckpts)} {ck.name}: all {len(tasks)} task(s) done, skipped")
            continue
        print0(f"sweep {n}/{len(ckpts)} {ck.name} ({ck.tokens_seen:,} tokens): {len(todo)} task(s)")
        model, tok = load_model_and_tokenizer(ck.model, cfg.device, cfg.dtype)
        for i, task in todo:
            res = evaluate_task(model, tok, task, cfg.path[i], rc, cfg.fewshot_path[i] if cfg.fewshot_path else "")
            res.update(model=str(ck.model), step=ck.step, tokens_seen=ck.tokens_seen)
            write_json_atomic(run / "eval" / ck.name / f"{task.name}.json", res)
            done.append(res)
        del model
    print0(f"sweep: {len(done)} result(s) computed, {skipped} already done, {len(ckpts)} checkpoint(s)")
    return done


# ----------------------------------------------------------------------------- curves


def collect_curves(run: str | Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{task: {metric: [{step, tokens_seen, value}, ...]}} from every ``eval/step_*/<task>.json``."""
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    for f in sorted(Path(run, "eval").glob("step_*/*.json")):
        if f.name == "memorization.json":
            continue
        r = read_json(f, what="eval result")
        if "step" not in r or "metrics" not in r:
            continue
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)) and not k.endswith("_stderr") and k not in ("tokens", "bytes", "words", "documents"):
                curves.setdefault(r["task"], {}).setdefault(k, []).append(
                    {"step": r["step"], "tokens_seen": r["tokens_seen"], "value": float(v),
                     "stderr": float(r["metrics"].get(f"{k}_stderr", 0.0))})
    for metrics in curves.values():
        for pts in metrics.values():
            pts.sort(key=lambda p: p["step"])
    return curves


def plot_curves(run: str | Path, curves: dict[str, dict[str, list[dict[str, float]]]]) -> list[dict[str, str]]:
    """One PNG per task (its metrics vs tokens seen, with ±1 stderr bands); returns figure entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for task, metrics in sorted(curves.items()):
        names = [m for m in metrics if m in ("acc", "acc_norm", "bits_per_byte", "exact_match", "f1",
                                             "exact_match_strict", "exact_match_flexible") or m.startswith(("pass@", "maj@"))]
        names = names or list(metrics)[:3]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m in names:
            pts = metrics[m]
            x = [p["tokens_seen"] for p in pts]
            y = [p["value"] for p in pts]
            se = [p["stderr"] for p in pts]
            ax.plot(x, y, marker="o", label=m)
            ax.fill_between(x, [a - b for a, b in zip(y, se)], [a + b for a, b in zip(y, se)], alpha=0.15)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(task)
        ax.set_title(f"{task} over training")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        name = f"curve_{task}.png"
        fig.savefig(Path(run, "eval", name), dpi=110)
        plt.close(fig)
        main = MAIN_METRIC.get("multiple_choice") if "acc_norm" in metrics else names[0]
        figs.append({"path": name, "task": task,
                     "caption": f"{task}: {', '.join(names)} vs tokens seen ({len(metrics[names[0]])} checkpoints; "
                                f"main metric {main})"})
    return figs


def write_curves(run: str | Path, plots: bool = True) -> dict[str, Any]:
    run = Path(run)
    curves = collect_curves(run)
    write_json_atomic(run / "eval" / "curves.json", curves)
    figs = plot_curves(run, curves) if plots and curves else []
    index_path = run / "eval" / "figures.json"
    index = read_json(index_path, what="figure index") if index_path.exists() else {}
    index["curves"] = figs
    write_json_atomic(index_path, index)
    return curves


def curve_table(curves: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """task, metric, value at the first and the last evaluated checkpoint."""
    rows = [f"{'task':<18} {'metric':<22} {'first':>9} {'last':>9} {'points':>6}"]
    for task, metrics in sorted(curves.items()):
        for m, pts in metrics.items():
            rows.append(f"{task:<18} {m:<22} {pts[0]['value']:>9.4f} {pts[-1]['value']:>9.4f} {len(pts):>6}")
    return "\n".join(rows)


def main(cfg: Config) -> list[dict[str, Any]]:
    cfg.validate()
    t0 = time.perf_counter()
    new = sweep(cfg)
    curves = write_curves(cfg.run, cfg.plots)
    print0(curve_table(curves))
    print0(f"sweep done in {time.perf_counter() - t0:.1f}s: {len(new)} new result(s); curves in {Path(cfg.run) / 'eval'}/")
    refresh_report(Path(cfg.run))
    return new


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
