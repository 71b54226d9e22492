"""AdamW with LLaMA's settings and the cosine-with-warmup schedule.

LLaMA (Touvron et al. 2023a, section 2.3): AdamW, beta1 0.9, beta2 0.95, weight decay 0.1,
gradient clipping 1.0, 2000 warmup steps, cosine decay to 10% of the peak learning rate.
Weight decay applies to matrices only; norms (1-D) and, unless asked, embeddings are not decayed.

Pretraining and SFT share :class:`OptimConfig` (the ``--optim.*`` flags); SFT only changes the
defaults (Llama 2: peak lr 2e-5, cosine to 0, warmup 3% of the steps via ``warmup_ratio``).
Warmup is either a step count (scaled down to a tenth of short runs) or, when ``warmup_ratio`` is
set, a fraction of the steps: a ratio fits fine-tuning, whose step count follows from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from llamalab.common import LlamalabError


@dataclass
class OptimConfig:
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (unset: the preset's peak LR)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of the peak"})
    warmup_steps: int = field(default=2000, metadata={
        "help": "linear warmup steps, at most a tenth of the run (ignored when warmup_ratio > 0)"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "warmup as a fraction of the steps (0: use warmup_steps)"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    decay_embeddings: bool = False
    fused: bool = True  # fused AdamW kernel where the device has one

    def validate(self) -> None:
        if self.lr is not None and self.lr < 0:
            raise LlamalabError(f"optim.lr must be >= 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise LlamalabError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise LlamalabError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LlamalabError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "tok_embeddings" in name
        if p.ndim >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    dev = next(model.parameters()).device
    kw: dict = {}
    if _mixes_dtensors(model):  # NOTE: fused and foreach kernels refuse DTensor + Tensor in one call
        kw["foreach"] = False
    elif cfg.fused and dev.type in ("cuda", "cpu"):
        kw["fused"] = True
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
    except (RuntimeError, TypeError):  # fused not supported for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _mixes_dtensors(model: nn.Module) -> bool:
    """Tensor parallel models: sharded (DTensor) block weights next to plain replicated ones."""
    from torch.distributed.tensor import DTensor

    return len({isinstance(p, DTensor) for p in model.parameters()}) == 2


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """The configured warmup, scaled down for short runs to at most a tenth of them."""
    return max(1, min(warmup_steps, total_steps // 10))


def warmup_steps_for(cfg: OptimConfig, total_steps: int) -> int:
    """The warmup of a run of ``total_steps``: ``warmup_ratio`` of them when set, else :func:`effective_warmup`."""
    if cfg.warmup_ratio > 0:
        return max(1, round(cfg.warmup_ratio * total_steps))
    return effective_warmup(cfg.warmup_steps, total_steps)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps to ``peak``, then cosine to ``min_ratio * peak`` at ``total``.

    ``step`` counts from 0 (the first update uses lr_at(0) = peak / warmup).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return peak * min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
