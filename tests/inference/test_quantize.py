"""The quantised linears against their references: the blocks hold what llama.cpp's q8_0/q4_1 would (checked by
the ``gguf`` package's dequantiser where it applies), and each linear equals ``x @ dequantised.T`` up to bf16
rounding of its inputs and output; every choice runs the same fused Runner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalab import native
from llamalab.common import LlamalabError
from llamalab.inference import kernels
from llamalab.inference.quantize import (
    QUANT_CHOICES,
    BlockLinear,
    DenseLinear,
    ExactTop,
    Int4Linear,
    Int8RowLinear,
    QuantWeight,
    make_head,
    make_linear,
    quantize_q4,
    quantize_q8,
)


def _w(n: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 5] = 0.9  # an outlier: its block alone gets a coarse scale
    return w


BLOCKS = (BlockLinear, Int4Linear)  # the two implementations of 32-block weights
needs_kernel = pytest.mark.skipif(kernels.load() is None, reason=f"native kernel not built: {kernels.why_not()}")


def _ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """PyTorch's kernels' arithmetic done in fp32: bf16 inputs, fp32 sums, the result rounded to bf16."""
    return (x.bfloat16().float() @ w.t()).bfloat16().float()


def _close_to_exact(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """The native kernel against float64 arithmetic: its activations (two int8 planes per 32-block, ~16 bits) err
    by ~1e-5 of the output scale; bf16 activations, as PyTorch's kernels take, would err by ~4e-3."""
    exact = x.double() @ w.double().t()
    err = ((y.double() - exact).norm() / exact.norm()).item()
    assert err < 1e-4, err


def test_the_native_kernel_builds_here_or_says_why():
    """CI's machines are x86-64 with a C compiler: the kernel must build there, not silently fall back."""
    import platform
    import shutil

    if platform.machine().lower() in ("x86_64", "amd64") and shutil.which("cc") and "avx2" in native.cpu_flags():
        assert kernels.load() is not None, kernels.why_not()
        assert kernels.isa() in kernels.ISA.values()
    else:
        assert kernels.load() is not None or kernels.why_not()


@needs_kernel
@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_kernel_is_the_blockwise_product(kind, threads):
    """Every row count the kernel unrolls (1-4 and a remainder), a block of zeros and one of outliers: the product
    equals float64 arithmetic on the dequantised weights to ~1e-5."""
    w = _w(40, 96)
    qw = quantize_q8(w) if kind == "q8" else quantize_q4(w)
    lin, deq = BlockLinear(qw), qw.dequantize()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for m in (1, 2, 3, 4, 5, 9):
            x = torch.randn(m, 96)
            x[0, 32:64] = 0.0  # a block of zeros (scale 0)
            x[-1, 64] = 50.0  # an outlier: its block's other values sit in the low plane
            _close_to_exact(lin(x), x, deq)
    finally:
        torch.set_num_threads(before)
    x = torch.randn(1, 96)
    x[0, 70] = float("nan")
    assert torch.isnan(lin(x)).all()  # a NaN activation is not quantised away


@needs_kernel
@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_long_prefills_take_one_sgemm_on_the_same_values(kind, monkeypatch):
    """From DENSE_ROWS rows BlockLinear widens its blocks to fp32 once and runs one sgemm: the same values as the
    kernel's (``dense()`` equals the blocks' dequantisation exactly), the same fused norm / SwiGLU / residual."""
    from llamalab.inference import quantize

    w = _w(40, 96)
    qw = quantize_q8(w) if kind == "q8" else quantize_q4(w)
    lin = BlockLinear(qw)
    assert torch.equal(lin.dense(), qw.dequantize())
    m = quantize.DENSE_ROWS + 3
    x, x2, res = torch.randn(m, 96), torch.randn(m, 192), torch.randn(m, 40)
    g = torch.rand(96) + 0.5
    _close_to_exact(lin(x), x, qw.dequantize())
    dense = [lin.fused(x, norm=g, eps=1e-5), lin.fused(x2, swiglu=True, residual=res)]
    monkeypatch.setattr(quantize, "DENSE_ROWS", 10 ** 9)  # the kernel's own fp32 path for the same rows
    native = [lin.fused(x, norm=g, eps=1e-5), lin.fused(x2, swiglu=True, residual=res)]
    for a, b in zip(dense, native):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_q8_blocks_round_to_nearest_and_match_the_gguf_quantiser():
    w = _w()
    qw = quantize_q8(w)
    assert qw.q.dtype == torch.int8 and qw.scale.shape == (48, 3)
    err = (qw.dequantize() - w).abs()
    assert bool((err <= qw.scale.repeat_interleave(32, 1) * 0.5 + 1e-7).all())  # half a step at most
    gguf = pytest.importorskip("gguf")
    from llamalab.interop.gguf import block_weight

    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    theirs = block_weight(raw, 8, (48, 96))
    assert torch.equal(theirs.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, 8)))
    # llama.cpp's q8_0 integers, up to the scale's precision (f16 there, bf16 here): a rare one differs by one
    diff = (qw.q.int() - theirs.q.int()).abs()
    assert int(diff.max()) <= 1 and diff.float().mean() < 0.1
    torch.testing.assert_close(qw.scale, theirs.scale, rtol=2 ** -8, atol=0)


def test_q4_blocks_span_each_block():
    w = _w()
    qw = quantize_q4(w)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    err = (qw.dequantize() - w).abs()
    step = qw.scale.repeat_interleave(32, 1)
    assert bool((err <= step * 0.5 + 2 ** -8 * w.abs().amax()).all())
    # asymmetric: each block's min and max are (close to) grid points, unlike a symmetric q4_0 grid
    blocks = w.view(48, 3, 32)
    d = qw.dequantize().view(48, 3, 32)
    assert (d.amin(-1) - blocks.amin(-1)).abs().max() < 0.05 * (blocks.amax(-1) - blocks.amin(-1)).max()


@needs_kernel
def test_the_avx2_build_computes_the_same(tmp_path, monkeypatch):
    """The AVX2 + FMA path (no VNNI: maddubs + madd) is what AVX2-only CPUs run: build it here and compare."""
    monkeypatch.setenv("LLAMALAB_CACHE", str(tmp_path))
    try:
        lib = kernels.open_library(kernels.build("haswell"))
    except (OSError, RuntimeError) as e:
        pytest.skip(f"no haswell build here: {e}")
    assert kernels.ISA[lib.qdot_isa()] == "AVX2"
    assert list(tmp_path.glob("kernels/qdot-*.so"))  # built into the cache named by LLAMALAB_CACHE
    for qw in (quantize_q8(_w(40, 96)), quantize_q4(_w(40, 96))):
        lin = BlockLinear(qw)
        x = torch.randn(5, 96)
        y = kernels.qgemm(x, lin.q, lin.s, lin.c, lib=lib)
        _close_to_exact(y, x, qw.dequantize())
        torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_the_kernel_builds_in_the_temp_folder_when_the_cache_is_not_writable(tmp_path, monkeypatch):
    import tempfile

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LLAMALAB_CACHE", str(blocker))  # mkdir under a file fails, as a read-only home does
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = kernels.build("haswell")
    assert path.parent.parent == tmp_path / "tmp" and path.exists()
    assert kernels.build("haswell") == path  # cached: found again, not rebuilt


@pytest.mark.parametrize("quantize,cls", [("int8", BlockLinear), ("int8", Int4Linear), ("int8-wo", Int8RowLinear),
                                         ("int4", BlockLinear), ("int4", Int4Linear)])
@pytest.mark.parametrize("n", [48, 40])  # 40: rows padded to the int4 kernel's multiple of 16
def test_linears_equal_their_dequantised_weights(quantize, cls, n):
    w = _w(n)
    if quantize == "int8-wo":
        lin = make_linear(w, quantize)
        assert isinstance(lin, cls)
        deq = lin.wq.float() * lin.scales.float()[:, None]
    else:
        qw = quantize_q8(w) if quantize == "int8" else quantize_q4(w)
        if cls is BlockLinear and kernels.load() is None:
            pytest.skip(f"native kernel not built: {kernels.why_not()}")
        picked = make_linear(w, quantize)  # the native kernel where it builds, else PyTorch's
        assert isinstance(picked, BlockLinear if kernels.load() is not None else Int4Linear)
        lin, deq = cls(qw), qw.dequantize()
        assert lin.kind == {"int8": "q8", "int4": "q4"}[quantize]
    x = torch.randn(2, 5, 96)
    y = lin(x)
    assert y.shape == (2, 5, n) and y.dtype == torch.float32
    if cls is BlockLinear:
        _close_to_exact(y, x, deq)
    else:
        want = _ref(x, deq)
        torch.testing.assert_close(y, want, atol=2e-3 * want.abs().max().item(), rtol=1e-2)
    # and close to the unquantised product: int8 within 1%, int4 within 10% of the output scale
    full = x @ w.t()
    rel = ((y - full).norm() / full.norm()).item()
    assert rel < {"int8": 0.01, "int8-wo": 0.02, "int4": 0.1}[quantize], rel


@pytest.mark.parametrize("cls", BLOCKS)
def test_q8_ends_of_int8_run_exactly(cls):
    """-128 and 127 (the ends of int8; a file's q8_0 may hold -128) survive the int4 kernel's hi/lo split and the
    native kernel's sign trick (|w| as unsigned, x taking w's sign): the product equals the dequantised one."""
    if cls is BlockLinear and kernels.load() is None:
        pytest.skip(f"native kernel not built: {kernels.why_not()}")
    q = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    q[0, :4] = torch.tensor([-128, 127, 0, -1], dtype=torch.int8)
    scale = torch.full((32, 2), 2.0 ** -6)
    lin = cls(QuantWeight("q8", q, scale))
    x = torch.zeros(1, 64)
    for j in range(4):
        x.zero_()
        x[0, j] = 1.0
        assert lin(x)[0, 0].item() == pytest.approx(q[0, j].item() * 2.0 ** -6, rel=1e-6, abs=0)
    x = torch.full((1, 64), -1.0)  # a whole row at the ends: integer sums of +-128 x 127 must not saturate
    want = (q.float() * 2.0 ** -6).sum(1).neg()
    tol = 1e-5 if cls is BlockLinear else 2 ** -8  # PyTorch's kernel returns bf16
    torch.testing.assert_close(lin(x)[0], want, rtol=tol, atol=tol)


def test_file_blocks_are_used_as_they_are_and_dequantised_under_none():
    qw = quantize_q4(_w())
    lin = make_linear(qw, "int8")  # a file's q4 blocks run as int4 under any quantised choice
    assert isinstance(lin, BLOCKS) and lin.kind == "q4"
    dense = make_linear(qw, "none")
    assert isinstance(dense, DenseLinear) and torch.equal(dense.weight, qw.dequantize())
    assert QuantWeight.cat([qw, quantize_q8(_w())]) is None  # mixed kinds are not fused
    both = QuantWeight.cat([qw, qw])
    assert both.shape == (96, 96) and torch.equal(both.dequantize()[48:], qw.dequantize())


def test_rows_not_whole_blocks_fall_back_to_per_row_int8_and_bad_choices_are_refused():
    w = torch.randn(24, 48)
    lin = make_linear(w, "int4")
    assert isinstance(lin, Int8RowLinear)
    x = torch.randn(3, 48)
    torch.testing.assert_close(lin(x), _ref(x, lin.wq.float() * lin.scales.float()[:, None]), atol=0.05, rtol=0.01)
    # rows not a multiple of 16: PyTorch's int8 kernel is wrong there (garbage at 40, a crash at 100): stay dense
    for k in (40, 100):
        for q in ("int8", "int8-wo", "int4"):
            assert isinstance(make_linear(torch.randn(16, k), q), DenseLinear)
            assert isinstance(make_head(torch.randn(16, k), q), DenseLinear)
    with pytest.raises(LlamalabError, match="quantize: unknown value 'int3'"):
        make_linear(torch.randn(16, 32), "int3")
    assert QUANT_CHOICES == ("none", "int8", "int8-wo", "int4")


def test_bound_blocks_stop_holding_a_changed_tensor():
    t = torch.randn(16, 32)
    qw = quantize_q8(t).bind(t)
    assert qw.holds(t)
    t.add_(1.0)  # trained in place
    assert not qw.holds(t) and not qw.holds(torch.randn(16, 32))


@pytest.mark.parametrize("quantize", ["int8", "int8-wo", "int4"])
def test_runner_quantised_close_to_fp32(quantize):
    """The whole fused decode path with each choice stays close to fp32 (the int4 head stays int8)."""
    from llamalab.inference.runner import Runner
    from tests.inference.conftest import small_model

    model = small_model(seed=1)
    ids = list(range(5, 37))
    ref = Runner(model, slots=1).prefill(0, ids, all_logits=True)
    r = Runner(model, slots=1, quantize=quantize)
    assert isinstance(r.output, ExactTop)
    assert isinstance(r.output.lin, BLOCKS) and r.output.lin.kind == "q8"  # the head: int8 blocks always
    assert isinstance(r.layers[0].wqkv, Int8RowLinear if quantize == "int8-wo" else BLOCKS)
    if quantize == "int4":
        assert r.layers[0].wqkv.kind == "q4"
    got = r.prefill(0, ids, all_logits=True)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.02, "int8-wo": 0.03, "int4": 0.15}[quantize], rel
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= {"int4": 0.8}.get(quantize, 0.9), agree


@pytest.mark.parametrize("quantize,k", [("int8", 64), ("int8-wo", 64), ("int4", 64), ("int4", 48)])
def test_head_top_logits_are_exact_for_its_quantised_rows(quantize, k):
    """bf16 output rounding must not reorder the head's top tokens: its top-16 logits are the fp32 products."""
    w = torch.randn(1000, k) * 0.3
    head = make_head(w, quantize)
    if k % 32:  # rows not whole blocks: per-row int8
        deq = head.lin.wq.float() * head.lin.scales.float()[:, None]
    else:
        assert head.lin.kind == "q8"  # every choice keeps the head at int8 blocks
        deq = quantize_q8(w).dequantize()
    x = torch.randn(3, k) * 4
    y, exact = head(x), x @ deq.t()
    top = exact.topk(5, -1).indices
    torch.testing.assert_close(y.gather(1, top), exact.gather(1, top), atol=1e-5, rtol=1e-6)
    assert torch.equal(y.argmax(-1), exact.argmax(-1))
    assert (y - exact).abs().max() < 0.01 * exact.abs().max()  # the rest: bf16 rounding
    assert isinstance(make_head(w, "none"), DenseLinear)


def test_dense_linear_layouts():
    """fp32 on the CPU: at 1 thread a transposed (K, N) copy (MKL for one row, oneDNN for several), at 2 threads the
    (N, K) weight through oneDNN; bf16 keeps F.linear. Every path computes x @ w.T, for one row and several."""
    w = torch.randn(48, 32)
    x1, xs = torch.randn(1, 1, 32), torch.randn(2, 3, 32)
    before = torch.get_num_threads()
    try:
        for threads, transposed in ((1, True), (2, not torch.backends.mkldnn.is_available())):
            torch.set_num_threads(threads)
            lin = DenseLinear(w)
            assert lin.transposed == transposed and lin.w.is_contiguous()
            assert lin.w.shape == ((32, 48) if transposed else (48, 32))
            assert torch.equal(lin.weight, w)
            for x in (x1, xs):
                torch.testing.assert_close(lin(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)
    lb = DenseLinear(w.bfloat16())
    assert not lb.transposed and lb.w.shape == (48, 32)
    torch.testing.assert_close(lb(xs.bfloat16()), F.linear(xs.bfloat16(), w.bfloat16()))


@needs_kernel
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_runner_fuses_norms_swiglu_and_residuals_into_the_native_kernel(quantize):
    """With the native kernel on every matrix, the eager step calls BlockLinear.fused (norm, SwiGLU and residual
    inside the kernel call): the logits equal the unfused step's, in prefill and decode, rows at different lengths."""
    from llamalab.inference.runner import Runner
    from llamalab.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    fused, plain = Runner(model, slots=2, quantize=quantize), Runner(model, slots=2, quantize=quantize)
    assert fused._fuse and isinstance(fused.layers[0].w2, BlockLinear)
    plain._fuse = False
    ids = list(range(5, 37))
    for r in (fused, plain):
        r.prefill(1, ids[:7])
    a, b = fused.prefill(0, ids, all_logits=True), plain.prefill(0, ids, all_logits=True)
    torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    for step in range(3):
        t = torch.tensor([40 + step, 50 + step])
        b = plain.decode(t)
        torch.testing.assert_close(fused.decode(t), b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    assert not Runner(model, slots=1, quantize=quantize, compile=True)._fuse  # a compiled step keeps the ops
