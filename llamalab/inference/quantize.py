"""Linear layers for inference: fp32/bf16 dense, and int8 weights for fast CPU decoding.

Decoding one token is a chain of matrix-vector products, so its speed is bound by how many weight
bytes are read per token (and, at 15M parameters, by per-op overhead). int8 weights read 4x fewer
bytes than fp32. We measured the options on the 2-core AMD EPYC (AVX-512 VNNI) these benchmarks
run on, for the 32000x288 output head at batch 1 (fp32: 1.6 ms):

- ``int8`` (default, ``torch.ops.quantized.linear_dynamic``, fbgemm): int8 weights with one scale
  per output row; the activation row is quantised to int8 on the fly (per tensor) and the product
  runs in int8 with int32 accumulation. 0.065 ms. This is the same scheme as llama.cpp's q8_0 x q8
  dot product (llama.cpp uses 32-element blocks; we use per-row weight scales).
- ``int8-wo`` (``torch.ops.aten._weight_int8pack_mm``): weight-only int8, activations stay
  floating point (bf16 here). 0.14 ms; 3.5 ms with fp32 activations (no fast kernel).
- ``bf16`` weights: 0.47 ms where the CPU has AVX-512 BF16, far slower elsewhere.

So ``int8`` is the default. NOTE: fbgemm multiplies u8 x s8 pairs into int16; on CPUs without VNNI
that can saturate, so there we quantise activations to 7 bits (``reduce_range``), as PyTorch does.
The int8 path is CPU-only; on CUDA use bf16 weights instead.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from llamalab.common import LlamalabError

Linear = Callable[[torch.Tensor], torch.Tensor]
QUANT_CHOICES = ("none", "int8", "int8-wo")


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def dense_linear(w: torch.Tensor) -> Linear:
    w = w.contiguous()
    return lambda x: F.linear(x, w)


def int8_dynamic_linear(w: torch.Tensor) -> Linear:
    """int8 weights (per-row scales) x int8 activations (dynamic, per tensor), fbgemm kernel."""
    w = w.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    if not hasattr(torch.ops.quantized, "linear_dynamic"):  # a future torch without the fbgemm ops
        return int8_weight_only_linear(w)
    with warnings.catch_warnings():  # NOTE: quantized tensors are deprecated; the kernel is not (yet)
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    reduce_range = not cpu_has_vnni()
    op = torch.ops.quantized.linear_dynamic
    return lambda x: op(x, packed, reduce_range)


def int8_weight_only_linear(w: torch.Tensor) -> Linear:
    """int8 weights (per-row scales), bf16 activations, fp32 result."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    wq = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    sb = scales.to(torch.bfloat16)
    op = torch.ops.aten._weight_int8pack_mm

    def f(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = op(x.reshape(-1, shape[-1]).to(torch.bfloat16), wq, sb)
        return y.float().view(*shape[:-1], wq.shape[0])

    return f


def make_linear(w: torch.Tensor, quantize: str) -> Linear:
    if quantize == "none":
        return dense_linear(w)
    if w.device.type != "cpu":
        raise LlamalabError(f"quantize={quantize!r} is a CPU path; on {w.device.type} use dtype=bf16")
    if quantize == "int8":
        return int8_dynamic_linear(w)
    if quantize == "int8-wo":
        return int8_weight_only_linear(w)
    raise LlamalabError(f"quantize: unknown value {quantize!r}; choose one of {', '.join(QUANT_CHOICES)}")
