"""Where a decoded token's time goes: our engine at batch 1 on a real model, by kind of work.

    python bench/decode_profile.py [--model PATH.gguf] [--threads 1] [--tokens 64] [--quantize none,int8,int4]

Runs greedy decoding of ``--tokens`` tokens (after a 16-token prompt and a warm-up) under ``torch.profiler`` and
splits the wall time per token into: weight matmuls (dense ``mm``/``linear``, PyTorch's int4/int8 kernels or
llamalab's native one, named ``llamalab::qgemm`` while profiling), attention (SDPA, or the native decode attention
named ``llamalab::attn_decode``), norms, casts and copies (bf16 in/out of the quantised kernels, KV-cache writes),
sampling (top-k, argmax, softmax), other aten ops, and what no aten op accounts for: Python, dispatch and the profiler's
own cost (the profiled run is slower than an unprofiled one, printed beside it). Default model: SmolLM2-135M's
GGUF (see bench/generate.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import smollm2_path  # noqa: E402

KINDS = [
    ("weight matmuls", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "_weight_int4pack_mm",
                        "_weight_int8pack_mm", "aten::bmm", "aten::einsum", "llamalab::qgemm")),
    ("attention", ("scaled_dot_product", "flash_attention", "llamalab::attn_decode")),
    ("norms", ("rms_norm",)),
    ("casts + copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::contiguous", "aten::index_put",
                        "aten::_index_put_impl_", "aten::cat", "aten::clone")),
    ("sampling", ("topk", "argmax", "softmax", "multinomial", "aten::max", "aten::sort", "scatter")),
]


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other aten ops"


@contextlib.contextmanager
def _traced_native_kernel():
    """The native kernels are ctypes calls, invisible to the profiler: name them while profiling (the quantised
    GEMM and the decode step's attention)."""
    from llamalab.inference import kernels
    from llamalab.model import fused

    patched = [(kernels, "qgemm", "llamalab::qgemm"), (fused, "attn_decode", "llamalab::attn_decode")]
    plains = [getattr(mod, name) for mod, name, _ in patched]

    def traced(plain, label):
        def call(*args, **kwargs):
            with torch.profiler.record_function(label):
                return plain(*args, **kwargs)
        return call

    for (mod, name, label), plain in zip(patched, plains):
        setattr(mod, name, traced(plain, label))
    try:
        yield
    finally:
        for (mod, name, _), plain in zip(patched, plains):
            setattr(mod, name, plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantize", default="none,int8,int4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import profile

    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    path = smollm2_path(args.model)
    print(f"{path.name}, torch {torch.__version__}, {args.threads} thread(s), {args.tokens} tokens, greedy, batch 1; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    cols = [k for k, _ in KINDS] + ["other aten ops", "Python + dispatch (no aten op)"]
    print("| quantize | tok/s (unprofiled) | ms/token (profiled) | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 3))
    for q in args.quantize.split(","):
        eng = Engine.from_folder(path, slots=1, quantize=q, max_seq_len=256)
        prompt = eng.tokenizer.encode("The capital of France is Paris. The river that runs through it is the")[:16]
        p = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        eng.generate([prompt], p)
        rate = args.tokens / (time.perf_counter() - t0)
        with profile() as prof, _traced_native_kernel():
            t0 = time.perf_counter()
            eng.generate([prompt], p)
            wall = time.perf_counter() - t0
        by: dict[str, float] = defaultdict(float)
        for e in prof.key_averages():
            by[kind_of(e.key)] += e.self_cpu_time_total / 1e6  # seconds
        by["Python + dispatch (no aten op)"] = max(0.0, wall - sum(by.values()))
        per = 1000 * wall / args.tokens
        cells = [f"{1000 * by[c] / args.tokens:.2f} ({100 * by[c] / wall:.0f}%)" for c in cols]
        print(f"| {q} | {rate:.1f} | {per:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
