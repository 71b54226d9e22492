"""Evaluate a model with EleutherAI's lm-evaluation-harness (scores comparable with published ones).

    llamalab eval harness MODEL --tasks arc_easy,hellaswag [--limit N] [--num-fewshot K] [--output DIR]

Runs lm-eval's ``simple_evaluate`` on the ``llamalab`` model class of
:mod:`llamalab.eval.lm_eval_adapter` (our scoring and the inference engine behind lm-eval's request
types). lm-eval is an optional extra, ``pip install 'llamalab[lm-eval]'``; its tasks load (and may
download) their own data. Prints lm-eval's table; ``--output`` keeps the full result as
``DIR/results.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0
from llamalab.eval.lm_eval_adapter import evaluate_with_harness


@dataclass
class Config:
    model: str = field(default="", metadata={"positional": True, "help": "model, run or HF folder, or .gguf file"})
    tasks: list[str] = field(default_factory=list, metadata={"help": "comma-separated lm-eval task names"})
    limit: int = field(default=0, metadata={"help": "first N items of each task (0: all)"})
    num_fewshot: int = field(default=-1, metadata={"help": "few-shot examples (-1: each task's default)"})
    batch_size: int = 16
    max_gen_toks: int = field(default=256, metadata={"help": "default generation length of generate_until tasks"})
    output: str = field(default="", metadata={"help": "folder for results.json ('' = none)"})
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        if not self.model:
            raise LlamalabError("model: give a model folder (llamalab eval harness MODEL --tasks ...)")
        if not self.tasks:
            raise LlamalabError("tasks: give at least one lm-eval task (--tasks arc_easy,hellaswag)")


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    res = evaluate_with_harness(cfg.model, cfg.tasks, limit=cfg.limit or None,
                                num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                                batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                                max_gen_toks=cfg.max_gen_toks)
    from lm_eval.utils import handle_non_serializable, make_table

    print0(make_table(res))
    if cfg.output:
        out = Path(cfg.output) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=handle_non_serializable), encoding="utf-8")
        print0(f"lm-eval results in {out}")
    return res


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
