"""The llamalab model folder: safetensors weights + config + tokenizer, verified on load.

A model folder is what every stage hands to the next (pretraining, SFT, the engine, the server,
the converters)::

    model.safetensors   weights, Meta's parameter names (tied output weight stored once)
    config.json         {"format": "llamalab", "model": ModelConfig fields, "tokenizer": ..., "chat_template": ...}
    tokenizer.model     the SentencePiece model, when there is one; or, for byte-level BPE (Llama 3, SmolLM2),
    tokenizer.json      + tokenizer_config.json, special_tokens_map.json (Hugging Face's files, :func:`save_tokenizer`)
    checksums.json      sha256 of every file above, checked on load

Files are written with the user's umask mode (safetensors alone would make them 0600).

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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llamalab.common import LlamalabError, read_json, replace_folder, sha256_file, write_json_atomic
from llamalab.model.config import ModelConfig, ModelConfigError, name_fields, num_params
from llamalab.model.transformer import Transformer

FORMAT = "llamalab"


def model_state_for_save(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)  # NOTE: safetensors refuses aliased tensors; restored on load
    return sd


def file_mode() -> int:
    """The mode a new file gets from the user's umask (0o644 under the usual 022). safetensors writes its
    files 0600 whatever the umask; model folders, checkpoints and exports are given this mode instead."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # NOTE: no other way to read it; set straight back
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, the file then given the user's umask mode (:func:`file_mode`)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


def write_checksums(folder: Path, names: list[str]) -> None:
    """``checksums.json`` for the files ``names`` of ``folder``; every one of them (and the checksums file) is
    also given the user's umask mode, so a model folder or checkpoint is as readable as any file the user writes."""
    mode = file_mode()
    for n in names:
        os.chmod(folder / n, mode)
    write_json_atomic(folder / "checksums.json", {n: sha256_file(folder / n) for n in names})
    os.chmod(folder / "checksums.json", mode)


def verify_checksums(folder: Path) -> None:
    path = folder / "checksums.json"
    if not path.exists():
        return  # a folder made by hand: nothing to verify against
    sums = read_config_json(path, what="checksums file")
    for name, want in sums.items():
        if not isinstance(want, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise LlamalabError(f"{path}: entry {name!r} is not a path inside the folder with a sha256 digest")
        f = folder / name
        if not f.exists():
            raise LlamalabError(f"{folder}: {name} is listed in checksums.json but missing")
        if sha256_file(f) != want:
            raise LlamalabError(f"{f}: checksum mismatch (file is corrupt or was modified)")


def folder_meta(cfg: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json contents of a model folder: format tag, model config, extra keys (chat template...)."""
    return {"format": FORMAT, "model": dataclasses.asdict(cfg), **(extra or {})}


def save_tokenizer(tokenizer: Any, folder: str | Path, chat_template: str | None = None) -> list[str]:
    """Write a loaded tokenizer's files into ``folder`` -> their names, for any kind llamalab reads.

    Byte-level BPE: ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, ``add_bos_token``, the
    ``chat_template`` Jinja when given), ``special_tokens_map.json`` (:meth:`BPETokenizer.save`), and
    ``generation_config.json`` with every stop id when the tokenizer has more than EOS (Llama 3.1's three),
    so :meth:`BPETokenizer.from_folder` reads the same stops back. SentencePiece: ``tokenizer.model``, and a
    ``tokenizer_config.json`` when the tokenizer adds no BOS (a GGUF's ``add_bos_token: false``) or a chat
    template is given, so the BOS rule survives.
    """
    folder = Path(folder)
    if getattr(tokenizer, "kind", None) == "bpe":
        names = list(tokenizer.save(folder, chat_template=chat_template))
        stops = list(getattr(tokenizer, "stop_ids", []) or [])
        if [i for i in stops if i != tokenizer.eos_id]:
            write_json_atomic(folder / "generation_config.json", {"eos_token_id": stops})
            names.append("generation_config.json")
        return names
    names = write_spm_model(tokenizer, folder)
    add_bos = bool(getattr(tokenizer, "add_bos", True))
    if not add_bos or chat_template:
        cfg: dict[str, Any] = {"add_bos_token": add_bos}
        if chat_template:
            cfg["chat_template"] = chat_template
        write_json_atomic(folder / "tokenizer_config.json", cfg)
        names.append("tokenizer_config.json")
    return names


def write_spm_model(tokenizer: Any, folder: Path) -> list[str]:
    """A SentencePiece tokenizer's ``tokenizer.model`` in ``folder``: its file copied byte for byte when it has
    one, else the model it holds serialized (one rebuilt from a GGUF vocabulary)."""
    src = getattr(tokenizer, "path", None)
    if src is not None and Path(src).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / "tokenizer.model")
        return ["tokenizer.model"]
    return list(tokenizer.save(folder))


def save_model(folder: str | Path, model: Transformer, tokenizer_path: Any = None,
               extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
               tokenizer: Any = None) -> Path:
    """Atomically write a model folder. ``state`` overrides the weights taken from ``model``.

    The tokenizer: ``tokenizer`` (a loaded one of any kind, written by :func:`save_tokenizer`), or
    ``tokenizer_path``: a SentencePiece ``tokenizer.model`` file to copy, or a loaded tokenizer (the
    training loop passes what it was given on). Files get the user's umask mode.
    """
    folder = Path(folder)
    if tokenizer is None and tokenizer_path is not None and not isinstance(tokenizer_path, (str, os.PathLike)):
        tokenizer, tokenizer_path = tokenizer_path, None
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = state if state is not None else model_state_for_save(model)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    files = ["model.safetensors"]
    if tokenizer is not None:
        files += save_tokenizer(tokenizer, tmp)
    elif tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        files.append("tokenizer.model")
    write_json_atomic(tmp / "config.json", folder_meta(model.cfg, extra))
    files.append("config.json")
    write_checksums(tmp, files)
    return replace_folder(tmp, folder)


MAX_CONFIG_BYTES = 64 << 20  # a config.json is kilobytes; refuse to parse a hostile multi-gigabyte one


def read_config_json(path: Path, what: str = "model config") -> dict[str, Any]:
    """A model's config.json as a dict: one error line for a missing, huge, deeply nested or non-object file."""
    if path.exists() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise LlamalabError(f"{path}: {path.stat().st_size:,} bytes is too large for a {what} "
                            f"(limit {MAX_CONFIG_BYTES:,})")
    try:
        meta = read_json(path, what=what)
    except RecursionError:
        raise LlamalabError(f"{path}: JSON nested too deeply to be a {what}") from None
    if not isinstance(meta, dict):
        raise LlamalabError(f"{path}: a {what} must be a JSON object, got {type(meta).__name__}")
    return meta


def read_model_config(folder: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LlamalabError(f"model folder not found: {folder}")
    meta = read_config_json(folder / "config.json")
    if meta.get("format") != FORMAT:
        hint = " (a Hugging Face folder? convert it first: llamalab convert SRC DST)" if "architectures" in meta else ""
        raise LlamalabError(f"{folder / 'config.json'}: not a llamalab model folder{hint}")
    from llamalab.config import from_dict

    try:
        cfg = from_dict(ModelConfig, meta.get("model"), where=f"{folder / 'config.json'}:model")
    except ModelConfigError as e:
        raise e.at(str(folder / "config.json")) from None
    return cfg, meta


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LlamalabError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LlamalabError(f"{path}: not a readable safetensors file ({e})") from None


# ----------------------------------------------------------------------------- checks before building

MEMORY_CHECK_ENV = "LLAMALAB_NO_MEMORY_CHECK"
_LAYER = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")


def safetensors_shapes(paths: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the headers of safetensors files (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
        if not path.exists():
            raise LlamalabError(f"weights file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    if k in shapes:
                        raise LlamalabError(f"{path}: tensor {k} is also in another weights file")
                    shapes[k] = tuple(f.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise LlamalabError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model folder stores for ``cfg`` (the tied output weight excepted),
    read off a model on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("output.weight", None)
    return shapes


def check_weights(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], weights: str, config: str,
                  rename: dict[str, str] | None = None, names: dict[str, str] | None = None) -> None:
    """Check the tensors a weights file declares (``shapes``, from its header) against ``cfg`` before any
    weight is read or allocated: the number of layers, then the tensor names, then every shape.

    ``rename`` maps the file's tensor names to ours (None: the file uses ours); ``names`` maps config fields
    to the keys the config file uses (for the messages); ``weights`` and ``config`` name the two files.
    """
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER.search(k))}
    if layers != set(range(cfg.n_layers)):
        held = f"{len(layers)} layers" if layers == set(range(len(layers))) else f"layers {sorted(layers)[:8]}"
        raise LlamalabError(name_fields(f"{config}: model.n_layers is {cfg.n_layers:,} but {weights} holds "
                                        f"{held}", names))
    ours = {(rename.get(k, f"?{k}") if rename is not None else k): k for k in shapes}
    if cfg.tie_embeddings:
        ours.pop("output.weight", None)  # a tied output stored anyway is ignored on load, as load_into does
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(ours))
    unexpected = sorted(ours[k] for k in set(ours) - set(want))
    if missing or unexpected:
        back = {v: k for k, v in (rename or {}).items()}
        raise LlamalabError(f"{weights}: tensors do not match {config}: missing "
                            f"{[back.get(k, k) for k in missing[:4]]}, unexpected {unexpected[:4]}")
    for k, shape in want.items():
        if tuple(shapes[ours[k]]) != shape:
            raise LlamalabError(name_fields(
                f"{weights}: tensor {ours[k]} has shape {tuple(shapes[ours[k]])}, {config} needs {shape} "
                f"(model.dim={cfg.dim}, model.n_heads={cfg.n_heads}, model.n_kv_heads={cfg.kv_heads}, "
                f"model.hidden_dim={cfg.ffn_hidden_dim}, model.vocab_size={cfg.vocab_size})", names))


def available_memory() -> int | None:
    """Bytes of RAM this process may still use: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_memory(cfg: ModelConfig, weight_bytes: int, where: str) -> int:
    """Refuse, with the numbers, to build ``cfg`` when it would not fit in the RAM available -> bytes needed.

    The estimate: the fp32 model built on the CPU (parameters x 4 bytes), the ``weight_bytes`` read (or
    dequantised) from the file alongside it, and the rotary table. ``LLAMALAB_NO_MEMORY_CHECK=1`` skips it.
    """
    n = num_params(cfg)
    need = n * 4 + weight_bytes + cfg.max_seq_len * cfg.head_dim * 8
    refuse_beyond_memory(need, f"loading needs about {_gb(need)} of RAM ({n:,} parameters x 4 bytes in fp32 + "
                               f"{_gb(weight_bytes)} of weights read + the rotary table for {cfg.max_seq_len:,} "
                               f"positions)", where)
    return need


def refuse_beyond_memory(need: int, what: str, where: str) -> None:
    """Raise ``"{where}: {what}, only N GB is available"`` when ``need`` bytes exceed the RAM available (unless
    ``LLAMALAB_NO_MEMORY_CHECK=1``). For any large allocation sized by a file or a request (a KV cache ...)."""
    if os.environ.get(MEMORY_CHECK_ENV, "") not in ("", "0"):
        return
    avail = available_memory()
    if avail is not None and need > avail:
        raise LlamalabError(f"{where}: {what}, only {_gb(avail)} is available; set {MEMORY_CHECK_ENV}=1 to try anyway")


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
    if meta.get("kind") == "reward":  # written by `llamalab rm`: a scalar head, no LM head
        raise LlamalabError(f"{folder}: a reward model (config.json \"kind\": \"reward\"), not a language model; "
                            f"score with `llamalab rm score` (llamalab.align.reward.load_reward_model)")
    if verify:
        verify_checksums(folder)
    weights = folder / "model.safetensors"
    check_weights(cfg, safetensors_shapes([weights]), str(weights), str(folder / "config.json"))
    check_memory(cfg, weights.stat().st_size, str(folder))
    sd = load_state(weights)
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
    meta = read_config_json(config)
    if meta.get("format") == FORMAT:
        return "llamalab"
    if "architectures" in meta or "model_type" in meta:
        return "huggingface"
    raise LlamalabError(f"{config}: neither a llamalab nor a Hugging Face model folder "
                        f"(no 'format' or 'architectures' field)")


def resolve_model_path(path: str | Path) -> Path:
    """A model folder; or a folder holding one: a run folder (its final ``model/``, else its newest
    checkpoint's model), a checkpoint folder (``step_N/model``) or a run's ``checkpoints/`` (newest)."""
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"model not found: {path}")
    if path.is_file() or (path / "config.json").exists():
        return path
    from llamalab.run_dir import RunDir, list_step_dirs

    run = RunDir(path)
    if (run.model / "config.json").exists():  # a run's final model, or a checkpoint's model/
        return run.model
    for steps in (run.list_checkpoints(), list_step_dirs(path)):
        models = [p / "model" for p in steps if (p / "model" / "config.json").exists()]
        if models:
            import sys

            print(f"model: {path} has no final model/; using the newest checkpoint's, {models[-1]}", file=sys.stderr)
            return models[-1]
    raise LlamalabError(f"{path}: not a model folder (no config.json) and not a run folder with a model/ or "
                        f"checkpoints/step_*/model; give a model folder (e.g. RUN/model or "
                        f"RUN/checkpoints/step_N/model), an HF folder or a .gguf file")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of a model folder, its kind read from the content: a SentencePiece tokenizer.model, else
    byte-level BPE from tokenizer.json or a tiktoken tokenizer.model (Llama 3's), with the special tokens and
    the BOS rule of tokenizer_config.json (:func:`llamalab.tokenizer.load_folder_tokenizer`)."""
    from llamalab.tokenizer import load_folder_tokenizer

    tok = load_folder_tokenizer(folder)
    if tok is None:
        raise LlamalabError(f"{folder}: no tokenizer.model or tokenizer.json in the model folder")
    return tok


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
