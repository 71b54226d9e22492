"""ModelConfig and presets.

Presets are Python functions returning a :class:`Preset` (a model shape plus the training recipe
the paper published for it), so a preset is greppable, typed and composable. The LLaMA-1 rows
follow Table 2 of Touvron et al. 2023a; the Llama-2 rows follow Touvron et al. 2023b (4k context,
GQA with 8 KV heads for 34B and 70B); the tiny rows are for CPUs (``stories15m`` and
``stories110m`` are the llama2.c shapes, with tied embeddings).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from llamalab.common import LlamalabError


@dataclass
class ModelConfig:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None -> n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit SwiGLU hidden size (HF intermediate_size); overrides the rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init: str = field(default="llama", metadata={"choices": ["llama", "opt"],
                                                 "help": "weight init: llama (std 0.02) or opt (std 0.006, Megatron)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise LlamalabError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads != 0:
            raise LlamalabError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv != 0:
            raise LlamalabError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise LlamalabError(f"head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        if self.init not in ("llama", "opt"):
            raise LlamalabError(f"model.init must be 'llama' or 'opt', got {self.init!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """LLaMA's rule: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# ----------------------------------------------------------------------------- accounting


def num_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact parameter count of :class:`~llamalab.model.transformer.Transformer` for ``cfg``."""
    d, hd, kv = cfg.dim, cfg.head_dim, cfg.kv_heads
    attn = d * cfg.n_heads * hd + 2 * d * kv * hd + cfg.n_heads * hd * d
    mlp = 3 * d * cfg.ffn_hidden_dim
    per_layer = attn + mlp + 2 * d
    emb = cfg.vocab_size * d
    out = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = cfg.n_layers * per_layer + d + emb + out
    return total if embeddings else total - emb


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Matmul FLOPs per token (PaLM appendix B): 6N + 12*L*H*Dh*T for training (2N + 4*L*H*Dh*T
    for a forward pass), N counting every weight used in a matmul (the output head included, the
    embedding lookup not). Attention uses the full T (no causal halving), as PaLM and nanoGPT do."""
    T = cfg.max_seq_len if seq_len is None else seq_len
    n_matmul = num_params(cfg, embeddings=False) - cfg.n_layers * 2 * cfg.dim - cfg.dim
    if cfg.tie_embeddings:
        n_matmul += cfg.vocab_size * cfg.dim  # tied table still serves as the output matmul
    attn = cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    return (6 * n_matmul + 12 * attn) if training else (2 * n_matmul + 4 * attn)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_elem: int = 2) -> int:
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * bytes_per_elem


# ----------------------------------------------------------------------------- presets


@dataclass
class Preset:
    name: str
    model: ModelConfig
    peak_lr: float
    batch_tokens: int  # global batch in tokens
    train_tokens: float  # tokens the published model was trained on (0 = not a published run)
    note: str = ""

    def training_flops(self) -> float:
        return flops_per_token(self.model) * self.train_tokens


def _llama1(dim: int, n_heads: int, n_layers: int, lr: float, tokens: float, name: str) -> Preset:
    m = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000, multiple_of=256,
                    norm_eps=1e-6, max_seq_len=2048)
    return Preset(name, m, peak_lr=lr, batch_tokens=4_000_000, train_tokens=tokens,
                  note="LLaMA-1 (Touvron et al. 2023a, Table 2)")


def llama_7b() -> Preset:
    return _llama1(4096, 32, 32, 3.0e-4, 1.0e12, "llama-7b")


def llama_13b() -> Preset:
    return _llama1(5120, 40, 40, 3.0e-4, 1.0e12, "llama-13b")


def llama_33b() -> Preset:
    return _llama1(6656, 52, 60, 1.5e-4, 1.4e12, "llama-33b")


def llama_65b() -> Preset:
    return _llama1(8192, 64, 80, 1.5e-4, 1.4e12, "llama-65b")


def _llama2(dim: int, n_heads: int, n_layers: int, lr: float, name: str, n_kv_heads: int | None = None,
            ffn_dim_multiplier: float | None = None, multiple_of: int = 256) -> Preset:
    m = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=32000,
                    multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=1e-5,
                    max_seq_len=4096)
    return Preset(name, m, peak_lr=lr, batch_tokens=4_000_000, train_tokens=2.0e12,
                  note="Llama 2 (Touvron et al. 2023b, Table 1)")


def llama2_7b() -> Preset:
    return _llama2(4096, 32, 32, 3.0e-4, "llama2-7b")


def llama2_13b() -> Preset:
    return _llama2(5120, 40, 40, 3.0e-4, "llama2-13b")


def llama2_34b() -> Preset:
    # Not released by Meta; the Code Llama 34B shape (hidden 22016) with the paper's GQA (8 KV heads).
    return _llama2(8192, 64, 48, 1.5e-4, "llama2-34b", n_kv_heads=8)


def llama2_70b() -> Preset:
    return _llama2(8192, 64, 80, 1.5e-4, "llama2-70b", n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096)


def tiny() -> Preset:
    """About 1M parameters: unit tests and the built-in `llamalab run` on a laptop CPU."""
    m = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32,
                    max_seq_len=256, tie_embeddings=False)
    return Preset("tiny", m, peak_lr=3e-3, batch_tokens=8192, train_tokens=0, note="CPU toy")


def stories15m() -> Preset:
    """llama2.c's stories15M shape (dim 288, 6 layers, 6 heads, tied embeddings)."""
    m = ModelConfig(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256,
                    tie_embeddings=True)
    return Preset("stories15m", m, peak_lr=5e-4, batch_tokens=32 * 256 * 4, train_tokens=0, note="llama2.c shape")


def stories110m() -> Preset:
    """llama2.c's stories110M shape (dim 768, 12 layers, 12 heads, tied embeddings)."""
    m = ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=32, max_seq_len=1024,
                    tie_embeddings=True)
    return Preset("stories110m", m, peak_lr=3e-4, batch_tokens=128 * 1024, train_tokens=0, note="llama2.c shape")


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny,
    "stories15m": stories15m,
    "stories110m": stories110m,
    "llama-7b": llama_7b,
    "llama-13b": llama_13b,
    "llama-33b": llama_33b,
    "llama-65b": llama_65b,
    "llama2-7b": llama2_7b,
    "llama2-13b": llama2_13b,
    "llama2-34b": llama2_34b,
    "llama2-70b": llama2_70b,
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise LlamalabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_overrides(cfg: ModelConfig, **overrides: object) -> ModelConfig:
    """A copy of ``cfg`` with some fields replaced (validated again)."""
    return dataclasses.replace(cfg, **overrides)


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_flops(f: float) -> str:
    exp = int(math.floor(math.log10(f))) if f > 0 else 0
    return f"{f / 10 ** exp:.2f}e{exp:+03d}"
