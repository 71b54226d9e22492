"""Which data did a training step read? The read order of a run, rebuilt from its record.

The answer needs nothing but the run folder: the seed and global batch size in ``meta.json``, the
batch index that ``metrics.jsonl`` logged for the step, and the shard manifest. The logged batch
index matters: batches skipped by the stability guard (a loss spike, a NaN) shift the mapping, so
step ``s`` is not simply batch ``s - 1``. The order itself is :meth:`TokenDataset.batch_windows`,
the same function the trainer feeds from, so the answer cannot drift from what was trained on.

Used by ``llamalab data which-step`` and by memorization evaluation (which re-reads the exact
sequences a checkpoint saw).
"""

from __future__ import annotations

from pathlib import Path

from llamalab.common import LlamalabError, iter_jsonl, read_json
from llamalab.data.shards import MANIFEST, TokenDataset
from llamalab.run_dir import RunDir


def batch_indices(run: str | Path) -> dict[int, int]:
    """Optimizer step (1-based) -> the global batch index the run logged for it (metrics.jsonl)."""
    path = RunDir(run).metrics
    if not path.exists():
        raise LlamalabError(f"{path}: not found (the step -> batch record of the run)")
    with open(path, encoding="utf-8") as f:
        return {int(row["step"]): int(row["batch"]) for _, row in iter_jsonl(f, path)
                if isinstance(row, dict) and "step" in row and "batch" in row}


def batch_index_for_step(run: str | Path, step: int) -> int:
    """The global batch index the run logged for optimizer step ``step`` (1-based)."""
    batch = batch_indices(run).get(step)
    if batch is None:
        raise LlamalabError(f"{RunDir(run).metrics}: no record of step {step} (the run has not reached it?)")
    return batch


def open_run_dataset(run: str | Path) -> tuple[TokenDataset, dict]:
    """The run's train split (the data path its meta.json names, else the copy in the run's
    ``data/``) and the run's meta."""
    rd = RunDir(run)
    meta = read_json(rd.meta, what="run meta.json")
    data_root = Path(meta["data"]["path"])
    if not (data_root / MANIFEST).exists():
        data_root = rd.data
    return TokenDataset.open(data_root, "train", meta["plan"]["seq_len"]), meta


def _read_at(run: str | Path, step: int) -> tuple[TokenDataset, int, list[int]]:
    ds, meta = open_run_dataset(run)
    b = batch_index_for_step(run, step)
    return ds, b, ds.batch_windows(b, meta["plan"]["global_seqs"], meta["config"]["seed"])


def step_windows(run: str | Path, step: int) -> tuple[TokenDataset, list[int]]:
    """The dataset and global window indices read at ``step``."""
    ds, _, windows = _read_at(run, step)
    return ds, windows


def which_step(run: str | Path, step: int) -> dict:
    """``{"step", "batch", "windows": [shard, token range, documents of each sequence]}``."""
    ds, b, windows = _read_at(run, step)
    return {"step": step, "batch": b, "windows": [ds.describe_window(i) for i in windows]}


def format_step(info: dict, max_docs: int = 3) -> str:
    """A :func:`which_step` answer as lines: one per sequence, its first ``max_docs`` documents."""
    lines = [f"step {info['step']} read global batch {info['batch']} ({len(info['windows'])} sequences):"]
    for w in info["windows"]:
        docs = "; ".join(f"{d['id']} ({d['provenance']})" for d in w["documents"][:max_docs])
        more = f" +{len(w['documents']) - max_docs} more" if len(w["documents"]) > max_docs else ""
        lines.append(f"  {w['shard']} [{w['start']}:{w['end']})  {docs}{more}")
    return "\n".join(lines)
