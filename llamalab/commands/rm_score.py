"""Score records with a reward model: ``llamalab rm score RM --data FILE --out rewards.jsonl``.

``RM`` is a reward model folder (``llamalab rm``'s ``RUN/model``, or the run folder). Each record of ``--data``
(JSON or JSONL, .gz ok) is rendered with the reward model's chat template, as in training, and scored at its
last token:

- a preference pair (``{"prompt", "chosen", "rejected"}`` or an HH-RLHF ``{"chosen", "rejected"}`` dialogue):
  the row holds ``reward_chosen``, ``reward_rejected`` and ``chosen_wins``; the summary gives the pair accuracy;
- an answer (``{"prompt": str | messages, "answer" | "response" | "completion" | "output": str}`` or
  ``{"messages": [..., {"role": "assistant", ...}]}``): the row holds ``reward``.

Every row names its record (``where``: file:line; ``id`` when the record has one). Malformed records stop the
run with file:line, or are counted and skipped (``--on-error skip``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.align.data import FORMATS
from llamalab.align.reward import load_reward_model, score_records
from llamalab.common import LlamalabError, print0, resolve_device, write_json_atomic
from llamalab.tokenizer.templates import TEMPLATES, resolve_template


@dataclass
class Config:
    rm: str = field(default="", metadata={"positional": True, "help": "the reward model folder (or its run folder)"})
    data: list[str] = field(default_factory=list, metadata={"help": "file(s) of pairs or answers, JSON/JSONL (.gz ok)"})
    out: str = field(default="rewards.jsonl", metadata={"help": "one JSON line per record scored"})
    summary: str = field(default="", metadata={"help": "also write the summary (accuracy, means) to this JSON file"})
    format: str = field(default="auto", metadata={"choices": list(FORMATS), "help": "how pairs are read"})
    template: str = field(default="", metadata={"help": "chat template (default: the reward model's)"})
    batch_size: int = field(default=8, metadata={"help": "rows per forward pass"})
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})
    limit: int = field(default=0, metadata={"help": "score at most N records (0: all)"})
    device: str = "auto"

    def validate(self) -> None:
        if not self.rm:
            raise LlamalabError("rm score: give the reward model folder, llamalab rm score RM --data FILE")
        if not self.data:
            raise LlamalabError("rm score: give the records to score, --data FILE")
        if self.template and self.template not in TEMPLATES:
            raise LlamalabError(f"--template: unknown {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.batch_size < 1:
            raise LlamalabError(f"rm score: --batch-size must be >= 1, got {self.batch_size}")


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    rm, tok, meta = load_reward_model(cfg.rm, device=resolve_device(cfg.device))
    template = resolve_template(meta, cfg.template or None)
    t0 = time.perf_counter()
    rows, summary = score_records(rm, tok, template, cfg.data, cfg.format, cfg.batch_size, cfg.on_error, cfg.limit)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {**summary, "rm": str(cfg.rm), "template": template, "out": str(out),
               "seconds": time.perf_counter() - t0}
    if cfg.summary:
        write_json_atomic(cfg.summary, summary)
    acc = (f" | pair accuracy {summary['pair_accuracy']:.1%} (chosen scored above rejected), mean margin "
           f"{summary['mean_margin']:.3f}" if summary["pairs"] else "")
    mean = f" | mean reward {summary['mean_reward']:.3f}" if summary["answers"] else ""
    print0(f"rm score: {summary['records']} records, {summary['pairs']} pairs, {summary['answers']} answers, "
           f"{sum(summary['skipped'].values())} skipped {summary['skipped'] or ''}{acc}{mean} | "
           f"{summary['seconds']:.1f}s | {out}")
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
