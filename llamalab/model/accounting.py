"""A preset's size and cost, as rows and printable text (what ``llamalab info`` shows).

The model is built on the meta device, so even the 70B preset is described on a laptop without
allocating a single weight; the parameter count of that meta model is checked against the closed
form :func:`llamalab.model.config.num_params`, so the two can never drift apart.
"""

from __future__ import annotations

from typing import Any

import torch

from llamalab.model.config import (
    flops_per_token,
    format_count,
    format_flops,
    get_preset,
    kv_cache_bytes_per_token,
    num_params,
)
from llamalab.model.transformer import Transformer

A100_BF16_FLOPS = 312e12  # peak dense bf16 FLOP/s of an A100, for the compute estimate
ASSUMED_MFU = 0.4


def describe(name: str, seq_len: int = 0) -> dict[str, Any]:
    """One preset -> a row of its shape, parameter count, FLOPs, KV-cache bytes and training recipe."""
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


def preset_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :func:`describe` as one aligned table, a line per preset."""
    lines = [f"{'preset':<14} {'params':>9} {'dim':>5} {'L':>3} {'H':>3} {'KV':>3} {'ffn':>6} {'ctx':>6} "
             f"{'FLOPs/tok':>10} {'KV B/tok':>9} {'train FLOPs':>11}"]
    for r in rows:
        lines.append(f"{r['preset']:<14} {format_count(r['params']):>9} {r['dim']:>5} {r['n_layers']:>3} "
                     f"{r['n_heads']:>3} {r['n_kv_heads']:>3} {r['ffn_hidden']:>6} {r['context']:>6} "
                     f"{format_flops(r['train_flops_per_token']):>10} {r['kv_cache_bytes_per_token_bf16']:>9,} "
                     f"{format_flops(r['training_flops']) if r['training_flops'] else '-':>11}")
    return "\n".join(lines)


def preset_summary(r: dict[str, Any], seq_len: int = 0) -> str:
    """One row of :func:`describe` as labelled lines (shape, parameters, FLOPs, KV cache, recipe, compute)."""
    lines = [
        f"preset            {r['preset']}  ({r['note']})",
        f"shape             dim {r['dim']}, {r['n_layers']} layers, {r['n_heads']} heads, {r['n_kv_heads']} KV heads, "
        f"SwiGLU hidden {r['ffn_hidden']}, vocab {r['vocab']}, context {r['context']}",
        f"parameters        {r['params']:,} ({format_count(r['params'])}); without embeddings "
        f"{r['params_non_embedding']:,}",
        f"FLOPs per token   {format_flops(r['train_flops_per_token'])} training (6N + 12·L·H·Dh·T, "
        f"T={seq_len or r['context']})",
        f"KV cache          {r['kv_cache_bytes_per_token_bf16']:,} bytes per token (bf16), "
        f"{r['kv_cache_bytes_per_token_bf16'] * r['context'] / 2**20:,.1f} MiB per full-context sequence",
        f"recipe            peak LR {r['peak_lr']:g}, batch {format_count(r['batch_tokens'])} tokens",
    ]
    if r["train_tokens"]:
        days = r["training_flops"] / (A100_BF16_FLOPS * ASSUMED_MFU * 3600 * 24)
        lines.append(f"training compute  {format_flops(r['training_flops'])} FLOPs for "
                     f"{format_count(r['train_tokens'])} tokens ({days:,.0f} A100-days at 40% of 312 TFLOP/s)")
    return "\n".join(lines)
