"""Verify a release bundle on this machine: checksums, every model format's logits, and a re-run slice
of training compared with the recorded losses (bit-exact on the same device type).

``llamalab release verify DIR [--steps K] [--from-step N] [--device cpu]``: prints a pass/fail table
and exits non-zero naming the failing files. Checks: :mod:`llamalab.release.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalab.common import LlamalabError
from llamalab.release.verify import VerifyReport, verify_release


@dataclass
class Config:
    bundle: str = field(default="", metadata={"positional": True, "help": "the release bundle folder"})
    steps: int = field(default=2, metadata={"help": "optimizer steps to re-run from a checkpoint"})
    from_step: int = field(default=-1, metadata={
        "help": "the checkpoint step to re-run from (-1: the newest one followed by --steps logged steps)"})
    device: str = field(default="cpu", metadata={"help": "device for the re-run (another device type: tolerance)"})

    def validate(self) -> None:
        if not self.bundle:
            raise LlamalabError("release verify: give the bundle folder (DIR)")


def main(cfg: Config) -> VerifyReport:
    cfg.validate()
    report = verify_release(cfg.bundle, steps=cfg.steps, from_step=None if cfg.from_step < 0 else cfg.from_step,
                            device=cfg.device)
    print(report.table())
    if not report.ok:
        raise LlamalabError(f"release verify {cfg.bundle}: " + "; ".join(f"{c}: {d}" for c, _, d in report.failures()))
    return report


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
