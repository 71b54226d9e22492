"""Shared plumbing: the user-facing error type, device/dtype choice, seeding, distributed init,
rank-0 printing, progress lines and run directories.

Everything here is small and dependency-free (torch only) so that every stage can import it
without pulling in optional extras.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class LlamalabError(Exception):
    """An error meant for the user: its message names the file, line or field at fault.

    The CLI prints it without a traceback (with one under ``--debug``).
    """


# ----------------------------------------------------------------------------- devices, dtypes


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = autodetect_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlamalabError(f"device={device!r} was asked for but CUDA is not available")
    return torch.device(device)


def supports_fast_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls are fast. NOTE: many CPUs emulate bf16 (~1 GFLOP/s vs ~140 fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 where the device has fast bf16, else fp32 (the CPU default)."""
    if dtype == "auto":
        return torch.bfloat16 if supports_fast_bf16(device) else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise LlamalabError(f"dtype: unknown value {dtype!r}; expected one of auto, {', '.join(table)}")
    return table[dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local_rank, world


def is_rank0() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return dist_info()[0] == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on ``device`` (the MFU denominator), best of a short timed loop."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        torch.matmul(a, b, out=c)
    sync()
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b, out=c)
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- progress


class Progress:
    """A rate line for long loops: ``label  n/total  rate unit/s  eta``, redrawn at most every
    ``every`` seconds. Plain text (works in CI logs and under torchrun); rank 0 only."""

    def __init__(self, total: int | None, label: str, unit: str = "it", every: float = 1.0,
                 stream=None) -> None:
        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = is_rank0()
        self.extra = ""
        self._drawn = -1

    def update(self, k: int = 1, extra: str = "") -> None:
        self.n += k
        if extra:
            self.extra = extra
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or (self.total and self.n >= self.total)):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn = self.n
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        tot = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {max(self.total - self.n, 0) / rate:5.0f}s"
        end = "\r" if self.stream.isatty() else "\n"
        self.stream.write(f"{self.label} {self.n}{tot} {rate:,.1f} {self.unit}/s{eta} {self.extra}{end}")
        self.stream.flush()

    def close(self) -> float:
        now = time.perf_counter()
        if self.enabled:
            if self._drawn != self.n:
                self._draw(now)
            if self.stream.isatty():
                self.stream.write("\n")
        return now - self.t0


def progress(it: Iterable[T], total: int | None, label: str, unit: str = "it") -> Iterator[T]:
    bar = Progress(total, label, unit)
    for x in it:
        yield x
        bar.update()
    bar.close()


# ----------------------------------------------------------------------------- files, provenance


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_folder(tmp: str | Path, dst: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``dst``, replacing any folder there; a reader never sees half.

    NOTE: POSIX renames a folder only onto an empty one, so an existing ``dst`` is first renamed aside
    and deleted after the new one is in place (a crash in between leaves ``dst.old-PID``, never a mix).
    """
    tmp, dst = Path(tmp), Path(dst)
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)
    return dst


def iter_jsonl(lines: Iterable[str], where: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; a bad line raises naming ``where:line``."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamalabError(f"{where}:{n}: not valid JSON ({e.msg})") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LlamalabError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise LlamalabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def git_sha(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=cwd or Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("llamalab", "torch", "numpy", "sentencepiece", "safetensors", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
