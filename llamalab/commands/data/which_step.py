"""Which data did a training step read? Shard ranges and documents of a run's global batch at STEP.

``llamalab data which-step RUN STEP [--json]``. The answer is computed from the run's record
alone (see :mod:`llamalab.data.order`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llamalab.data.order import format_step, which_step


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder"})
    step: int = field(default=1, metadata={"positional": True, "help": "optimizer step (1-based)"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


def main(cfg: Config) -> dict:
    out = which_step(cfg.run, cfg.step)
    print(json.dumps(out, indent=2) if cfg.json else format_step(out))
    return out


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
