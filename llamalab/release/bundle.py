"""Build the release bundle of a run (``llamalab release RUN --output DIR``).

The bundle is itself a run folder (the :class:`~llamalab.run_dir.RunDir` layout: meta.json,
metrics.jsonl, logbook.jsonl, checkpoints/, data/, tokenizer/, model/, eval/, report.html), so every
tool that reads a run reads it, plus what a reader outside llamalab needs::

    README.md           the model card (Hugging Face front matter), written from the records below
    release.json        the index: final step, checkpoint table, formats, data mode, device type
    hf/                 the final model as a Hugging Face LLaMA folder (transformers loads it)
    model.gguf          the final model as GGUF
    hf_checkpoints/     every kept checkpoint as HF folders (only with ``hf_checkpoints=True``)
    data/steps.json     the chunk -> step map: which shard token ranges each logged step read
    data/*.bin          the token shards (without ``include_data``: only the manifest's hashes + recipe)
    checksums.sha256    sha256 of every other file (``sha256sum -c checksums.sha256`` works)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, iter_jsonl, print0, read_json, sha256_file, write_json_atomic
from llamalab.run_dir import RunDir

CARD = "README.md"
INDEX = "release.json"
HF_DIR = "hf"
GGUF_FILE = "model.gguf"
HF_CHECKPOINTS = "hf_checkpoints"
STEPS_MAP = "steps.json"  # under data/
CHECKSUMS = "checksums.sha256"
FORMAT = "llamalab-release"
VERSION = 1
STATE_FILE = "state.json"  # a checkpoint's training state (llamalab.train.checkpoint)
MODEL_SUBDIR = "model"  # a checkpoint's model folder
WEIGHTS = "model.safetensors"


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    """The rows of the run's metrics.jsonl (an error naming the file and line when one is not JSON)."""
    if not run.metrics.exists():
        return []
    with open(run.metrics, encoding="utf-8") as f:
        return [row for _, row in iter_jsonl(f, run.metrics) if isinstance(row, dict)]


def device_type(device: str | None) -> str:
    """``cuda:0`` -> ``cuda``."""
    return str(device or "cpu").split(":")[0]


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _copy_tree(src: Path, dst: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file():
            _copy_file(f, dst / f.relative_to(src))


def _data_root(run: RunDir, meta: dict[str, Any]) -> Path | None:
    """The run's shard folder: the path meta.json names when its manifest matches the run's copy, else None."""
    path = (meta.get("data") or {}).get("path")
    if not path or not (Path(path) / "manifest.json").exists():
        return None
    if run.manifest.exists() and sha256_file(Path(path) / "manifest.json") != sha256_file(run.manifest):
        return None
    return Path(path)


def _merge_ranges(reads: list[tuple[str, int, int]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for shard, start, end in sorted(reads):
        if out and out[-1][0] == shard and out[-1][2] >= start:
            out[-1][2] = max(out[-1][2], end)
        else:
            out.append([shard, start, end])
    return out


def steps_map(data_root: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For every logged step: the global batch it read and the shard token ranges ``[file, start, end)``
    (merged where contiguous), from the same ``batch_windows`` the trainer fed from."""
    from llamalab.data.shards import TokenDataset

    plan, seed = meta["plan"], meta["config"]["seed"]
    ds = TokenDataset.open(data_root, "train", plan["seq_len"])
    steps: dict[str, Any] = {}
    for row in rows:
        if "step" not in row or "batch" not in row:
            continue
        reads = []
        for i in ds.batch_windows(int(row["batch"]), plan["global_seqs"], seed):
            d = ds.describe_window(i)
            reads.append((d["shard"], int(d["start"]), int(d["end"])))
        steps[str(int(row["step"]))] = {"batch": int(row["batch"]), "reads": _merge_ranges(reads)}
    return {"seq_len": plan["seq_len"], "global_seqs": plan["global_seqs"], "seed": seed,
            "note": "ranges are [shard file, first token, end token) of the train split", "steps": steps}


def checkpoint_table(run: RunDir, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """step -> tokens seen -> val loss (logged at that step, else None) -> sha256 of the weights."""
    val = {int(r["step"]): r["val_loss"] for r in rows if "step" in r and r.get("val_loss") is not None}
    table = []
    for ck in run.list_checkpoints():
        state = read_json(ck / STATE_FILE, what="checkpoint state")
        weights = ck / MODEL_SUBDIR / WEIGHTS
        table.append({"step": int(state["step"]), "tokens_seen": int(state["tokens_seen"]),
                      "val_loss": val.get(int(state["step"])), "path": f"checkpoints/{ck.name}",
                      "sha256": sha256_file(weights) if weights.exists() else None})
    return table


def write_checksums(root: Path) -> Path:
    """``checksums.sha256`` over every file under ``root`` (sha256sum format, relative paths, sorted)."""
    lines = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel == CHECKSUMS:
            continue
        lines.append(f"{sha256_file(f)}  {rel}\n")
    out = root / CHECKSUMS
    out.write_text("".join(lines), encoding="utf-8")
    return out


def _dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _export_formats(bundle: RunDir, gguf: bool) -> dict[str, Any]:
    from llamalab.interop.hf import export_folder

    formats: dict[str, Any] = {"llamalab": MODEL_SUBDIR}
    export_folder(bundle.model, bundle / HF_DIR)
    formats["hf"] = HF_DIR
    if gguf:
        from llamalab.interop.gguf import export_gguf_folder

        export_gguf_folder(bundle.model, bundle / GGUF_FILE, "f16")
        formats["gguf"] = GGUF_FILE
        formats["gguf_type"] = "f16"
    return formats


def build_release(run: str | Path, output: str | Path, *, include_data: bool = True, hf_checkpoints: bool = False,
                  gguf: bool = True) -> Path:
    """Package the run folder ``run`` as a release bundle in ``output`` (a new or empty folder); returns it."""
    from llamalab.release.card import write_card

    t0 = time.perf_counter()
    src, out = RunDir(run), Path(output)
    if not src.meta.exists():
        raise LlamalabError(f"{src.meta}: not found ({src.root} is not a pretraining run folder)")
    if out.exists() and any(out.iterdir()):
        raise LlamalabError(f"{out}: exists and is not empty; choose a new --output")
    if out.resolve() == src.root.resolve() or src.root.resolve() in out.resolve().parents:
        raise LlamalabError(f"{out}: the bundle cannot be written inside the run folder {src.root}")
    meta = read_json(src.meta, what="run meta.json")
    rows = read_metrics(src)
    checkpoints = src.list_checkpoints()
    if not checkpoints:
        raise LlamalabError(f"{src.checkpoints}: no checkpoint to release")
    dst = RunDir(out)
    out.mkdir(parents=True, exist_ok=True)

    # the record
    for f in (src.meta, src.metrics, src.logbook, src.report, src.summary, src.samples):
        if f.exists():
            _copy_file(f, dst / f.name)
    if src.eval.is_dir():
        _copy_tree(src.eval, dst.eval)
    if src.tokenizer_dir.is_dir():
        _copy_tree(src.tokenizer_dir, dst.tokenizer_dir)
    # weights: every kept checkpoint whole (model/, state, optimizer, RNG: what a resume needs), the final model
    for ck in checkpoints:
        _copy_tree(ck, dst.checkpoint(int(ck.name.split("_")[1])))
    final_src = src.model if (src.model / "config.json").exists() else checkpoints[-1] / MODEL_SUBDIR
    _copy_tree(final_src, dst.model)
    formats = _export_formats(dst, gguf)
    if hf_checkpoints:
        from llamalab.interop.hf import export_folder

        for ck in dst.list_checkpoints():
            export_folder(ck / MODEL_SUBDIR, out / HF_CHECKPOINTS / ck.name)
    # data
    manifest_src = src.manifest
    data_root = _data_root(src, meta)
    files = (meta.get("data") or {}).get("files")
    if not manifest_src.exists() and data_root is None and files is not None:
        # a fine-tuning run (sft, rm, dpo, ppo): no token shards; its data files by path and sha256 (meta.json)
        manifest_src = None
    elif not manifest_src.exists():
        if data_root is None:
            raise LlamalabError(f"{src.manifest}: not found, nor the shard folder meta.json names")
        manifest_src = data_root / "manifest.json"
    if manifest_src is not None:
        _copy_file(manifest_src, dst.manifest)
    manifest = read_json(dst.manifest, what="data manifest") if manifest_src is not None else {}
    data_info: dict[str, Any] = {"included": False, "files": files,
                                 "manifest_sha256": sha256_file(dst.manifest) if manifest_src is not None else None,
                                 "shards": [{"file": s["file"], "split": s.get("split"), "n_tokens": s.get("n_tokens"),
                                             "sha256": s.get("sha256")} for s in manifest.get("shards", [])],
                                 "source_path": (meta.get("data") or {}).get("path")}
    if data_root is not None:
        dst_steps = dst.data / STEPS_MAP
        write_json_atomic(dst_steps, steps_map(data_root, meta, rows))
        data_info["steps_map"] = f"data/{STEPS_MAP}"
        if include_data:
            for s in manifest.get("shards", []):
                _copy_file(data_root / s["file"], dst.data / s["file"])
            data_info["included"] = True
    elif include_data:
        print0(f"release: the run's shard folder {data_info['source_path']} is gone (or its manifest differs "
               f"from the run's copy): the bundle carries the manifest's hashes and the recipe, not the data")
    ck_table = checkpoint_table(dst, rows)
    final_step = ck_table[-1]["step"]
    index = {"format": FORMAT, "version": VERSION, "run": src.root.resolve().name, "final_step": final_step,
             "device_type": device_type(meta.get("device")), "dtype": meta.get("dtype"),
             "formats": formats, "checkpoints": ck_table,
             "hf_checkpoints": HF_CHECKPOINTS if hf_checkpoints else None, "data": data_info,
             "llamalab": (meta.get("versions") or {}).get("llamalab"), "git_sha": meta.get("git_sha")}
    write_json_atomic(out / INDEX, index)
    write_card(dst, index)
    write_checksums(out)
    size = _dir_size(out)
    kept = "included" if data_info["included"] else "hashes only"
    print0(f"release: {out} | {len(ck_table)} checkpoints, final step {final_step} | formats "
           f"{', '.join(k for k in formats if k != 'gguf_type')} | data {kept}"
           f" | {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s | check: llamalab release verify {out}")
    return out


def load_index(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / INDEX
    if not path.exists():
        raise LlamalabError(f"{path}: not found ({bundle} is not a llamalab release bundle)")
    idx = read_json(path, what="release index")
    if idx.get("format") != FORMAT:
        raise LlamalabError(f"{path}: format is {idx.get('format')!r}, not {FORMAT!r}")
    return idx
