"""The LLaMA Transformer: a plain ``nn.Module``, free of parallelism, I/O and sampling.

Pre-norm decoder blocks: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)); a final
RMSNorm and an untied (or optionally tied) output projection. No biases anywhere.

Build large models without allocating weights::

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cuda")   # after sharding, under FSDP
    model.init_weights()

Weight init (``cfg.init``):
- ``llama``: normal(0, 0.02) for every matrix and the embedding; the residual output projections
  (attention ``wo`` and feed-forward ``w2``) scaled by 1/sqrt(2 * n_layers) (GPT-2 / torchtitan).
- ``opt``: normal(0, 0.006) with the same 1/sqrt(2 * n_layers) residual scaling (OPT, Megatron-LM).
"""

from __future__ import annotations

import torch
from torch import nn

from llamalab.model.attention import Attention, KVCache
from llamalab.model.config import ModelConfig
from llamalab.model.layers import FeedForward, RMSNorm, WeightInit, dynamic_seq_len, precompute_freqs_cis


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, kv_cache: KVCache | None = None,
                start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, kv_cache, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init: WeightInit) -> None:
        # NOTE: the order of named_parameters(), which fixes the draws of a seeded init
        self.attention.init_weights(init)
        self.feed_forward.init_weights(init)
        self.attention_norm.init_weights(init)
        self.ffn_norm.init_weights(init)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # NOTE: stored as real (T, D/2, 2) fp32, not complex: Module.to(bf16) would silently drop the
        # imaginary part of a complex buffer. Non-persistent: recomputed, never checkpointed.
        self.register_buffer("freqs_cis", self._freqs(), persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def _freqs(self) -> torch.Tensor:
        cfg = self.cfg
        return torch.view_as_real(precompute_freqs_cis(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling))

    def rope(self, start_pos: int, T: int) -> torch.Tensor:
        """(cos, sin) of positions [start_pos, start_pos+T) as (T, D/2, 2) fp32: the precomputed table, or for
        ``dynamic`` RoPE scaling past the original context the frequencies of seq_len = start_pos + T."""
        seq_len = dynamic_seq_len(self.cfg.rope_scaling, start_pos + T)
        if seq_len is None:
            return self.freqs_cis[start_pos:start_pos + T].float()
        cfg = self.cfg
        fc = precompute_freqs_cis(cfg.head_dim, seq_len, cfg.rope_theta, cfg.rope_scaling, seq_len, start=start_pos)
        return torch.view_as_real(fc).to(self.freqs_cis.device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, init: WeightInit | None = None) -> None:
        """(Re)initialise every weight per ``cfg.init`` and rebuild the rotary table (also after meta).

        ``seed``: draw from a CPU generator seeded with it (the same weights on any device);
        ``init``: draw through this :class:`WeightInit` instead (FSDP passes a sharding one).
        """
        if init is None:
            init = WeightInit.for_model(self.cfg.init, self.cfg.n_layers, seed)
        if self.cfg.tie_embeddings:  # NOTE: to_empty() from meta unties shared parameters; tie again
            self.output.weight = self.tok_embeddings.weight
        self.freqs_cis.copy_(self._freqs().to(self.freqs_cis.device))
        init.normal_(self.tok_embeddings.weight, init.std)
        for layer in self.layers:
            layer.init_weights(init)
        self.norm.init_weights(init)
        if not self.cfg.tie_embeddings:
            init.normal_(self.output.weight, init.std)

    def forward(self, tokens: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0,
                mask: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) in fp32.

        ``kv_cache``: decode incrementally; ``tokens`` sit at positions [start_pos, start_pos+T).
        ``mask``: optional boolean (B or 1, 1, T, S) attention mask (True = may attend) replacing
        the causal one, for packed sequences or left-padded batches.
        ``keep``: optional boolean (B, T): only those positions' logits, as (N, V) in row-major order (HF's
        ``logits_to_keep``). NOTE: the (B, T, V) logits of a 49k vocabulary are GBs at a few thousand tokens;
        a preference loss reads only the answer positions, a quarter of them on HH-RLHF.
        """
        h = self.hidden(tokens, kv_cache, start_pos, mask)  # (B, T, dim)
        if keep is not None:
            h = h[keep]  # (N, dim)
        return self.output(h).float()

    def hidden(self, tokens: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> the final normed hidden states (B, T, dim), before the output head: what a
        reward model's or value head's scalar projection reads. Arguments as in :meth:`forward`."""
        B, T = tokens.shape
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        freqs_cis = self.rope(start_pos, T)  # (T, D/2, 2): cos, sin
        for layer in self.layers:
            h = layer(h, freqs_cis, kv_cache, start_pos, mask)
        return self.norm(h)  # (B, T, dim)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok_embeddings.weight.numel()
