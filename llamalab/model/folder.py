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

:func:`load` is the one loader every stage uses (generate, chat, serve, eval, SFT, convert): it
reads this folder, a run folder, a Hugging Face LLaMA folder or a .gguf file, detected by content,
and returns the model, its tokenizer and the config.json-shaped meta. Foreign formats are converted
in memory by :mod:`llamalab.interop` (imported only when needed, so loading a llamalab folder pulls
in neither ``gguf`` nor HF code); the trade-off is that a HF/GGUF model is re-converted on every load,
which ``llamalab convert`` avoids for models loaded often.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
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


def folder_meta(cfg: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json contents of a model folder: format tag, model config, extra keys (chat template...)."""
    return {"format": FORMAT, "model": dataclasses.asdict(cfg), **(extra or {})}


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
    write_json_atomic(tmp / "config.json", folder_meta(model.cfg, extra))
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


# ----------------------------------------------------------------------------- the one loader


@dataclass
class Loaded:
    """What :func:`load` returns: the model in eval mode, its tokenizer, its config.json-shaped meta.

    ``path`` is the resolved source: the model folder (a run folder's model), the HF folder or the .gguf file.
    """

    model: Transformer
    tokenizer: Any
    meta: dict[str, Any]
    path: Path


MODEL_FORMATS = ("llamalab", "run", "huggingface", "gguf")


def detect_format(path: str | Path) -> str:
    """What ``path`` holds, read from its content: one of :data:`MODEL_FORMATS`.

    A file is GGUF when it starts with the GGUF magic; a folder with a config.json is a llamalab folder
    (``"format": "llamalab"``) or a Hugging Face one (``architectures``/``model_type``); a folder without
    one is taken as a run folder (:func:`resolve_model_path` says if it is not).
    """
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"model not found: {path}")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LlamalabError(f"{path}: not a GGUF file (no GGUF magic); give a model folder, a run folder, "
                            f"a Hugging Face folder or a .gguf file")
    config = path / "config.json"
    if not config.exists():
        return "run"
    meta = read_json(config, what="model config")
    if meta.get("format") == FORMAT:
        return "llamalab"
    if "architectures" in meta or "model_type" in meta:
        return "huggingface"
    raise LlamalabError(f"{config}: neither a llamalab nor a Hugging Face model folder "
                        f"(no 'format' or 'architectures' field)")


def resolve_model_path(path: str | Path) -> Path:
    """A model folder, or a run folder resolved to its final ``model/`` or newest checkpoint's model."""
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"model not found: {path}")
    if path.is_file() or (path / "config.json").exists():
        return path
    from llamalab.run_dir import RunDir

    run = RunDir(path)
    if (run.model / "config.json").exists():
        return run.model
    models = [p / "model" for p in run.list_checkpoints() if (p / "model" / "config.json").exists()]
    if models:
        return models[-1]
    raise LlamalabError(f"{path}: not a model folder (no config.json) and not a run folder with a model/ or "
                        f"checkpoints/step_*/model; give a model folder, an HF folder or a .gguf file")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of a model folder: tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").exists():
        from llamalab.tokenizer import Tokenizer

        return Tokenizer(folder / "tokenizer.model")
    if (folder / "tokenizer.json").exists():
        from llamalab.tokenizer.bpe import BPETokenizer

        return BPETokenizer(folder / "tokenizer.json")
    raise LlamalabError(f"{folder}: no tokenizer.model or tokenizer.json in the model folder")


def _load_foreign(path: Path, kind: str) -> tuple[Transformer, Any, dict[str, Any]]:
    """A HF folder or GGUF file in memory -> (fp32 CPU model, tokenizer or None, the extra keys import records)."""
    if kind == "huggingface":
        from llamalab.interop.hf import hf_extra, hf_tokenizer, load_hf

        return load_hf(path), hf_tokenizer(path), hf_extra(path)
    from llamalab.interop.gguf import gguf_extra, gguf_tokenizer, load_gguf

    model, kv = load_gguf(path)
    return model, gguf_tokenizer(kv, str(path)), gguf_extra(path, kv)


def load(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         verify: bool = True, with_tokenizer: bool = True) -> Loaded:
    """The one loader: any model llamalab reads -> (model, tokenizer, meta, resolved path).

    Reads a llamalab model folder, a run folder (its final or newest checkpoint's model), a Hugging
    Face LLaMA folder or a .gguf file, detected by content (:func:`detect_format`). HF and GGUF models
    are converted in memory, nothing is written; their ``meta`` is the config.json that ``llamalab
    convert`` would write (so chat templates resolve the same way). ``device``/``dtype`` accept "auto"
    (the machine's best device; fp32 on CPU). ``with_tokenizer=False`` skips the tokenizer (``tokenizer``
    is None), for work on token ids only (memorization of a checkpoint saved without one).
    """
    from llamalab.common import resolve_device, resolve_dtype

    kind = detect_format(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    dt = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    if kind in ("llamalab", "run"):
        folder = resolve_model_path(path)
        model, meta = load_model(folder, device=dev, dtype=dt, verify=verify)
        return Loaded(model, load_tokenizer(folder) if with_tokenizer else None, meta, folder)
    path = Path(path)
    model, tokenizer, extra = _load_foreign(path, kind)
    if tokenizer is None and with_tokenizer:
        raise LlamalabError(f"{path}: no tokenizer (a {kind} model without a vocabulary); llamalab needs one")
    model.to(device=dev, dtype=dt)
    return Loaded(model, tokenizer, folder_meta(model.cfg, extra), path)
