"""Training throughput: llamalab's train step vs Hugging Face ``LlamaForCausalLM`` on the same
config, weights, batch and dtype, in the same process, alternating runs.

    python bench/train_throughput.py [--shapes stories15m,stories110m] [--batch 32,8] [--seq 256]
                                     [--steps 2] [--rounds 2] [--compile] [--no-memory]

Ours: ``Transformer`` + ``parallelize`` (fused chunked output projection + cross-entropy, the
trainer's defaults) + ``forward_backward`` + ``clip_and_step``: exactly what ``Trainer`` runs per
step. HF: ``LlamaForCausalLM`` (its default SDPA attention, eager mode) built from our exported
weights, logits -> ``F.cross_entropy`` -> backward, then the same clip and AdamW. Both use the same
AdamW implementation (fused where the device has it). The first step's losses are printed side by
side: they must agree (same model, same batch), which checks the comparison is like for like.

Timing: one warm-up step each, then ``--rounds`` rounds of ``--steps`` steps per model, the order
alternating between rounds; tokens/s is the best round (the machine is shared: the best round is
the least disturbed one). MFU = 6N+attention FLOPs per token (``flops_per_token``) x tokens/s over
a square fp32 matmul peak measured in this run, before every round, best of all (the peak, too,
is taken when the machine is least disturbed; a single measurement under load gave MFU > 100%).

Memory: bytes of tensors autograd keeps for backward in one forward (distinct storages, counted by
``saved_tensors_hooks``) with and without activation checkpointing, ours and HF's
(``gradient_checkpointing_enable``); on CUDA also ``max_memory_allocated`` of one full step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build_pair(shape: str, seq: int, device: torch.device, tmp: Path, compile_: bool):
    import transformers

    from llamalab.interop.hf import export_hf
    from llamalab.model import Transformer, get_preset
    from llamalab.train.distributed import ParallelConfig, parallelize

    cfg = get_preset(shape).model
    cfg.max_seq_len = max(seq, 16)
    ours = Transformer(cfg)
    ours.init_weights(seed=0)
    export_hf(ours, tmp / shape)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp / shape, torch_dtype=torch.float32).to(device).train()
    ours = parallelize(ours.to(device), ParallelConfig(strategy="none", compile=compile_), device)
    return cfg, ours, hf


def adamw(params, device: torch.device) -> torch.optim.AdamW:
    kw = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    try:
        return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


def ours_step(model, opt, x, y, autocast) -> float:
    from llamalab.train.step import clip_and_step, forward_backward

    res = forward_backward(model, [(x, y)], autocast)
    clip_and_step(model, opt, 1.0)
    return res.loss


def hf_step(model, opt, x, y, autocast) -> float:
    with autocast():
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t0


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn()`` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def memory_rows(shape: str, seq: int, batch: int, device: torch.device, tmp: Path) -> list[str]:
    from llamalab.train.distributed import apply_activation_checkpointing
    from llamalab.train.step import model_loss_sum

    cfg, ours, hf = build_pair(shape, seq, device, tmp, False)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    x, y = tok[:, :-1], tok[:, 1:]

    def hf_loss():
        logits = hf(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")

    mb = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    plain_ours, plain_hf = saved_bytes(lambda: model_loss_sum(ours, x, y)), saved_bytes(hf_loss)
    apply_activation_checkpointing(ours, "full")
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ac_ours, ac_hf = saved_bytes(lambda: model_loss_sum(ours, x, y)), saved_bytes(hf_loss)
    return [f"| {shape} | {batch}x{seq} | {mb(plain_hf)} | {mb(ac_hf)} | {mb(plain_ours)} | {mb(ac_ours)} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="stories15m,stories110m")
    ap.add_argument("--batch", default="32,8", help="sequences per step, one per shape (or one for all)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile'd blocks")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llamalab.common import measure_matmul_peak
    from llamalab.model.config import flops_per_token

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
    import contextlib

    autocast = autocast or contextlib.nullcontext
    shapes = args.shapes.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    batches = batches * len(shapes) if len(batches) == 1 else batches
    peak = measure_matmul_peak(device, dtype, seconds=1.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device} {args.dtype}, AdamW, "
          f"{args.rounds} rounds x {args.steps} steps (best round), matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for shape, batch in zip(shapes, batches):
            rows += bench_shape(shape, batch, args, device, autocast, tmp)
        peak = max([peak, measure_matmul_peak(device, dtype, seconds=1.0), *PEAKS])
        print(f"\nmatmul peak (best of {len(PEAKS) + 2} measurements): {peak / 1e9:.0f} GFLOP/s\n")
        print("| shape | batch x seq | model | tokens/s | vs HF | MFU | rounds (tokens/s) |")
        print("|---|---|---|---|---|---|---|")
        for shape, bt, name, tps, hf_tps, per_round in rows:
            cfg_fpt = flops_per_token(_cfg(shape, args.seq), args.seq)
            print(f"| {shape} | {bt} | {name} | {tps:,.0f} | {tps / hf_tps:.2f}x | {cfg_fpt * tps / peak:.0%} | "
                  f"{', '.join(f'{r:,.0f}' for r in per_round)} |")
        if not args.no_memory:
            print("\nActivation memory kept for backward, MiB (one forward; AC = activation checkpointing, full):\n")
            print("| shape | batch x seq | HF | HF + AC | ours | ours + AC |")
            print("|---|---|---|---|---|---|")
            for shape in shapes:
                for line in memory_rows(shape, args.seq, args.memory_batch, device, tmp):
                    print(line)


def _cfg(shape: str, seq: int):
    from llamalab.model import get_preset

    cfg = get_preset(shape).model
    cfg.max_seq_len = max(seq, 16)
    return cfg


PEAKS: list[float] = []


def bench_shape(shape: str, batch: int, args, device: torch.device, autocast, tmp: Path) -> list[tuple]:
    from llamalab.common import measure_matmul_peak

    cfg, ours, hf = build_pair(shape, args.seq, device, tmp, False)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (batch, args.seq + 1), generator=g).to(device)
    x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    runners = {"HF": (lambda: hf_step(hf, opt_hf, x, y, autocast)),
               "ours": (lambda: ours_step(ours, opt_ours, x, y, autocast))}
    from llamalab.train.optim import OptimConfig, build_optimizer

    opt_ours = build_optimizer(ours, OptimConfig(weight_decay=0.1), 3e-4)
    opt_hf = adamw(hf.parameters(), device)
    if args.compile:
        _, ours_c, _ = build_pair(shape, args.seq, device, tmp, True)
        opt_c = build_optimizer(ours_c, OptimConfig(weight_decay=0.1), 3e-4)
        runners["ours+compile"] = lambda: ours_step(ours_c, opt_c, x, y, autocast)
    first = {name: run() for name, run in runners.items()}  # warm-up (and compile)
    print(f"{shape}: first-step loss " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()), flush=True)
    tokens = batch * args.seq * args.steps
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        PEAKS.append(measure_matmul_peak(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                                         seconds=0.5))
        for name in (names if r % 2 == 0 else names[::-1]):
            per_round[name].append(tokens / timed(runners[name], args.steps, device))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in per_round.items())
              + f" | matmul peak {PEAKS[-1] / 1e9:.0f} GFLOP/s", flush=True)
    hf_best = max(per_round["HF"])
    return [(shape, f"{batch}x{args.seq}", k, max(v), hf_best, v) for k, v in per_round.items()]


if __name__ == "__main__":
    main()
