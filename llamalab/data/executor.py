"""Run a stage's per-shard tasks: resumable, in-process, in local processes, or on Ray / Spark.

A *task* is a picklable dict with at least ``"name"`` (unique within the stage, used for its done
marker) and ``"index"``. The task function ``fn(task) -> dict`` writes the shard's outputs itself
(to paths derived from the task, atomically) and returns a small JSON-able result (counts, a
ledger). The executor then writes the done marker ``<stage_dir>/_done/<name>.json`` holding that
result, atomically: a shard whose marker exists is finished, its result is read back and it is
not run again. A crash mid-shard leaves no marker (and at worst a ``.tmp`` file), so the shard is
redone from scratch on the next run.

Identical output whatever the executor: a task's output depends only on its own input and on
files the driver prepared before the stage (models, hash tables); results are returned in task
order, never in completion order.

Executors:
- ``local`` with ``workers=1``: a plain loop in this process (debuggable, no pickling);
- ``local`` with ``workers>1``: a ``multiprocessing`` pool (fork on Linux);
- ``ray``: ``ray.remote`` tasks (``ray.init()`` starts a local cluster unless ``RAY_ADDRESS`` is
  set); ``spark``: ``sc.parallelize(tasks, len(tasks)).map(fn).collect()`` on
  ``SparkContext.getOrCreate()``. Both are imported only when chosen. Every worker must see the
  same filesystem paths (a shared disk): the adapters move tasks and results, not data.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, Progress, read_json, write_json_atomic

EXECUTORS = ("local", "ray", "spark")


def marker_path(stage_dir: str | Path, name: str) -> Path:
    return Path(stage_dir) / "_done" / f"{name.replace('/', '__')}.json"


def is_done(stage_dir: str | Path, name: str) -> bool:
    return marker_path(stage_dir, name).exists()


def _run_and_mark(args: tuple[Callable[[dict], dict], dict, str]) -> dict:
    fn, task, stage_dir = args
    result = fn(task)
    write_json_atomic(marker_path(stage_dir, task["name"]), {"task": task["name"], "result": result})
    return result


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LlamalabError(f"executor {extra!r} needs the {module!r} package, which is not installed: "
                            f"pip install {extra}  (or use --executor local)") from None


def run_tasks(fn: Callable[[dict], dict], tasks: Sequence[dict], stage_dir: str | Path, executor: str = "local",
              workers: int = 1, label: str = "tasks", describe: Callable[[dict], str] | None = None) -> list[dict]:
    """Run the unfinished ``tasks`` and return every task's result, in task order.

    ``describe(result)`` (called in this process as each result arrives) returns text for the
    progress line, e.g. cumulative documents/s and MB/s.
    """
    if executor not in EXECUTORS:
        raise LlamalabError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers < 1:
        raise LlamalabError(f"workers must be >= 1, got {workers}")
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise LlamalabError("executor: task names must be unique (they name the done markers)")
    stage_dir = Path(stage_dir)
    results: dict[str, dict] = {}
    pending = []
    for t in tasks:
        m = marker_path(stage_dir, t["name"])
        if m.exists():
            results[t["name"]] = read_json(m, what="done marker")["result"]
        else:
            pending.append(t)
    bar = Progress(len(tasks), label, unit="shards")
    if len(pending) < len(tasks):
        bar.update(len(tasks) - len(pending), extra=f"({len(tasks) - len(pending)} already done)")
    args = [(fn, t, str(stage_dir)) for t in pending]
    for name, res in zip([t["name"] for t in pending], _dispatch(args, executor, workers, bar, describe)):
        results[name] = res
    bar.close()
    return [results[n] for n in names]


def _dispatch(args: list[tuple], executor: str, workers: int, bar: Progress,
              describe: Callable[[dict], str] | None = None) -> list[dict]:
    if not args:
        return []

    def done(res: dict) -> None:
        bar.update(1, extra=describe(res) if describe else "")

    if executor == "ray":
        return _run_ray(args, bar)
    if executor == "spark":
        return _run_spark(args, bar)
    if workers == 1 or len(args) == 1:
        out = []
        for a in args:
            out.append(_run_and_mark(a))
            done(out[-1])
        return out
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(args))) as pool:
        out = []
        for res in pool.imap(_run_and_mark, args):  # imap: results in submission order
            out.append(res)
            done(res)
        return out


def _run_ray(args: list[tuple], bar: Progress) -> list[dict]:
    ray = _require("ray", "ray")
    started = not ray.is_initialized()
    if started:
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(_run_and_mark)
        refs = [remote.remote(a) for a in args]
        out = ray.get(refs)
        bar.update(len(out))
        return out
    finally:
        if started:
            ray.shutdown()


def _run_spark(args: list[tuple], bar: Progress) -> list[dict]:
    pyspark = _require("pyspark", "pyspark")
    sc = pyspark.SparkContext.getOrCreate()
    out = sc.parallelize(args, len(args)).map(_run_and_mark).collect()
    bar.update(len(out))
    return out


def clear_stage(stage_dir: str | Path) -> int:
    """Remove a stage's done markers (forces a full re-run); returns how many were removed."""
    d = Path(stage_dir) / "_done"
    n = 0
    if d.exists():
        for m in d.glob("*.json"):
            m.unlink()
            n += 1
    return n


def task_result(stage_dir: str | Path, name: str) -> Any:
    return read_json(marker_path(stage_dir, name), what="done marker")["result"]
