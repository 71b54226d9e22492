"""Evaluate every checkpoint of a run and plot metric vs tokens seen (LLM360's curves for Amber).

Checkpoints are the run's ``checkpoints/step_*`` folders (:func:`llamalab.train.checkpoint.list_checkpoints`)
holding a ``model/`` folder and a ``state.json`` (``step``, ``tokens_seen``). Results go to
``RUN/eval/step_XXXXXX/<task>.json`` (:meth:`llamalab.run_dir.RunDir.eval_result`) in the format of
``llamalab eval run``. Resumable: a result whose data file (sha256), limit and few-shot setting
match is kept and not recomputed (``force`` recomputes), so the sweep can follow a training run
that is still writing checkpoints. :func:`write_curves` gathers every result into
``RUN/eval/curves.json``, plots ``RUN/eval/curve_<task>.png`` against tokens seen and lists the
figures with captions in ``RUN/eval/figures.json`` for the run report. The command is
:mod:`llamalab.commands.eval.sweep`.

Trade-off: one checkpoint is loaded at a time (memory bounded by one model), tasks run one after
another on it; checkpoints are not evaluated in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llamalab.common import LlamalabError, print0, read_json, sha256_file, write_json_atomic
from llamalab.eval.run import MAIN_METRIC, EvalSettings, evaluate_task, load_for_eval
from llamalab.eval.tasks import Task
from llamalab.run_dir import RunDir

CURVES = "curves.json"


@dataclass
class Checkpoint:
    """A model to evaluate: a checkpoint of the run (``step_N/model``), or one given by path (``label`` names its
    results folder; ``step``/``tokens_seen`` None when the model does not record them)."""

    step: int | None
    tokens_seen: int | None
    model: Path
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.model.parent.name


def model_checkpoint(path: str | Path, default_step: int | None = None) -> Checkpoint:
    """Any model the loader reads (a model or run folder, a Hugging Face folder, a .gguf file) as a
    :class:`Checkpoint` labelled ``model-<name>``: a llamalab folder's recorded ``step``/``tokens_seen`` (a
    checkpoint's model records them), else ``default_step`` and no token count."""
    from llamalab.model.folder import detect_format, read_config_json, resolve_model_path

    p = Path(path)
    kind = detect_format(p)
    step = tokens = None
    if kind in ("llamalab", "run"):
        p = resolve_model_path(p)
        meta = read_config_json(p / "config.json")
        step, tokens = meta.get("step"), meta.get("tokens_seen")
    name = p.stem if p.is_file() else (p.parent.name if p.name == "model" else p.name)
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return Checkpoint(step if ok(step) else default_step, tokens if ok(tokens) else None, p, f"model-{name}")


def find_checkpoints(run: str | Path) -> list[Checkpoint]:
    """Finished checkpoints of a run (with ``model/`` and ``state.json``), in step order."""
    from llamalab.train.checkpoint import list_checkpoints

    rd = RunDir(run)
    if not rd.root.is_dir():
        raise LlamalabError(f"run folder not found: {rd.root}")
    out = []
    for folder in list_checkpoints(rd.checkpoints):
        model = folder / "model"
        if not (model / "config.json").exists():
            continue  # not a model checkpoint (or an incomplete copy)
        state = read_json(folder / "state.json", what="checkpoint state")
        try:
            out.append(Checkpoint(int(state["step"]), int(state["tokens_seen"]), model))
        except (KeyError, TypeError, ValueError):
            raise LlamalabError(f"{folder / 'state.json'}: needs integer fields 'step' and 'tokens_seen'") from None
    return sorted(out, key=lambda c: c.step)


def select_every(ckpts: list[Checkpoint], every: int) -> list[Checkpoint]:
    chosen = ckpts[::every]
    if ckpts and chosen[-1] is not ckpts[-1]:
        chosen.append(ckpts[-1])
    return chosen


def result_is_current(path: Path, data_path: str, settings: EvalSettings) -> bool:
    """True when ``path`` holds a finished result for the same data file and settings."""
    if not path.exists():
        return False
    try:
        old = read_json(path, what="eval result")
    except LlamalabError:
        return False  # unreadable: recompute
    opts = old.get("options", {})
    return (old.get("sha256") == sha256_file(data_path) and opts.get("limit") == settings.limit
            and opts.get("num_fewshot") == settings.num_fewshot
            and opts.get("max_new_tokens") == settings.max_new_tokens)


def sweep(run: str | Path, tasks: Sequence[Task], paths: Sequence[str], settings: EvalSettings, *,
          fewshot_paths: Sequence[str] = (), every: int = 1, force: bool = False, device: str = "auto",
          dtype: str = "auto", models: Sequence[str | Path] = ()) -> list[dict[str, Any]]:
    """Evaluate ``tasks`` (data file ``paths[i]`` each) on every ``every``-th checkpoint; returns the
    new results (the ones already current are skipped, not returned).

    ``models`` (any path the loader reads: a model folder, an HF folder, a .gguf export of the run ...) are
    evaluated instead of the checkpoints, each into ``RUN/eval/model-<name>/``; one that records no step (not a
    checkpoint's model) stays out of the curves."""
    rd = RunDir(run)
    ckpts = [model_checkpoint(m) for m in models] or select_every(find_checkpoints(rd.root), every)
    if not ckpts:
        raise LlamalabError(f"{rd.checkpoints}: no checkpoint (step_*/model) to evaluate")
    recorded = {"fewshot_path": list(fewshot_paths), "device": device, "dtype": dtype}
    done: list[dict[str, Any]] = []
    skipped = 0
    for n, ck in enumerate(ckpts, start=1):
        todo = [(i, t) for i, t in enumerate(tasks)
                if force or not result_is_current(rd.eval_result(ck.name, t.name), paths[i], settings)]
        skipped += len(tasks) - len(todo)
        if not todo:
            print0(f"sweep {n}/{len(ckpts)} {ck.name}: all {len(tasks)} task(s) done, skipped")
            continue
        seen = f"{ck.tokens_seen:,} tokens" if ck.tokens_seen is not None else str(ck.model)
        print0(f"sweep {n}/{len(ckpts)} {ck.name} ({seen}): {len(todo)} task(s)")
        loaded = load_for_eval(ck.model, device, dtype)
        for i, task in todo:
            res = evaluate_task(loaded.model, loaded.tokenizer, task, paths[i], settings,
                                fewshot_paths[i] if fewshot_paths else "", options=recorded)
            res["model"] = str(ck.model)
            if ck.step is not None and ck.tokens_seen is not None:  # a point on the curves
                res.update(step=ck.step, tokens_seen=ck.tokens_seen)
            write_json_atomic(rd.eval_result(ck.name, task.name), res)
            done.append(res)
        del loaded
    print0(f"sweep: {len(done)} result(s) computed, {skipped} already done, {len(ckpts)} checkpoint(s)")
    return done


# ----------------------------------------------------------------------------- curves


NOT_CURVES = ("tokens", "bytes", "words", "documents")  # perplexity totals, not scores


def collect_curves(run: str | Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{task: {metric: [{step, tokens_seen, value}, ...]}} from every ``eval/step_*/<task>.json``."""
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    for f in sorted(RunDir(run).eval.glob("*/*.json")):
        r = read_json(f, what="eval result")
        if "step" not in r or "metrics" not in r:
            continue  # not a task result of a checkpoint (memorization scores, say)
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)) and not k.endswith("_stderr") and k not in NOT_CURVES:
                curves.setdefault(r["task"], {}).setdefault(k, []).append(
                    {"step": r["step"], "tokens_seen": r["tokens_seen"], "value": float(v),
                     "stderr": float(r["metrics"].get(f"{k}_stderr", 0.0))})
    for metrics in curves.values():
        for pts in metrics.values():
            pts.sort(key=lambda p: p["step"])
    return curves


PLOTTED = ("acc", "acc_norm", "bits_per_byte", "exact_match", "f1", "exact_match_strict", "exact_match_flexible")


def plot_curves(run: str | Path, curves: dict[str, dict[str, list[dict[str, float]]]]) -> list[dict[str, str]]:
    """One PNG per task (its metrics vs tokens seen, with ±1 stderr bands); returns figure entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for task, metrics in sorted(curves.items()):
        names = [m for m in metrics if m in PLOTTED or m.startswith(("pass@", "maj@"))]
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
        fig.savefig(RunDir(run).eval_file(name), dpi=110)
        plt.close(fig)
        main = MAIN_METRIC.get("multiple_choice") if "acc_norm" in metrics else names[0]
        figs.append({"path": name, "task": task,
                     "caption": f"{task}: {', '.join(names)} vs tokens seen ({len(metrics[names[0]])} checkpoints; "
                                f"main metric {main})"})
    return figs


def write_curves(run: str | Path, plots: bool = True) -> dict[str, Any]:
    """``eval/curves.json`` from every result, and (``plots``) one PNG per task listed in ``figures.json``."""
    rd = RunDir(run)
    curves = collect_curves(rd.root)
    write_json_atomic(rd.eval_file(CURVES), curves)
    add_figures(rd.root, "curves", plot_curves(rd.root, curves) if plots and curves else [])
    return curves


def add_figures(run: str | Path, key: str, figures: list[dict[str, str]]) -> None:
    """Record ``figures`` (path + caption entries) under ``key`` in ``eval/figures.json``, read by the run report."""
    path = RunDir(run).eval_figures
    index = read_json(path, what="figure index") if path.exists() else {}
    index[key] = figures
    write_json_atomic(path, index)


def curve_table(curves: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """task, metric, value at the first and the last evaluated checkpoint."""
    rows = [f"{'task':<18} {'metric':<22} {'first':>9} {'last':>9} {'points':>6}"]
    for task, metrics in sorted(curves.items()):
        for m, pts in metrics.items():
            rows.append(f"{task:<18} {m:<22} {pts[0]['value']:>9.4f} {pts[-1]['value']:>9.4f} {len(pts):>6}")
    return "\n".join(rows)
