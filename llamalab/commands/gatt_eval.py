"""Multi-turn instruction adherence per turn (the GAtt evaluation).

Does the answer at turn N still follow the instruction given in turn 1?

``llamalab gatt eval --base-url local:MODEL_PATH [--dialogues FILE] [--turns 4] --out DIR`` (any OpenAI
endpoint works too: ``--base-url http://HOST:PORT/v1 --model NAME``). Rule-checkable instructions (answer in
French, end with an emoji, at most N words, lowercase, include a word) are checked by rule; others need a judge
model, ``--judge.base-url URL --judge.model NAME``. Writes ``adherence.jsonl`` (every answer, rule check, judge
reply and verdict), ``adherence.json`` (the per-turn table), ``meta.json`` and ``report.html`` (table + plot).
Library: :mod:`llamalab.eval.adherence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.config import to_dict
from llamalab.eval.adherence import (
    AdherenceOptions,
    AdherenceResult,
    builtin_dialogues,
    format_table,
    read_eval_dialogues,
    run_adherence,
)
from llamalab.synth.client import ChatClient, ClientConfig
from llamalab.synth.gatt import default_constraints, read_constraints


@dataclass
class Config(ClientConfig):
    dialogues: str = field(default="", metadata={
        "help": "JSONL of {turns: [...], instruction?} or ShareGPT records (default: 10 built-in dialogues)"})
    instructions: str = field(default="", metadata={
        "help": "constraints file, JSONL {text, short?, kind?, rule?} (default: the rule-checkable built-ins)"})
    judged: bool = field(default=False, metadata={
        "help": "with the default constraints, also draw the judged ones (act as X, hobby): needs a judge"})
    turns: int = field(default=4, metadata={"help": "user turns per dialogue"})
    limit: int = field(default=0, metadata={"help": "evaluate at most N dialogues (0: all)"})
    placement: str = field(default="user", metadata={"choices": ["user", "system"],
                                                     "help": "the instruction in the first user turn or as system"})
    combine: float = field(default=0.0, metadata={"help": "probability of combining two constraints"})
    temperature: float = 0.0
    max_tokens: int = field(default=128, metadata={"help": "max new tokens per answer"})
    seed: int = 1234
    out: str = field(default="runs/adherence", metadata={"help": "output folder"})
    judge: ClientConfig = field(default_factory=ClientConfig, metadata={
        "help": "the judge model for instructions no rule checks (--judge.base-url, --judge.model ...)"})

    def validate(self) -> None:
        super().validate()
        self.judge.validate()
        if self.turns < 1:
            raise LlamalabError(f"gatt eval: --turns must be >= 1, got {self.turns}")
        if not 0 <= self.combine <= 1:
            raise LlamalabError(f"gatt eval: --combine must be in [0, 1], got {self.combine}")


def main(cfg: Config) -> AdherenceResult:
    cfg.validate()
    if cfg.dialogues:
        dialogues, skipped = read_eval_dialogues(cfg.dialogues, cfg.turns, cfg.limit)
    else:
        dialogues, skipped = builtin_dialogues()[:cfg.limit or None], {}
        if cfg.turns > len(dialogues[0].turns):
            raise LlamalabError(f"gatt eval: the built-in dialogues have {len(dialogues[0].turns)} turns; "
                                f"give --dialogues FILE for --turns {cfg.turns}")
        for d in dialogues:
            d.turns = d.turns[:cfg.turns]
    if not dialogues:
        raise LlamalabError(f"gatt eval: no dialogue with {cfg.turns} user turns in {cfg.dialogues} ({skipped})")
    constraints = (read_constraints(cfg.instructions) if cfg.instructions
                   else default_constraints(rule_checkable_only=not cfg.judged))
    needs_judge = any(not c.rule for c in constraints) or any(d.instruction and d.instruction.judged for d in dialogues)
    if needs_judge and not cfg.judge.base_url:
        raise LlamalabError("gatt eval: some instructions have no rule (act as X, hobby, a custom text); give a "
                            "judge, --judge.base-url URL --judge.model NAME, or use rule-checkable ones only")
    record = {k: v for k, v in to_dict(cfg).items() if k != "api_key"}
    record["judge"] = {k: v for k, v in record["judge"].items() if k != "api_key"}
    opts = AdherenceOptions(turns=cfg.turns, placement=cfg.placement, temperature=cfg.temperature,
                            max_tokens=cfg.max_tokens, seed=cfg.seed)
    cache = Path(cfg.out) / "cache"
    with ChatClient(cfg, cache_dir=cache) as client:
        judge = ChatClient(cfg.judge, cache_dir=cache) if cfg.judge.base_url else None
        try:
            result, meta = run_adherence(cfg.out, client, judge, dialogues, constraints, opts, cfg.combine, skipped,
                                         record, cfg.instructions or "default")
        finally:
            if judge is not None:
                judge.close()
    print(format_table(result.table))
    print(f"gatt eval: {len(dialogues)} dialogues x {cfg.turns} turns, model {meta['client']['model']}; "
          f"{meta['seconds']:.1f}s -> {cfg.out}/report.html")
    return result


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
