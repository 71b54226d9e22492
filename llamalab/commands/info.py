"""Print a preset's size and cost: parameters, FLOPs per token, KV-cache bytes, training compute.

``llamalab info --preset llama2-70b`` or ``llamalab info --all``; the numbers come from
:mod:`llamalab.model.accounting` (the model is built on the meta device: nothing is allocated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalab.model.accounting import describe, preset_summary, preset_table
from llamalab.model.config import PRESETS


@dataclass
class Config:
    preset: str = field(default="tiny", metadata={"choices": list(PRESETS), "help": "model preset"})
    seq_len: int = field(default=0, metadata={"help": "sequence length for FLOPs (0: the preset's context)"})
    all: bool = field(default=False, metadata={"help": "print a table of every preset"})


def main(cfg: Config) -> list[dict]:
    names = list(PRESETS) if cfg.all else [cfg.preset]
    rows = [describe(n, cfg.seq_len) for n in names]
    print(preset_table(rows) if cfg.all else preset_summary(rows[0], cfg.seq_len))
    return rows


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
