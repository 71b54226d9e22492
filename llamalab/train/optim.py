"""AdamW with LLaMA's settings and the cosine-with-warmup schedule.

LLaMA (Touvron et al. 2023a, section 2.3): AdamW, beta1 0.9, beta2 0.95, weight decay 0.1,
gradient clipping 1.0, 2000 warmup steps, cosine decay to 10% of the peak learning rate.
Weight decay applies to matrices only; norms (1-D) and, unless asked, embeddings are not decayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float | None = None  # None: the preset's peak LR
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    decay_embeddings: bool = False
    fused: bool = True  # fused AdamW kernel where the device has one


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
