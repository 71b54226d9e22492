"""ModelConfig and presets.

Presets are Python functions returning a :class:`Preset` (a model shape plus the training recipe
the paper published for it), so a preset is greppable, typed and composable. The LLaMA-1 rows
follow Table 2 of Touvron et al. 2023a; the Llama-2 rows follow Touvron et al. 2023b (4k context,
GQA with 8 KV heads for 34B and 70B); the Llama 3.x rows follow Dubey et al. 2024 (Table 3) and
the 3.1/3.2 model cards (128k vocabulary, RoPE base 500k, Llama 3.1 RoPE scaling); the tiny rows are
for CPUs (``stories15m`` and ``stories110m`` are the llama2.c shapes, with tied embeddings).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable

from llamalab.common import LlamalabError

# Sanity bounds for a model read from a file we did not write: each is far beyond any published LLaMA-family
# model (dim 16384, 126 layers, 262k vocabulary, 10M context), and still refuses what would hang or try to
# allocate terabytes before anything is built (n_layers 1e9, vocab 1e12, max_seq_len 1e12).
INT_LIMITS: dict[str, tuple[int, int]] = {
    "dim": (2, 1 << 17), "n_layers": (1, 1 << 12), "n_heads": (1, 1 << 14), "n_kv_heads": (1, 1 << 14),
    "vocab_size": (1, 1 << 22), "multiple_of": (1, 1 << 16), "hidden_dim": (1, 1 << 19), "max_seq_len": (1, 1 << 24),
}


class ModelConfigError(LlamalabError):
    """A :class:`ModelConfig` field that is not sane. ``field`` names it, so that a reader of a foreign file
    can name it in that file's terms (``hidden_size`` in a HF config.json, ``llama.embedding_length`` in GGUF)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def at(self, where: str, names: dict[str, str] | None = None) -> LlamalabError:
        """This error as one line naming the file ``where``, with the fields called by ``names``."""
        return LlamalabError(f"{where}: {name_fields(str(self), names)}")


def name_fields(message: str, names: dict[str, str] | None) -> str:
    """``message`` with each ``model.<field>`` replaced by ``names[field]`` (a foreign file's own key)."""
    if not names:
        return message
    return re.sub(r"\bmodel\.(\w+)", lambda m: names.get(m.group(1), m.group(0)), message)


def _int_field(cfg: object, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # numpy integers too
        raise ModelConfigError(name, f"model.{name} must be an integer, got {v!r} ({type(v).__name__})")
    lo, hi = INT_LIMITS[name]
    if not lo <= v <= hi:
        raise ModelConfigError(name, f"model.{name} must be between {lo} and {hi:,}, got {v:,}")


def _float_field(cfg: object, name: str, lo: float, hi: float) -> None:
    """A finite number in the open interval (lo, hi)."""
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ModelConfigError(name, f"model.{name} must be a number, got {v!r} ({type(v).__name__})")
    if not (math.isfinite(v) and lo < v < hi):
        raise ModelConfigError(name, f"model.{name} must be a finite number above {lo:g} and below {hi:g}, got {v!r}")


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
    rope_scaling: RopeScaling | None = field(default=None, metadata={
        "help": "RoPE scaling (llama3, linear, dynamic, yarn) with Hugging Face's field names; None = plain RoPE"})

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from JSON / dataclasses.asdict
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        """Types and ranges of every field (:data:`INT_LIMITS`), then the shape rules; raises
        :class:`ModelConfigError` naming the field. Nothing is allocated before this passes."""
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            _int_field(self, name)
        for name in ("n_kv_heads", "hidden_dim"):
            if getattr(self, name) is not None:
                _int_field(self, name)
        if self.ffn_dim_multiplier is not None:
            _float_field(self, "ffn_dim_multiplier", 0.0, 64.0)
        _float_field(self, "norm_eps", 0.0, 1.0)
        _float_field(self, "rope_theta", 0.0, 1e30)
        if not isinstance(self.tie_embeddings, bool):
            raise ModelConfigError("tie_embeddings", f"model.tie_embeddings must be true or false, "
                                                     f"got {self.tie_embeddings!r}")
        if self.dim % self.n_heads != 0:
            raise ModelConfigError("dim", f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        kv = self.kv_heads
        if self.n_heads % kv != 0:
            raise ModelConfigError(
                "n_kv_heads", f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({kv})")
        if self.head_dim % 2 != 0:
            raise ModelConfigError("dim", f"model.dim / model.n_heads = {self.head_dim} (the head dim) must be even "
                                          f"for RoPE")
        lo, hi = INT_LIMITS["hidden_dim"]
        if not lo <= self.ffn_hidden_dim <= hi:
            raise ModelConfigError("ffn_dim_multiplier", f"the SwiGLU hidden size from model.dim, "
                                   f"model.ffn_dim_multiplier and model.multiple_of is {self.ffn_hidden_dim:,}; "
                                   f"it must be between {lo} and {hi:,}")
        if self.init not in ("llama", "opt"):
            raise ModelConfigError("init", f"model.init must be 'llama' or 'opt', got {self.init!r}")

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


ROPE_TYPES = ("llama3", "linear", "dynamic", "yarn")
# the fields each rope_type reads (besides rope_type and factor), as transformers' modeling_rope_utils reads them
ROPE_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "dynamic": ("original_max_position_embeddings",),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
}
_ROPE_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor")
_ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": (), "dynamic": ("original_max_position_embeddings",),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": ("original_max_position_embeddings",),
}


@dataclass
class RopeScaling:
    """RoPE scaling, with the field names of Hugging Face's ``rope_scaling`` / ``rope_parameters`` and the
    semantics of transformers' ``modeling_rope_utils`` (the frequencies are built in
    :func:`llamalab.model.layers.rope_inv_freq`).

    - ``linear``: every frequency / ``factor`` (position interpolation).
    - ``dynamic``: NTK-aware; within ``original_max_position_embeddings`` plain RoPE, beyond it the base is
      raised for the current sequence length (so the model's ``max_seq_len`` is the extended context and
      ``original_max_position_embeddings`` the one it was trained at: HF's ``max_position_embeddings``).
    - ``llama3``: Llama 3.1's per-frequency rule (``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``).
    - ``yarn``: YaRN frequencies (``beta_fast`` 32, ``beta_slow`` 1 by default, ``truncate`` true) and cos/sin
      scaled by ``attention_factor`` (by default 0.1 ln(factor) + 1, or from ``mscale`` / ``mscale_all_dim``).
    """

    rope_type: str = field(metadata={"choices": list(ROPE_TYPES), "help": "llama3, linear, dynamic or yarn"})
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None

    def __post_init__(self) -> None:
        for name in _ROPE_FLOATS:  # JSON's 8 is 8.0, so that configs compare equal after a round trip
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> RopeScaling:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelConfigError("rope_scaling", f"model.rope_scaling: unknown field(s) {unknown}; "
                                                   f"known: {sorted(names)}")
        if "rope_type" not in d:
            raise ModelConfigError("rope_scaling", f"model.rope_scaling.rope_type is missing "
                                                   f"(one of {', '.join(ROPE_TYPES)})")
        return cls(**d)

    def validate(self) -> None:
        def bad(name: str, why: str) -> ModelConfigError:
            return ModelConfigError("rope_scaling", f"model.rope_scaling.{name} {why}")

        if self.rope_type not in ROPE_TYPES:
            raise bad("rope_type", f"must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        for name in _ROPE_FLOATS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, f"must be a finite number, got {v!r}")
        if not self.factor > 0:
            raise bad("factor", f"must be positive, got {self.factor!r}")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise bad("attention_factor", f"must be positive, got {self.attention_factor!r}")
        v = self.original_max_position_embeddings
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise bad("original_max_position_embeddings", f"must be a positive integer, got {v!r}")
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise bad("truncate", f"must be true or false, got {self.truncate!r}")
        used = ROPE_FIELDS[self.rope_type]
        for name in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                     "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
            if getattr(self, name) is not None and name not in used:
                raise bad(name, f"is not used by rope_type {self.rope_type!r} (it reads: "
                                f"{', '.join(('factor',) + used)})")
        for name in _ROPE_REQUIRED[self.rope_type]:
            if getattr(self, name) is None:
                raise bad(name, f"is required by rope_type {self.rope_type!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise bad("high_freq_factor", f"({self.high_freq_factor}) must be above low_freq_factor "
                                          f"({self.low_freq_factor})")


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


def _llama3(dim: int, n_heads: int, n_layers: int, ffn_dim_multiplier: float, multiple_of: int, lr: float,
            name: str, batch_tokens: int, tokens: float, note: str, max_seq_len: int = 8192,
            rope_factor: float | None = None, tie_embeddings: bool = False) -> Preset:
    """Llama 3.x: 128,256-token vocabulary, GQA with 8 KV heads, RoPE base 500,000; 3.1 and 3.2 extend the
    context to 128k with Llama 3.1's RoPE scaling (low/high frequency factors 1 and 4, trained at 8,192)."""
    scaling = None
    if rope_factor is not None:
        scaling = RopeScaling(rope_type="llama3", factor=rope_factor, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
    m = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
                    multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=1e-5,
                    rope_theta=500000.0, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings,
                    rope_scaling=scaling)
    return Preset(name, m, peak_lr=lr, batch_tokens=batch_tokens, train_tokens=tokens, note=note)


def llama3_8b() -> Preset:
    return _llama3(4096, 32, 32, 1.3, 1024, 3.0e-4, "llama3-8b", 4_000_000, 15.0e12,
                   "Llama 3 (Dubey et al. 2024, Table 3; 15T tokens per the model card; batch not published)")


def llama3_70b() -> Preset:
    return _llama3(8192, 64, 80, 1.3, 4096, 1.5e-4, "llama3-70b", 4_000_000, 15.0e12,
                   "Llama 3 (Dubey et al. 2024, Table 3; 15T tokens per the model card; batch not published)")


def llama3_1_405b() -> Preset:
    return _llama3(16384, 128, 126, 1.2, 4096, 8.0e-5, "llama3.1-405b", 16_000_000, 15.6e12,
                   "Llama 3.1 (Dubey et al. 2024, Table 3 and section 3.4: 15.6T tokens, final batch 16M)",
                   max_seq_len=131072, rope_factor=8.0)


def llama3_2_1b() -> Preset:
    return _llama3(2048, 32, 16, 1.5, 256, 3.0e-4, "llama3.2-1b", 4_000_000, 9.0e12,
                   "Llama 3.2 (model card: up to 9T tokens, tied embeddings; LR and batch not published)",
                   max_seq_len=131072, rope_factor=32.0, tie_embeddings=True)


def llama3_2_3b() -> Preset:
    return _llama3(3072, 24, 28, 1.0, 256, 3.0e-4, "llama3.2-3b", 4_000_000, 9.0e12,
                   "Llama 3.2 (model card: up to 9T tokens, tied embeddings; LR and batch not published)",
                   max_seq_len=131072, rope_factor=32.0, tie_embeddings=True)


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
    "llama3-8b": llama3_8b,
    "llama3-70b": llama3_70b,
    "llama3.1-405b": llama3_1_405b,
    "llama3.2-1b": llama3_2_1b,
    "llama3.2-3b": llama3_2_3b,
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
