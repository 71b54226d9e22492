"""Loss-spike and NaN guards, and the run's logbook.

OPT-175B's logbook records dozens of restarts after loss spikes and divergences, by hand. Here the
program keeps it: every NaN/Inf loss, every spike, every action taken (skip the batch, or roll back
to the last checkpoint and never read the offending batch again), every restart and every config
change is appended to ``logbook.jsonl`` with the step, the batch index and the numbers that
triggered it.

A spike is a loss above ``spike_factor`` times the mean of the last ``window`` accepted losses
(checked once ``window`` losses have been seen).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class GuardConfig:
    nan_action: str = "skip"  # skip | rollback | stop
    spike_action: str = "skip"  # none | skip | rollback | stop
    spike_factor: float = 3.0
    window: int = 50
    max_rollbacks: int = 5


class Logbook:
    """Append-only JSON lines: one event per line, with wall time."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def log(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str) + "\n")

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


class LossGuard:
    """Classifies each loss as ok, nan or spike and says what to do about it."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.window)

    def check(self, loss: float) -> tuple[str, str]:
        """-> (kind, action): kind in ok|nan|spike; action in none|skip|rollback|stop."""
        if not math.isfinite(loss):
            return "nan", self.cfg.nan_action
        if len(self.recent) >= self.cfg.window and self.cfg.spike_action != "none":
            mean = sum(self.recent) / len(self.recent)
            if loss > self.cfg.spike_factor * mean:
                return "spike", self.cfg.spike_action
        return "ok", "none"

    def accept(self, loss: float) -> None:
        self.recent.append(loss)

    def reference(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def state_dict(self) -> list[float]:
        return list(self.recent)

    def load_state_dict(self, values: list[float]) -> None:
        self.recent.clear()
        self.recent.extend(values)
