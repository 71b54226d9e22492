"""SFT's optimizer settings: pretraining's :class:`~llamalab.train.optim.OptimConfig` (the same
``--optim.*`` flags, the same AdamW and cosine schedule) with Llama 2's fine-tuning defaults.

Llama 2 (Touvron et al. 2023b, section 3.1): peak lr 2e-5, cosine decay, weight decay 0.1; warmup
3% of the steps (Alpaca / TRL; the paper states none) as a ratio, since the step count follows from
the data; the cosine runs down to 0. LoRA adapters start at zero and need a larger step: 2e-4
(alpaca-lora, QLoRA) when ``lr`` is left unset.

NOTE: a subclass with other defaults rather than a ``default_factory`` building an ``OptimConfig``:
a config read from flags or JSON builds the nested dataclass from its class defaults, so only the
class can carry SFT's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalab.train.optim import OptimConfig

FULL_LR, LORA_LR = 2e-5, 2e-4


@dataclass
class SFTOptimConfig(OptimConfig):
    lr: float | None = field(default=None, metadata={
        "help": f"peak learning rate (unset: {FULL_LR:g}, or {LORA_LR:g} with LoRA)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of the peak"})
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warmup steps, at most a tenth of the run (needs --optim.warmup-ratio 0)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "warmup as a fraction of the steps"})

    def peak_lr(self, lora: bool) -> float:
        return self.lr or (LORA_LR if lora else FULL_LR)
