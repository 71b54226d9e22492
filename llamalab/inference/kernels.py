"""The native quantised GEMM (``csrc/qdot.c``), compiled on first use with the host's C compiler.

Why a C kernel: PyTorch's only CPU kernel for 32-block weights (``_weight_int4pack_mm_for_cpu``) takes bf16
activations and runs ~10 G weights/s per thread; q8 blocks cost twice that through it (two nibble planes). llama.cpp
is 2-3x faster because it quantises the activations per 32-block to int8 and takes integer dot products
(``vpdpbusd`` on VNNI CPUs, ``vpmaddubsw`` on AVX2). ``qdot.c`` does the same with *two* int8 planes per activation
block (``x = d * (hi + lo / 254)``, ~16 bits): one plane, as llama.cpp does, cost SmolLM2-135M 1.5-2 points of top-1
agreement (int8 0.971 -> 0.956 on the test's text); two planes compute the quantised model to ~1e-5, closer than
the bf16 activations PyTorch's kernel takes (the file's own q4_1 blocks: 1.000 top-1 agreement with its fp32
dequantisation, 0.982 through PyTorch's kernel), for ~15% less speed than one plane. From 4 activation rows on
(batch decode, prefill) the kernel instead widens each weight block to fp32 once and multiplies every row exactly:
the widening is shared, and at 8 rows it is 1.4-1.9x the integer path per matrix, level with PyTorch's kernel.
Decode on SmolLM2-135M, batch 1, 1 thread, AVX-512 VM (``bench/quantize.py``, each vs fp32 in its own run):
``int8`` 1.76x -> 3.13x fp32, ``int4`` 2.54x -> 3.24x; the AVX2 build (``-march=haswell``) 2.69x / 3.10x.

Trade-offs, and what happens when it cannot be used:

- It needs a C compiler (``$CC``, else ``cc``) with OpenMP and an x86-64 CPU with AVX2 + FMA. When either is
  missing, or ``LLAMALAB_KERNELS=0``, :func:`load` returns None and the linears keep PyTorch's kernels (slower,
  bf16 activations). The reason is printed once.
- The library is built with ``-march=native`` (``LLAMALAB_KERNEL_ARCH`` overrides it, e.g. ``haswell`` for the
  AVX2 path on a VNNI CPU) into ``$LLAMALAB_CACHE`` (default ``~/.cache/llamalab``) ``/kernels/``, named by a hash
  of the source, the compiler's version, the flags and this CPU's feature flags: a home directory shared with
  another kind of CPU builds its own copy rather than running foreign instructions. Where that folder cannot be
  written (a read-only home) the temp folder holds it. The build takes ~1 s and is written atomically (a
  temporary file, then a rename).
- Threads: OpenMP over output rows with ``torch.get_num_threads()`` threads; the library links ``libgomp.so.1``,
  the soname torch loads, so both share one OpenMP runtime.
- Eager calls go through ``ctypes`` (~5 us each); under ``torch.compile`` the kernel is the custom op
  ``llamalab::qgemm`` so the decode step stays one graph.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import torch

import llamalab.native as native

SOURCE = Path(__file__).parent / "csrc" / "qdot.c"
ISA = {1: "AVX2", 2: "AVX-VNNI", 3: "AVX-512 VNNI"}

_lib: ctypes.CDLL | None = None
_tried = False
_why = ""


def build(arch: str = "native", cc: str | None = None) -> Path:
    """Compile ``qdot.c`` for ``-march={arch}``, cached: :func:`llamalab.native.build`.
    ``arch="haswell"`` builds the AVX2 + FMA path without VNNI, to check it on a newer CPU."""
    return native.build(SOURCE, arch, cc)


def open_library(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' C types."""
    return native.open_library(path, _bind)


def _bind(lib: ctypes.CDLL) -> None:
    ptr, i64, cint, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    # x, M, K, q, s, c, y, N, threads, norm weight, eps, swiglu, residual
    lib.qgemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, cint, ptr, f32, cint, ptr]
    lib.qgemm.restype = cint


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (and the reason in :func:`why_not`) when it cannot be used here."""
    global _lib, _tried, _why
    if _tried:
        return _lib
    _tried = True
    if platform.machine().lower() in ("x86_64", "amd64") or native.switched_off():
        lib, _why = native.load(SOURCE, _bind)
    else:
        lib, _why = None, f"no kernel for {platform.machine()} (x86-64 only)"
    if lib is not None and not lib.qdot_isa():
        lib, _why = None, "this CPU (or compiler) has no AVX2 + FMA"
    if lib is None and not native.switched_off():
        print(f"llamalab: quantised layers use PyTorch's kernels ({_why})", file=sys.stderr)
    _lib = lib
    return lib


def why_not() -> str:
    """Why :func:`load` returned None ('' when it did not, or was not called)."""
    return _why


def isa() -> str:
    """The instruction set the loaded kernel was built for ('' when there is none)."""
    lib = load()
    return ISA.get(lib.qdot_isa(), "") if lib is not None else ""


def qgemm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None,
          lib: ctypes.CDLL | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
          swiglu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` for x (M, K) fp32 contiguous and w in 32-blocks: ``q`` (N, K) int8 with ``s`` (N, K/32) (q8),
    or ``q`` (N, K/2) packed nibbles with ``s`` and offsets ``c`` (q4, value ``nibble * s + c``). Fused in,
    each optional: ``norm`` (K,) RMSNorm x's rows first; ``swiglu``: x is (M, 2K) ``[gate | up]`` and the input
    ``silu(gate) * up``; ``residual`` (M, N) fp32 contiguous added to the result. ``lib``: another build than the
    loaded one (tests)."""
    m = x.shape[0]
    n, k = q.shape[0], s.shape[1] * 32
    # NOTE: the C side trusts these pointers; the weights are checked when BlockLinear builds them, x here
    if x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != (2 * k if swiglu else k):
        raise ValueError(f"qgemm: x must be fp32, contiguous, {2 * k if swiglu else k} columns wide for a {n} x {k} "
                         f"weight (swiglu={swiglu}); got {x.dtype} {tuple(x.shape)}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != torch.float32
                                 or not residual.is_contiguous()):
        raise ValueError(f"qgemm: residual must be fp32 contiguous ({m}, {n}), got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    y = torch.empty(m, n, dtype=torch.float32)
    if (lib or _lib).qgemm(x.data_ptr(), m, k, q.data_ptr(), s.data_ptr(), None if c is None else c.data_ptr(),
                           y.data_ptr(), n, torch.get_num_threads(), None if norm is None else norm.data_ptr(),
                           eps, swiglu, None if residual is None else residual.data_ptr()):
        raise MemoryError(f"qgemm: no memory for the {m} x {k} quantised activations")
    return y


@torch.library.custom_op("llamalab::qgemm", mutates_args=())
def qgemm_op(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """:func:`qgemm` as an opaque op for ``torch.compile`` graphs."""
    return qgemm(x.contiguous(), q, s, c)


@qgemm_op.register_fake
def _(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)
