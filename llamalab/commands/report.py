"""(Re)build a run's report.html from its record (pretraining, SFT, or a whole ``llamalab run``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import print0
from llamalab.report.html import write_report


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "run folder"})


def main(cfg: Config) -> Path:
    out = write_report(cfg.run)
    print0(f"report: {out}")
    return out


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
