"""The LLaMA model: config and presets, layers, attention with KV cache, the Transformer."""

from llamalab.model.attention import Attention, KVCache, repeat_kv
from llamalab.model.config import (
    PRESETS,
    ModelConfig,
    Preset,
    flops_per_token,
    get_preset,
    kv_cache_bytes_per_token,
    num_params,
)
from llamalab.model.layers import FeedForward, RMSNorm, apply_rotary_emb, precompute_freqs_cis
from llamalab.model.transformer import Transformer, TransformerBlock

__all__ = ["Attention", "KVCache", "repeat_kv", "PRESETS", "ModelConfig", "Preset", "flops_per_token",
           "get_preset", "kv_cache_bytes_per_token", "num_params", "FeedForward", "RMSNorm",
           "apply_rotary_emb", "precompute_freqs_cis", "Transformer", "TransformerBlock"]
