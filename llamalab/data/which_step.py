"""Which data did a training step read? Shard ranges and documents of a run's global batch at STEP.

The answer is computed from the run's record alone: the seed and batch size in ``meta.json``, the
batch index that ``metrics.jsonl`` logged for the step (batches skipped by the stability guard
shift the mapping), and the manifest in ``data/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, read_json
from llamalab.data.shards import TokenDataset


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder"})
    step: int = field(default=1, metadata={"positional": True, "help": "optimizer step (1-based)"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


def batch_index_for_step(run: Path, step: int) -> int:
    path = run / "metrics.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("step") == step and "batch" in row:
                    return int(row["batch"])
    raise LlamalabError(f"{path}: no record of step {step} (the run has not reached it?)")


def open_run_dataset(run: Path) -> tuple[TokenDataset, dict]:
    meta = read_json(run / "meta.json", what="run meta.json")
    plan = meta["plan"]
    data_root = Path(meta["data"]["path"])
    if not (data_root / "manifest.json").exists():
        data_root = run / "data"
    return TokenDataset.open(data_root, "train", plan["seq_len"]), meta


def step_windows(run: str | Path, step: int) -> tuple[TokenDataset, list[int]]:
    """The dataset and global window indices read at ``step``."""
    run = Path(run)
    ds, meta = open_run_dataset(run)
    b = batch_index_for_step(run, step)
    return ds, ds.batch_windows(b, meta["plan"]["global_seqs"], meta["config"]["seed"])


def which_step(run: str | Path, step: int) -> dict:
    ds, windows = step_windows(run, step)
    return {"step": step, "batch": batch_index_for_step(Path(run), step),
            "windows": [ds.describe_window(i) for i in windows]}


def main(cfg: Config) -> dict:
    out = which_step(cfg.run, cfg.step)
    if cfg.json:
        print(json.dumps(out, indent=2))
        return out
    print(f"step {out['step']} read global batch {out['batch']} ({len(out['windows'])} sequences):")
    for w in out["windows"]:
        docs = "; ".join(f"{d['id']} ({d['provenance']})" for d in w["documents"][:3])
        more = f" +{len(w['documents']) - 3} more" if len(w["documents"]) > 3 else ""
        print(f"  {w['shard']} [{w['start']}:{w['end']})  {docs}{more}")
    return out


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
