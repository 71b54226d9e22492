"""Generation speed: llamalab's engine vs Hugging Face ``generate`` on the same random weights.

    python bench/generate.py [--shapes stories15m,stories110m] [--batches 1,8] [--new-tokens 256]

For each shape and batch size: a 16-token prompt per row, greedy decoding of ``--new-tokens`` tokens
with EOS ignored, timed end to end (prefill included) after one warm-up run. Rows: HF fp32, ours
fp32, ours int8 (int8 weights, fbgemm dynamic-int8 matmuls). Prints a markdown table: tokens/s
(new tokens of all rows / seconds) and the ratio to HF. Threads: --threads (default 2).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def hf_model(model, tmp: Path):
    import transformers

    from llamalab.interop.hf import export_hf

    export_hf(model, tmp / "hf")
    return transformers.LlamaForCausalLM.from_pretrained(tmp / "hf", torch_dtype=torch.float32).eval()


def time_hf(hf, prompts: torch.Tensor, new: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        dt = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new
    return dt


def time_ours(engine, prompts: torch.Tensor, new: int) -> float:
    from llamalab.inference.sampling import SamplingParams

    p = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts.tolist(), p)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == new for o in outs)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="stories15m,stories110m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llamalab.inference.engine import Engine
    from llamalab.model import Transformer, get_preset

    class _Tok:  # the benchmark needs no text: ids in, ids out
        bos_id, eos_id = 1, 2
        vocab_size = 32000

        def encode(self, text, bos=False, eos=False):
            raise NotImplementedError

        def decode(self, ids):
            return ""

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy, EOS ignored\n")
    print("| shape | batch | HF fp32 tok/s | ours fp32 tok/s | ours int8 tok/s | fp32 / HF | int8 / HF |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        cfg = get_preset(shape).model
        cfg.max_seq_len = args.prompt_tokens + args.new_tokens + 8
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_model(model, Path(tmp))
        for b in [int(x) for x in args.batches.split(",")]:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_tokens), generator=g)
            time_hf(hf, prompts, 8)  # warm-up
            t_hf = time_hf(hf, prompts, args.new_tokens)
            res = {}
            for q in ("none", "int8"):
                eng = Engine(model, _Tok(), slots=b, quantize=q)
                time_ours(eng, prompts, 8)
                res[q] = time_ours(eng, prompts, args.new_tokens)
            n = b * args.new_tokens
            hf_r, f_r, i_r = n / t_hf, n / res["none"], n / res["int8"]
            print(f"| {shape} | {b} | {hf_r:.0f} | {f_r:.0f} | {i_r:.0f} | {f_r / hf_r:.1f}x | {i_r / hf_r:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
