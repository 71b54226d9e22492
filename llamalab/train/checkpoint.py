"""Training checkpoints: atomic save, verified load, fall back to the last good one.

``checkpoints/step_000100/`` holds::

    model/                 a llamalab model folder (loads in the engine, the server, the converters)
    optimizer.safetensors  AdamW moments and step counts (tensors only; never pickled)
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step, tokens seen, data position (next batch, skipped batches), Python and
                           NumPy RNG states, optimizer hyper-parameters, the run config
    checksums.json         sha256 of every file above (model/ files included)

A sharded run (FSDP2) writes ``dcp/`` (``torch.distributed.checkpoint``: every rank writes its own
shards of the weights and AdamW moments, in parallel, with a metadata file of global shapes)
instead of ``optimizer.safetensors``; ``model/`` is still written (gathered to rank 0, one tensor
at a time on the CPU) so every checkpoint stays a loadable model folder. Resume re-shards: a
``dcp/`` checkpoint loads into any world size, sharded or not, and a single-file checkpoint loads
into a sharded model (each rank keeps its slices). Trade-off: the gathered ``model/`` costs rank 0
one full copy of the weights in host RAM and time at each save; for 70B-class runs one would keep
only ``dcp/`` and export at the end.
NOTE: only rank 0's RNG states are saved; the training step draws no random numbers (no dropout),
so this only matters to code that does.

A checkpoint is written under ``step_000100.tmp-<pid>`` and renamed when complete; a folder
without a valid ``checksums.json`` (a crash mid-write, a truncated copy) is skipped on resume for
the newest one that verifies, with a message. The ``.tmp-<pid>`` leftovers of a crash are deleted
when the next invocation starts (:func:`remove_partial_writes`). All checkpoints are kept by
default (LLM360). When the schedule completes, the last checkpoint's model is published as the
run's ``model/`` (:func:`publish_model`: weights hard-linked, small files copied).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from llamalab.common import LlamalabError, print0, read_json, replace_folder, write_json_atomic
from llamalab.model.folder import (
    load_into,
    load_state,
    model_state_for_save,
    save_model,
    verify_checksums,
    write_checksums,
)
from llamalab.run_dir import list_step_dirs, step_name
from llamalab.train.fsdp import is_sharded

CHECKSUMS = "checksums.json"  # as in a model folder (llamalab.model.folder)
MODEL_DIR = "model"  # the checkpoint's model folder
PARTIAL_RE = re.compile(r"\.(tmp|old)-\d+$")  # an unfinished atomic write (save_checkpoint, save_model, publish_model)
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint set aside by a restart from scratch (kept as evidence)


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    tokens_seen: int = 0
    batch_index: int = 0  # next global batch to read
    skip_batches: tuple[int, ...] = ()  # batches never to read again (spike / NaN rollbacks)
    best_val_loss: float | None = None
    guard: tuple[float, ...] = ()  # recent accepted losses (the spike guard's window)
    grad_scaler: dict | None = None  # fp16 loss scaler state (scale, growth tracker)

    def to_json(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "batch_index": self.batch_index,
                "skip_batches": list(self.skip_batches), "best_val_loss": self.best_val_loss,
                "guard": list(self.guard), "grad_scaler": self.grad_scaler}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        return cls(d["step"], d["tokens_seen"], d["batch_index"], tuple(d.get("skip_batches", ())),
                   d.get("best_val_loss"), tuple(d.get("guard", ())), d.get("grad_scaler"))


def step_dir(root: Path, step: int) -> Path:
    return root / step_name(step)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# ----------------------------------------------------------------------------- optimizer


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = t
    for pid, kv in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(kv)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------- save / load


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _shared_tmp_dir(final: Path) -> Path:
    """A temporary folder name all ranks agree on (rank 0's pid)."""
    pid = [os.getpid()]
    if _distributed():
        dist.broadcast_object_list(pid, src=0)
    return final.with_name(f"{final.name}.tmp-{pid[0]}")


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank takes part; rank 0 gets the full fp32 CPU weights (tied output dropped)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return {k: v.contiguous() for k, v in sd.items()}


def save_checkpoint(root: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, run_config: dict[str, Any], tokenizer_path: str | Path | None = None,
                    model_extra: dict[str, Any] | None = None) -> Path:
    """Write ``root/step_XXXXXX`` atomically; returns its path.

    Plain or DDP model: called on rank 0 only. Sharded (FSDP) model: a collective, called on every
    rank (they write ``dcp/`` together; rank 0 writes the rest and renames).
    """
    root = Path(root)
    final = step_dir(root, state.step)
    sharded = is_sharded(model)
    tmp = _shared_tmp_dir(final) if sharded else root / f"{final.name}.tmp-{os.getpid()}"
    rank0 = not sharded or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        _barrier()
        _save_sharded(tmp, model, optimizer)
        weights = full_model_state(model)
    else:
        weights = model_state_for_save(model)
    if not rank0:
        _barrier()  # rank 0 finishes the folder
        return final
    save_model(tmp / MODEL_DIR, model, tokenizer_path=tokenizer_path,
               extra={"step": state.step, "tokens_seen": state.tokens_seen, **(model_extra or {})},
               state=weights)
    opt_meta: dict[str, Any] = {"format": "dcp"}
    if not sharded:
        opt_t, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
    rng_t, rng_meta = rng_state()
    save_file(rng_t, str(tmp / "rng.safetensors"))
    write_json_atomic(tmp / "state.json", {**state.to_json(), "rng": rng_meta, "optimizer": opt_meta,
                                           "config": run_config})
    write_checksums(tmp, sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if sharded:
        _barrier()
    return final


def _save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / "dcp"))


def _load_dcp(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load ``dcp/`` into a model of any world size, sharded or not (DCP re-slices on read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    with warnings.catch_warnings():  # a 1-process resume of a sharded run is intended, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        if optimizer is None:
            msd = get_model_state_dict(model)
            dcp.load({"model": msd}, checkpoint_id=str(folder))
            set_model_state_dict(model, msd)
            return
        msd, osd = get_state_dict(model, optimizer)  # NOTE: initialises empty AdamW state so it can be filled
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _load_full_into_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                            meta: dict[str, Any]) -> None:
    """A single-file checkpoint into a sharded model: each rank reads it all and keeps its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    sd = load_state(folder / MODEL_DIR / "model.safetensors")
    if model.cfg.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, sd, options=opts)
        return
    osd = fqn_optimizer_state(model, optimizer, load_file(str(folder / "optimizer.safetensors")), meta["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=sd, optim_state_dict=osd, options=opts)


def fqn_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> dict[str, Any]:
    """Our id-keyed optimizer tensors -> the parameter-name-keyed form of ``set_state_dict``.

    Ids number the optimizer's parameters in group order, which is the model's parameter order
    whatever the wrapping (FSDP2 swaps parameters in place, keeping their order).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(order[int(pid)], {})[k] = t
    for pid, kv in meta.get("scalars", {}).items():
        state.setdefault(order[int(pid)], {}).update(kv)
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def verify_checkpoint(folder: Path) -> None:
    """Every file against checksums.json; unlike a model folder made by hand, a checkpoint must have one."""
    if not (folder / CHECKSUMS).exists():
        raise LlamalabError(f"{folder}: incomplete checkpoint (no {CHECKSUMS})")
    verify_checksums(folder)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root`` (a run's checkpoints/), oldest first."""
    return list_step_dirs(root)


def latest_good_checkpoint(root: str | Path, on_bad=None) -> Path | None:
    """The newest checkpoint that verifies; ``on_bad(path, reason)`` hears about each one skipped."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder
        except LlamalabError as e:
            print0(f"checkpoint: skipping {folder.name}: {e}")
            if on_bad is not None:
                on_bad(folder, str(e))
    return None


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True) -> tuple[TrainState, dict[str, Any]]:
    """Verify and load a checkpoint into ``model`` (and ``optimizer``); returns its state and config.

    Plain, DDP-unwrapped or sharded ``model``; with a sharded one (or a ``dcp/`` checkpoint) every
    rank must call this.
    """
    folder = Path(folder)
    verify_checkpoint(folder)
    meta = read_json(folder / "state.json", what="checkpoint state")
    with _keep_implementation(optimizer):
        _load_weights_and_optimizer(folder, model, optimizer, meta)
    if restore_rng:
        set_rng_state(load_file(str(folder / "rng.safetensors")), meta["rng"])
    return TrainState.from_json(meta), meta.get("config", {})


IMPL_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@contextlib.contextmanager
def _keep_implementation(optimizer: torch.optim.Optimizer | None):
    """Loading a state dict also loads the saved run's kernel choice (``fused`` ...); keep ours.
    NOTE: a fused AdamW handed ``fused=False`` by a checkpoint fails under a GradScaler."""
    flags = [{k: g[k] for k in IMPL_FLAGS if k in g} for g in optimizer.param_groups] if optimizer else []
    yield
    for g, f in zip(optimizer.param_groups if optimizer else [], flags):
        g.update(f)
        if not (g.get("fused") or g.get("capturable")):
            continue
        for p in g["params"]:  # fused/capturable kernels want ``step`` on the parameter's device
            st = optimizer.state.get(p, {})
            if isinstance(st.get("step"), torch.Tensor) and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device, torch.float32)


def _load_weights_and_optimizer(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                                meta: dict[str, Any]) -> None:
    if (folder / "dcp").is_dir():
        _load_dcp(folder / "dcp", model, optimizer)
    elif is_sharded(model):
        _load_full_into_sharded(folder, model, optimizer, meta)
    else:
        sd = load_state(folder / MODEL_DIR / "model.safetensors")
        load_into(model, {k: v.to(next(model.parameters()).device) for k, v in sd.items()}, str(folder / MODEL_DIR))
        if optimizer is not None:
            load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), meta["optimizer"])


def remove_partial_writes(*folders: str | Path) -> list[str]:
    """Delete the ``*.tmp-<pid>`` / ``*.old-<pid>`` folders directly under ``folders``: what a process
    killed inside an atomic write left behind. Call it before this invocation writes anything;
    returns the paths removed. NOTE: assumes no other process writes into the same run folder."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if PARTIAL_RE.search(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(str(p))
    return removed


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint that failed verification to ``step_N.corrupt`` (``.corrupt-2`` ...), out of
    the step listing (resume, sweeps, keep-last) but kept for inspection; returns the new path."""
    dst = folder.with_name(folder.name + CORRUPT_SUFFIX)
    n = 1
    while dst.exists():
        n += 1
        dst = folder.with_name(f"{folder.name}{CORRUPT_SUFFIX}-{n}")
    folder.rename(dst)
    return dst


def publish_model(checkpoint: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` (a run's ``model/``) a copy of ``checkpoint``'s model folder, atomically.

    The weights are hard-linked (no second copy on disk; a checkpoint is never modified in place)
    where the filesystem allows, else copied; the small files (config.json, tokenizer, checksums)
    are copied so that editing the published config cannot corrupt the checkpoint."""
    src, dst = Path(checkpoint) / MODEL_DIR, Path(dst)
    if not (src / "config.json").exists():
        raise LlamalabError(f"{src}: no model folder to publish (no config.json)")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            try:
                os.link(f, tmp / f.name)
                continue
            except OSError:  # another filesystem, or no hard links: copy
                pass
        shutil.copy2(f, tmp / f.name)
    verify_checksums(tmp)
    return replace_folder(tmp, dst)


def checkpoint_summary(folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / "state.json").read_text())
    return {"path": str(folder), "step": meta["step"], "tokens_seen": meta["tokens_seen"]}
