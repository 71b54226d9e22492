"""LoRA (Hu et al. 2021): a low-rank update ``W + (alpha / r) * B @ A`` on chosen linear layers.

``apply_lora(model, cfg)`` swaps each target ``nn.Linear`` (matched by its attribute name:
``wq wk wv wo`` in attention, ``w1 w2 w3`` in the feed-forward) for :class:`LoRALinear`, a subclass
that keeps the base ``weight`` under the same state-dict key and adds ``lora_A`` (r, in) and
``lora_B`` (out, r). A is Kaiming-uniform, B zero, so training starts exactly at the base model.
Every non-adapter parameter is frozen: only ``lora_A`` / ``lora_B`` train (AdamW state only for them).

- ``merge_lora(model)`` folds the update into ``weight`` and swaps plain ``nn.Linear`` back in, so
  the result is an ordinary :class:`~llamalab.model.transformer.Transformer` that the model folder,
  the engine and the HF/GGUF exporters accept. Trade-off: the merged model loses the adapter's
  separability; keep the adapter folder too (``save_adapter``).
- ``save_adapter`` / ``load_adapter``: the adapter alone, ``adapter_model.safetensors`` (keys
  ``layers.0.attention.wq.lora_A`` ...) + ``adapter_config.json`` (r, alpha, dropout, targets, the
  base weights' sha256 so a wrong base is refused). Not PEFT's naming (HF module names differ).

NOTE: with LoRA applied, the trainer's intermediate checkpoints hold the base weights plus the
adapter keys; they resume training, but the engine loads only merged folders (what ``llamalab sft``
writes at the end).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from llamalab.common import LlamalabError, read_json, write_json_atomic
from llamalab.model.folder import save_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass
class LoRAConfig:
    rank: int = field(default=0, metadata={"help": "LoRA rank r (0: full fine-tuning)"})
    alpha: float = field(default=16.0, metadata={"help": "scale alpha; the update is (alpha / r) * B @ A"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"], metadata={
        "help": f"linear layers to adapt, by name: any of {','.join(ALL_TARGETS)}"})

    def validate(self) -> None:
        if self.rank < 0:
            raise LlamalabError(f"lora.rank must be >= 0, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise LlamalabError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = set(self.targets) - set(ALL_TARGETS)
        if self.rank and (bad or not self.targets):
            raise LlamalabError(f"lora.targets: unknown {sorted(bad)}; choose from {','.join(ALL_TARGETS)}")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update; ``weight`` keeps its key so base weights load as usual."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.scale = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def _targets(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    out = []
    for mod in model.modules():
        for name in names:
            child = getattr(mod, name, None)
            if isinstance(child, nn.Linear):
                out.append((mod, name, child))
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Freeze ``model`` and add adapters in place; returns the number of trainable parameters."""
    cfg.validate()
    if "output" in cfg.targets and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        # NOTE: merging would untie output from the embedding, and the model folder stores only one
        raise LlamalabError("lora.targets: 'output' is tied to the embedding in this model; leave it out")
    found = _targets(model, cfg.targets)
    if not found:
        raise LlamalabError(f"lora.targets {cfg.targets}: no such linear layers in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, lin in found:
        if not isinstance(lin, LoRALinear):
            setattr(parent, name, LoRALinear(lin, cfg.rank, cfg.alpha, cfg.dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain ``nn.Linear`` layers (in place)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.weight.device, dtype=child.weight.dtype)
                lin.weight.copy_(child.weight + child.delta().to(child.weight.dtype))
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(mod, name, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(folder: str | Path, model: nn.Module, cfg: LoRAConfig, base: dict[str, Any]) -> Path:
    """Write the adapter alone (weights + config naming its base)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(adapter_state(model), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json_atomic(folder / ADAPTER_CONFIG, {"format": "llamalab-lora", **asdict(cfg), "base": base})
    return folder


def load_adapter(folder: str | Path, model: nn.Module, base_sha256: str | None = None) -> LoRAConfig:
    """Apply the adapter in ``folder`` to ``model`` (a base Transformer); refuses a different base."""
    folder = Path(folder)
    meta = read_json(folder / ADAPTER_CONFIG, what="adapter config")
    if meta.get("format") != "llamalab-lora":
        raise LlamalabError(f"{folder / ADAPTER_CONFIG}: not a llamalab LoRA adapter")
    want = (meta.get("base") or {}).get("weights_sha256")
    if base_sha256 and want and want != base_sha256:
        raise LlamalabError(f"{folder}: adapter was trained on a different base model (weights sha256 differs)")
    cfg = LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"], targets=list(meta["targets"]))
    apply_lora(model, cfg)
    sd = load_file(str(folder / ADAPTER_WEIGHTS))
    have = adapter_state(model)
    if set(sd) != set(have):
        raise LlamalabError(f"{folder / ADAPTER_WEIGHTS}: keys do not match the model "
                            f"(missing {sorted(set(have) - set(sd))[:3]}, "
                            f"unexpected {sorted(set(sd) - set(have))[:3]})")
    model.load_state_dict(sd, strict=False)
    return cfg
