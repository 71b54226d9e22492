"""Compiling llamalab's C kernels on the user's machine: one cached shared library per source file.

Used by the quantised GEMM (``llamalab/inference/csrc/qdot.c``, :mod:`llamalab.inference.kernels`) and the fused
fp32 ops of the model and decoder (``llamalab/model/csrc/ops.c``, :mod:`llamalab.model.fused`). Why compile at first
use rather than ship binaries: ``-march=native`` picks the instructions of the CPU at hand (AVX-512 VNNI, AVX2), and
a pure-Python wheel stays installable everywhere; where there is no compiler each caller keeps PyTorch's ops.

The library is built with ``$CC`` (else ``cc``), ``-O3 -fopenmp -march={arch}``, into ``$LLAMALAB_CACHE`` (default
``~/.cache/llamalab``) ``/kernels/``, named by the source's stem and a hash of the source, the compiler's version, the
flags and this CPU's feature flags (a home folder shared with another kind of CPU gets its own build). Where that
folder cannot be written (a read-only home) the temp folder holds it. The build takes ~1 s and is written atomically
(a temporary file, then a rename). The library links ``libgomp.so.1``, the OpenMP runtime torch loads.
NOTE: stdlib only: the model package imports this, and the model imports no stage code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMALAB_CACHE", Path.home() / ".cache" / "llamalab")) / "kernels"


def cpu_flags() -> str:
    """This CPU's feature flags (``/proc/cpuinfo``), part of each build's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, arch: str = "native", cc: str | None = None) -> Path:
    """Compile ``source`` for ``-march={arch}`` (or find it built) and return the shared library's path; raises
    OSError (no compiler), RuntimeError (it failed, or no writable folder) or subprocess errors."""
    cc = cc or os.environ.get("CC", "cc")
    flags = [*FLAGS, f"-march={arch}"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([source.read_text(), cc, version, " ".join(flags), cpu_flags()]).encode())
    name = f"{source.stem}-{key.hexdigest()[:16]}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"llamalab-kernels-{os.getuid()}"):
        if (folder / name).exists():
            return folder / name
        try:  # NOTE: a read-only home (containers, CI) falls back to the temp folder
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            break
        except OSError:
            continue
    else:
        raise RuntimeError(f"no writable folder for the kernel ({cache_dir()} or the temp folder)")
    out = folder / name
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def switched_off() -> bool:
    """``LLAMALAB_KERNELS=0``: every native kernel off, PyTorch's ops instead."""
    return os.environ.get("LLAMALAB_KERNELS", "1") == "0"


def open_library(path: Path, bind: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """Load a built library; ``bind`` declares its functions' C types."""
    lib = ctypes.CDLL(str(path))
    bind(lib)
    return lib


def load(source: Path, bind: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL | None, str]:
    """``source``'s library built for ``-march=$LLAMALAB_KERNEL_ARCH`` (default native) and opened: (library, ''),
    or (None, why) when switched off or it cannot be built."""
    if switched_off():
        return None, "LLAMALAB_KERNELS=0"
    try:
        return open_library(build(source, os.environ.get("LLAMALAB_KERNEL_ARCH", "native")), bind), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"could not build {source.name}: {e}"
