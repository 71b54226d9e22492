"""The llamalab model folder: safetensors weights + config + tokenizer, verified on load.

A model folder is what every stage hands to the next (pretraining, SFT, the engine, the server,
the converters)::

    model.safetensors   weights, Meta's parameter names (tied output weight stored once)
    config.json         {"format": "llamalab", "model": ModelConfig fields, "tokenizer": ..., "chat_template": ...}
    tokenizer.model     the SentencePiece model, when there is one
    checksums.json      sha256 of every file above, checked on load

Saving writes into ``<dir>.tmp-<pid>`` and renames it into place, so a crash never leaves a folder
that looks complete. Weights are only ever read with safetensors: nothing a user hands us is
unpickled.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llamalab.common import LlamalabError, read_json, sha256_file, write_json_atomic
from llamalab.model.config import ModelConfig
from llamalab.model.transformer import Transformer

FORMAT = "llamalab"


def model_state_for_save(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)  # NOTE: safetensors refuses aliased tensors; restored on load
    return sd


def write_checksums(folder: Path, names: list[str]) -> None:
    write_json_atomic(folder / "checksums.json", {n: sha256_file(folder / n) for n in names})


def verify_checksums(folder: Path) -> None:
    path = folder / "checksums.json"
    if not path.exists():
        return  # a folder made by hand: nothing to verify against
    sums = read_json(path, what="checksums file")
    for name, want in sums.items():
        f = folder / name
        if not f.exists():
            raise LlamalabError(f"{folder}: {name} is listed in checksums.json but missing")
        if sha256_file(f) != want:
            raise LlamalabError(f"{f}: checksum mismatch (file is corrupt or was modified)")


def save_model(folder: str | Path, model: Transformer, tokenizer_path: str | Path | None = None,
               extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write a model folder. ``state`` overrides the weights taken from ``model``."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = state if state is not None else model_state_for_save(model)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    files = ["model.safetensors"]
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        files.append("tokenizer.model")
    meta = {"format": FORMAT, "model": dataclasses.asdict(model.cfg), **(extra or {})}
    write_json_atomic(tmp / "config.json", meta)
    files.append("config.json")
    write_checksums(tmp, files)
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder


def read_model_config(folder: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LlamalabError(f"model folder not found: {folder}")
    meta = read_json(folder / "config.json", what="model config")
    if meta.get("format") != FORMAT:
        hint = " (a Hugging Face folder? convert it first: llamalab convert SRC DST)" if "architectures" in meta else ""
        raise LlamalabError(f"{folder / 'config.json'}: not a llamalab model folder{hint}")
    from llamalab.config import from_dict

    cfg = from_dict(ModelConfig, meta["model"], where=f"{folder / 'config.json'}:model")
    return cfg, meta


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LlamalabError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LlamalabError(f"{path}: not a readable safetensors file ({e})") from None


def load_into(model: Transformer, sd: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``sd`` into ``model``, naming any missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise LlamalabError(f"{where}: weights do not match the config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LlamalabError(f"{where}: tensor {k} has shape {tuple(v.shape)}, "
                                f"the config needs {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False, assign=False)


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               verify: bool = True) -> tuple[Transformer, dict[str, Any]]:
    """Load a model folder (checksums verified) -> (model in eval mode, config.json contents)."""
    folder = Path(folder)
    cfg, meta = read_model_config(folder)
    if verify:
        verify_checksums(folder)
    sd = load_state(folder / "model.safetensors")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    load_into(model, sd, str(folder / "model.safetensors"))
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, meta


def tokenizer_path(folder: str | Path) -> Path | None:
    p = Path(folder) / "tokenizer.model"
    return p if p.exists() else None
