"""Causal self-attention with grouped-query attention (GQA) and an explicit KV cache.

GQA shares each key/value head among ``n_heads // n_kv_heads`` query heads (Ainslie et al. 2023,
used by Llama-2 34B/70B); ``repeat_kv`` expands them before ``scaled_dot_product_attention``, which
picks a fused (flash / memory-efficient) kernel where one exists.

The KV cache is an object the caller creates and passes to ``Transformer.forward``: the model holds
no decoding state, so the same module serves training, scoring and batched generation.
NOTE: the cache is preallocated to ``max_seq_len`` once; decoding writes into it in place and never
reallocates, which keeps per-token overhead flat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.model import fused
from llamalab.model.config import ModelConfig
from llamalab.model.layers import WeightInit, apply_rotary_emb


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, Hkv, D) -> (B, T, Hkv * n_rep, D), each KV head repeated n_rep times in place."""
    if n_rep == 1:
        return x
    B, T, Hkv, D = x.shape
    return x[:, :, :, None, :].expand(B, T, Hkv, n_rep, D).reshape(B, T, Hkv * n_rep, D)


class KVCache:
    """Preallocated keys and values for every layer: k[layer], v[layer] of shape (B, Hkv, S, D)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        self.batch_size = batch_size
        shape = (batch_size, cfg.kv_heads, self.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    def update(self, layer: int, start_pos: int, xk: torch.Tensor, xv: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, T, D) at positions [start_pos, start_pos+T); return keys/values [0, start_pos+T)."""
        B, T = xk.shape[0], xk.shape[2]
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked for {end}")
        self.k[layer][:B, :, start_pos:end] = xk
        self.v[layer][:B, :, start_pos:end] = xv
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def init_weights(self, init: WeightInit) -> None:
        """q, k, v at ``init.std``; the output projection writes the residual: ``init.resid_std``."""
        for w in (self.wq, self.wk, self.wv):
            init.normal_(w.weight, init.std)
        init.normal_(self.wo.weight, init.resid_std)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, kv_cache: KVCache | None = None,
                start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # NOTE: heads counted from the projections' widths (-1), not n_heads: under tensor
        # parallelism each rank's wq/wk/wv hold 1/tp of the heads, and n_rep is unchanged
        xq = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        xk = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        xv = self.wv(x).view(B, T, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        if kv_cache is None and mask is None:  # the fused CPU kernel where it applies (fp32, T > 1)
            out = fused.attention(xq, xk, xv)  # (B, T, H, D)
            if out is not None:
                return self.wo(out.reshape(B, T, -1))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, xk.transpose(1, 2), xv.transpose(1, 2))
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, Hkv, D)
        else:
            k, v = xk, xv
        q = xq.transpose(1, 2)  # (B, H, T, D)
        k = repeat_kv(k, self.n_rep).transpose(1, 2)  # (B, H, S, D)
        v = repeat_kv(v, self.n_rep).transpose(1, 2)
        if mask is None and T > 1:
            if k.shape[2] == T:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # prefill after a cached prefix: causal mask offset by start_pos
                causal = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.wo(out)
