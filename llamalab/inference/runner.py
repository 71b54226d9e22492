"""The decoding runner: the Transformer's weights, re-laid out for fast prefill and decode.

``Transformer.forward`` is written for training and clarity. Decoding one token at a time on a
CPU is dominated by per-op overhead at small sizes (stories15M: ~100 small ops per token), so the
runner keeps the same math with fewer, fused ops and no per-token rebuilding:

- q/k/v projections fused into one matrix, gate/up projections fused into one (2 matmuls fewer
  per layer); q and k rotated together in one complex multiply; ``F.rms_norm``; SDPA with GQA.
- One preallocated cache of ``slots`` rows (keys and values, per layer) and an additive attention
  bias per slot, updated in place (one element per token), never rebuilt. The rotary table is
  built once. Each slot has its own position, so a slot can be refilled with a new request while
  the others keep decoding (continuous batching) and rows of different lengths need no padding.
- Prefill returns the last position's logits only, unless all positions are asked for
  (prompt log-probabilities), which skips most of the large output matmul.
- Optional int8/int4 weights (``quantize.py``; a GGUF file's q4_0/q4_1/q8_0 blocks are run as they are, from
  ``model.quant_weights``); fp32 weights on the CPU laid out for the faster GEMM per case (``DenseLinear``:
  MKL on a transposed copy for one row at 1 thread, oneDNN for several rows or 2+ threads).
- Optional ``torch.compile`` of the decode step: one graph with dynamic shapes (the rotation in real arithmetic,
  no graph breaks), so the growing length does not recompile it. Measured on stories15M, batch 1, 1 thread:
  +12-14% (int4) and +1% (fp32, where the matmuls are the time) after a ~25 s compile (~65 s for SmolLM2-135M);
  hence off by default.

Correctness is pinned by tests against ``Transformer.forward`` (same logits to 1e-4) and against
Hugging Face ``generate``. The model module itself is untouched.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from llamalab.common import LlamalabError
from llamalab.inference.quantize import BlockLinear, Linear, QuantWeight, make_head, make_linear
from llamalab.model import fused
from llamalab.model.layers import dynamic_decode_freqs_cis, dynamic_seq_len, precompute_freqs_cis, rotate_pairs
from llamalab.model.transformer import Transformer


class _Layer:
    __slots__ = ("attn_norm", "ffn_norm", "wqkv", "wo", "w13", "w2")

    def __init__(self, attn_norm: torch.Tensor, ffn_norm: torch.Tensor, wqkv: Linear, wo: Linear,
                 w13: Linear, w2: Linear) -> None:
        self.attn_norm, self.ffn_norm, self.wqkv, self.wo, self.w13, self.w2 = (
            attn_norm, ffn_norm, wqkv, wo, w13, w2)


def _fused(sd: dict[str, torch.Tensor], blocks: dict[str, QuantWeight], names: list[str], quantize: str,
           make: Callable = make_linear) -> Linear:
    """The named matrices stacked along their rows as one linear; from a file's own blocks when it holds them all
    and they still are the model's weights (quantised choices only)."""
    if quantize != "none" and all(n in blocks and blocks[n].holds(sd[n]) for n in names):
        qw = QuantWeight.cat([blocks[n] for n in names])
        if qw is not None:
            return make(qw, quantize)
    return make(torch.cat([sd[n] for n in names], 0) if len(names) > 1 else sd[names[0]], quantize)


class Runner:
    """Fused inference copy of a Transformer with a ``slots``-row KV cache.

    ``prefill(slot, ids)`` fills a slot from position 0; ``decode(slots, tokens)`` appends one token
    to each of the first ``n`` slots (active slots are kept packed at the front by the engine).
    """

    def __init__(self, model: Transformer, slots: int = 8, max_seq_len: int | None = None,
                 quantize: str = "none", compile: bool = False) -> None:
        cfg = model.cfg
        self.cfg = cfg
        self.slots = slots
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.hidden = cfg.ffn_hidden_dim
        self.eps = cfg.norm_eps
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        dev = sd["tok_embeddings.weight"].device
        self.device = dev
        self.dtype = sd["tok_embeddings.weight"].dtype
        self.tok_emb = sd["tok_embeddings.weight"]
        blocks = getattr(model, "quant_weights", None) or {}  # blocks a GGUF file held (interop/gguf.py)

        def linear(names: list[str], make: Callable = make_linear) -> Linear:
            return _fused(sd, blocks if dev.type == "cpu" else {}, names, quantize, make)

        self.layers: list[_Layer] = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            self.layers.append(_Layer(sd[p + "attention_norm.weight"], sd[p + "ffn_norm.weight"],
                                      linear([p + f"attention.w{x}.weight" for x in "qkv"]),
                                      linear([p + "attention.wo.weight"]),
                                      linear([p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"]),
                                      linear([p + "feed_forward.w2.weight"])))
        self.norm = sd["norm.weight"]
        self.output = linear(["tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"], make=make_head)
        self.quantize = quantize
        # rotary table as complex (S, D/2), built once, from the model's (RoPE scaling included). Dynamic NTK
        # scaling depends on the sequence length: one-token decode at position m uses seq_len m + 1 (its own
        # table, row by row); a prefill longer than the original context gets its table built for its length.
        self.freqs = torch.view_as_complex(model.freqs_cis[: self.max_seq_len].float().contiguous()).to(dev)
        self.decode_freqs = self.freqs
        if dynamic_seq_len(cfg.rope_scaling, self.max_seq_len) is not None:
            self.decode_freqs = dynamic_decode_freqs_cis(cfg.head_dim, self.max_seq_len, cfg.rope_theta,
                                                         cfg.rope_scaling).to(dev)
        shape = (slots, self.n_kv, self.max_seq_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(cfg.n_layers)]
        # additive attention bias per slot: 0 where the slot may attend, -inf elsewhere
        self.bias = torch.full((slots, 1, 1, self.max_seq_len), float("-inf"), dtype=self.dtype, device=dev)
        self.pos = [0] * slots  # next position of each slot (host copy)
        self._ar = torch.arange(slots, device=dev)
        self._gqa = bool(self.n_kv != self.n_heads)  # NOTE: plain bool; under dynamic=True, a SymBool
        # compiled, the rotation is real arithmetic on a (S, D/2, 2) table: inductor cannot generate complex code;
        # the native decode attention reads the same table
        self._decode_cs = torch.view_as_real(self.decode_freqs).contiguous()  # (S, D/2, 2) cos, sin
        self._decode_fc = self._decode_cs if compile else self.decode_freqs
        # NOTE: with the native kernel on every matrix, eager steps fuse each norm, the SwiGLU product and the
        # residual adds into the matmul calls (BlockLinear.fused); a compiled step keeps them as ops (inductor
        # fuses those itself, and cannot trace a ctypes call)
        self._fuse = (not compile and self.dtype == torch.float32
                      and all(isinstance(lin, BlockLinear) for lay in self.layers
                              for lin in (lay.wqkv, lay.wo, lay.w13, lay.w2)))
        if self._fuse:
            for lay in self.layers:
                lay.attn_norm, lay.ffn_norm = lay.attn_norm.float().contiguous(), lay.ffn_norm.float().contiguous()
        # NOTE: eager fp32 decode on the CPU runs each layer's RoPE, cache write and attention as one native call
        # (llamalab.model.fused.attn_decode) instead of ~15 tensor ops; compiled steps keep the ops
        self._native_attn = (not compile and self.dtype == torch.float32 and dev.type == "cpu"
                             and fused.load() is not None)
        self._decode_core = self._decode_impl
        if compile:  # one graph for every length (dynamic): the first decode compiles (25-65 s on 2 cores)
            self._decode_core = torch.compile(self._decode_impl, dynamic=True, fullgraph=True)

    # ------------------------------------------------------------------ blocks

    def _attn_ffn(self, layer: _Layer, li: int, h: torch.Tensor, fc: torch.Tensor,
                  write, attend, native=None) -> torch.Tensor:
        B, T, _ = h.shape
        H, Hk, D = self.n_heads, self.n_kv, self.head_dim
        if self._fuse:
            qkv = layer.wqkv.fused(h, norm=layer.attn_norm, eps=self.eps).view(B, T, H + 2 * Hk, D)
        else:
            qkv = layer.wqkv(F.rms_norm(h, (h.shape[-1],), layer.attn_norm, self.eps)).view(B, T, H + 2 * Hk, D)
        if native is not None:  # one decode step: RoPE, cache write and attention in one call
            return self._ffn(layer, h, native(li, qkv.view(B, H + 2 * Hk, D)).view(B, T, H * D))
        if fc.is_complex():
            pairs = qkv[:, :, : H + Hk].float().reshape(B, T, H + Hk, D // 2, 2)
            qk = torch.view_as_real(torch.view_as_complex(pairs) * fc).flatten(3).to(h.dtype)
        else:  # (cos, sin) in real arithmetic: inductor fuses it (it cannot generate code for complex)
            qk = rotate_pairs(qkv[:, :, : H + Hk], fc[..., 0], fc[..., 1])
        q = qk[:, :, :H].transpose(1, 2)
        k, v = write(li, qk[:, :, H:], qkv[:, :, H + Hk:])
        o = attend(q, k, v).transpose(1, 2).reshape(B, T, H * D)
        return self._ffn(layer, h, o)

    def _ffn(self, layer: _Layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The attention output projection, its residual, and the feed-forward half of the block."""
        if self._fuse:
            h = layer.wo.fused(o, residual=h)
            gu = layer.w13.fused(h, norm=layer.ffn_norm, eps=self.eps)
            return layer.w2.fused(gu, swiglu=True, residual=h)
        h = h + layer.wo(o)
        x = F.rms_norm(h, (h.shape[-1],), layer.ffn_norm, self.eps)
        gu = layer.w13(x)
        g, u = gu[..., : self.hidden], gu[..., self.hidden:]
        return h + layer.w2(F.silu(g) * u)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(F.rms_norm(h, (h.shape[-1],), self.norm, self.eps)).float()

    # ------------------------------------------------------------------ prefill

    def _prefill_freqs(self, T: int) -> torch.Tensor:
        seq_len = dynamic_seq_len(self.cfg.rope_scaling, T)
        if seq_len is None:
            return self.freqs[:T]
        cfg = self.cfg
        return precompute_freqs_cis(cfg.head_dim, T, cfg.rope_theta, cfg.rope_scaling, seq_len).to(self.device)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Fill ``slot`` with ``ids`` at positions [0, T); return logits (T, V) or (1, V) for the last."""
        T = len(ids)
        if T == 0:
            raise LlamalabError("prompt: empty token list")
        if T > self.max_seq_len:
            raise LlamalabError(f"prompt of {T} tokens exceeds the context of {self.max_seq_len}")
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        h = F.embedding(tokens, self.tok_emb)
        fc = self._prefill_freqs(T).view(1, T, 1, -1)

        def write(li: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.k[li][slot, :, :T] = k[0].transpose(0, 1)
            self.v[li][slot, :, :T] = v[0].transpose(0, 1)
            return self.k[li][slot:slot + 1, :, :T], self.v[li][slot:slot + 1, :, :T]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads)

        for li, layer in enumerate(self.layers):
            h = self._attn_ffn(layer, li, h, fc, write, attend)
        self.bias[slot].fill_(float("-inf"))
        self.bias[slot, 0, 0, :T] = 0.0
        self.pos[slot] = T
        return self._logits(h[0] if all_logits else h[0, -1:])

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (n,) to slots 0..n-1 at their own positions; return logits (n, V)."""
        n = tokens.shape[0]
        pos_list = self.pos[:n]
        end = max(pos_list) + 1
        if end > self.max_seq_len:
            raise LlamalabError(f"decode past the context of {self.max_seq_len} tokens")
        pos = torch.tensor(pos_list, dtype=torch.long, device=self.device)
        self.bias[self._ar[:n], 0, 0, pos] = 0.0
        logits = self._decode_core(tokens, pos, end)
        for i in range(n):
            self.pos[i] += 1
        return logits

    def _decode_impl(self, tokens: torch.Tensor, pos: torch.Tensor, end: int) -> torch.Tensor:
        n = tokens.shape[0]
        h = F.embedding(tokens.view(n, 1), self.tok_emb)
        fc = self._decode_fc[pos].unsqueeze(1).unsqueeze(1)  # (n, 1, 1, D/2) complex or (n, 1, 1, D/2, 2) real
        rows = self._ar[:n]
        bias = self.bias[:n, :, :, :end]
        gqa = self._gqa

        def write(li: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.k[li][rows, :, pos] = k[:, 0]
            self.v[li][rows, :, pos] = v[:, 0]
            return self.k[li][:n, :, :end], self.v[li][:n, :, :end]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)

        native = None
        if self._native_attn:
            def native(li: int, qkv: torch.Tensor) -> torch.Tensor:
                return fused.attn_decode(qkv, self._decode_cs, pos, self.k[li], self.v[li], self.n_heads, self.n_kv)

        for li, layer in enumerate(self.layers):
            h = self._attn_ffn(layer, li, h, fc, write, attend, native)
        return self._logits(h[:, 0])

    # ------------------------------------------------------------------ slot bookkeeping

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (cache rows, bias, position) into ``dst`` (to keep active slots packed)."""
        if src == dst:
            return
        end = self.pos[src]
        with torch.inference_mode():
            for li in range(len(self.layers)):
                self.k[li][dst, :, :end] = self.k[li][src, :, :end]
                self.v[li][dst, :, :end] = self.v[li][src, :, :end]
            self.bias[dst] = self.bias[src]
        self.pos[dst] = end

    def free_slot(self, slot: int) -> None:
        self.pos[slot] = 0
        self.bias[slot].fill_(float("-inf"))
