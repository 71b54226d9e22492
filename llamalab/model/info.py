"""Print a preset's size and cost: parameters, FLOPs per token, KV-cache bytes, training compute.

The model is built on the meta device, so even the 70B preset prints on a laptop without
allocating a single weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamalab.model.config import (PRESETS, flops_per_token, format_count, format_flops, get_preset,
                                   kv_cache_bytes_per_token, num_params)
from llamalab.model.transformer import Transformer


@dataclass
class Config:
    preset: str = field(default="tiny", metadata={"choices": list(PRESETS), "help": "model preset"})
    seq_len: int = field(default=0, metadata={"help": "sequence length for FLOPs (0: the preset's context)"})
    all: bool = field(default=False, metadata={"help": "print a table of every preset"})


def describe(name: str, seq_len: int = 0) -> dict:
    p = get_preset(name)
    cfg = p.model
    with torch.device("meta"):
        model = Transformer(cfg)  # no memory allocated
    n = model.num_params()
    assert n == num_params(cfg)
    T = seq_len or cfg.max_seq_len
    fpt = flops_per_token(cfg, T)
    return {
        "preset": name, "params": n, "params_non_embedding": num_params(cfg, embeddings=False),
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
        "ffn_hidden": cfg.ffn_hidden_dim, "context": cfg.max_seq_len, "vocab": cfg.vocab_size,
        "train_flops_per_token": fpt, "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg, 2),
        "peak_lr": p.peak_lr, "batch_tokens": p.batch_tokens, "train_tokens": p.train_tokens,
        "training_flops": fpt * p.train_tokens, "note": p.note,
    }


def main(cfg: Config) -> list[dict]:
    names = list(PRESETS) if cfg.all else [cfg.preset]
    rows = [describe(n, cfg.seq_len) for n in names]
    if cfg.all:
        print(f"{'preset':<12} {'params':>9} {'dim':>5} {'L':>3} {'H':>3} {'KV':>3} {'ffn':>6} {'ctx':>5} "
              f"{'FLOPs/tok':>10} {'KV B/tok':>9} {'train FLOPs':>11}")
        for r in rows:
            print(f"{r['preset']:<12} {format_count(r['params']):>9} {r['dim']:>5} {r['n_layers']:>3} "
                  f"{r['n_heads']:>3} {r['n_kv_heads']:>3} {r['ffn_hidden']:>6} {r['context']:>5} "
                  f"{format_flops(r['train_flops_per_token']):>10} {r['kv_cache_bytes_per_token_bf16']:>9,} "
                  f"{format_flops(r['training_flops']) if r['training_flops'] else '-':>11}")
        return rows
    r = rows[0]
    print(f"preset            {r['preset']}  ({r['note']})")
    print(f"shape             dim {r['dim']}, {r['n_layers']} layers, {r['n_heads']} heads, {r['n_kv_heads']} KV heads, "
          f"SwiGLU hidden {r['ffn_hidden']}, vocab {r['vocab']}, context {r['context']}")
    print(f"parameters        {r['params']:,} ({format_count(r['params'])}); without embeddings "
          f"{r['params_non_embedding']:,}")
    print(f"FLOPs per token   {format_flops(r['train_flops_per_token'])} training (6N + 12·L·H·Dh·T, T={cfg.seq_len or r['context']})")
    print(f"KV cache          {r['kv_cache_bytes_per_token_bf16']:,} bytes per token (bf16), "
          f"{r['kv_cache_bytes_per_token_bf16'] * r['context'] / 2**20:,.1f} MiB per full-context sequence")
    print(f"recipe            peak LR {r['peak_lr']:g}, batch {format_count(r['batch_tokens'])} tokens")
    if r["train_tokens"]:
        print(f"training compute  {format_flops(r['training_flops'])} FLOPs for {format_count(r['train_tokens'])} tokens "
              f"({r['training_flops'] / (312e12 * 0.4 * 3600 * 24):,.0f} A100-days at 40% of 312 TFLOP/s)")
    return rows


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
