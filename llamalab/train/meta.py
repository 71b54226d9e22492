"""``meta.json``: how a training run was made, written by pretraining and SFT alike (LLM360).

One record per run folder: the resolved config, the model shape, the data by path and sha256, the
git SHA and package versions, plus what the stage adds (plan, world size, strategy, device...).
A restart (``--resume``, possibly on another world size or with changed flags) rewrites the record
and appends the previous invocation's config, plan, git SHA, world size and strategy to
``history``, so a resized or re-configured run shows it.

Trade-off: the data are hashed in full at every start (seconds for a manifest, longer for large
SFT files) so the record names exactly the bytes trained on; the token shards themselves are
covered by the manifest, which holds their checksums.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamalab.common import git_sha, is_rank0, package_versions, sha256_file, write_json_atomic
from llamalab.model.config import ModelConfig
from llamalab.run_dir import RunDir

HISTORY_KEYS = ("config", "plan", "git_sha", "world_size", "strategy")  # kept per earlier invocation


def shards_record(data_root: str | Path) -> dict[str, str]:
    """The token shards trained on: their folder and the sha256 of its manifest (which hashes each shard)."""
    from llamalab.data.shards import MANIFEST

    root = Path(data_root)
    return {"path": str(root.resolve()), "manifest_sha256": sha256_file(root / MANIFEST)}


def files_record(paths: Sequence[str | Path]) -> dict[str, list[dict[str, str]]]:
    """Data files trained on (SFT): each by resolved path and sha256."""
    return {"files": [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in paths]}


def run_meta(config: dict[str, Any], model_cfg: ModelConfig, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The record's fields: ``config`` (the resolved stage config as JSON), model shape, ``data``, git
    SHA, versions, then ``extra`` (plan, world_size, strategy, device, dtype, n_params, ...)."""
    return {"config": config, "model": dataclasses.asdict(model_cfg), "data": data, "git_sha": git_sha(),
            "versions": package_versions(), **extra}


def write_meta(run: RunDir, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``meta.json`` on rank 0, carrying over the history of earlier invocations; returns ``meta``."""
    if not is_rank0():
        return meta
    history: list[dict[str, Any]] = []
    if run.meta.exists():
        prev = json.loads(run.meta.read_text())
        history = prev.get("history", []) + [{k: prev[k] for k in HISTORY_KEYS if k in prev}]
    write_json_atomic(run.meta, {**meta, "history": history})
    return meta
