"""Ghost Attention (Llama 2 GAtt) training data from multi-turn dialogues and a model.

Llama 2, section 3.3: regenerate every assistant turn with an instruction attached to every user turn, keep
the instruction only in the first turn, train on the last answer alone.

``llamalab gatt --data dialogues.jsonl --out DIR --base-url http://HOST:PORT/v1 --model NAME`` (or
``--base-url local:MODEL_PATH``). Writes ``DIR/gatt.jsonl`` (ShareGPT with ``"weight": 0`` on every assistant
turn but the last: train it with ``llamalab sft --format sharegpt --data DIR/gatt.jsonl``), ``rollouts.jsonl``,
``dropped.jsonl`` (every dialogue dropped or cut, with its reason), ``meta.json`` and ``report.html``.
Replies are cached under ``DIR/cache``: an interrupted run resumes without sending a request twice.
Evaluate adherence per turn with ``llamalab gatt eval``. Library: :mod:`llamalab.synth.gatt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError
from llamalab.config import to_dict
from llamalab.synth.client import ChatClient, ClientConfig
from llamalab.synth.gatt import PLACEMENTS, GattOptions, default_constraints, read_constraints, run_gatt


@dataclass
class Config(ClientConfig):
    data: list[str] = field(default_factory=list, metadata={
        "help": "multi-turn dialogues: ShareGPT or OpenAI-messages JSON/JSONL (.gz ok), as `sft --format sharegpt`"})
    out: str = field(default="runs/gatt", metadata={"help": "output folder"})
    instructions: str = field(default="", metadata={
        "help": "constraints file: JSONL {text, short?, kind?, rule?} or one per line (default: the built-in list)"})
    placement: str = field(default="user", metadata={"choices": list(PLACEMENTS), "help":
                           "where the instruction stays in the training dialogue: first user turn or system"})
    short_fraction: float = field(default=0.5, metadata={
        "help": "fraction of training dialogues given the short form ('Figure: Napoleon.'), as Llama 2"})
    combine: float = field(default=0.5, metadata={"help": "probability of combining two constraints"})
    every_turn: bool = field(default=False, metadata={
        "help": "one training record per turn (prefix up to it, only that answer trained) instead of the last only"})
    check_rules: bool = field(default=False, metadata={
        "help": "drop answers that break a rule-checkable instruction (cut the dialogue before them)"})
    max_turns: int = field(default=0, metadata={"help": "keep at most N user turns per dialogue (0: all)"})
    min_turns: int = field(default=2, metadata={"help": "skip dialogues with fewer user turns (counted)"})
    limit: int = field(default=0, metadata={"help": "read at most N dialogues (0: all)"})
    temperature: float = 0.7
    max_tokens: int = field(default=256, metadata={"help": "max new tokens per answer"})
    seed: int = 1234
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"],
                                                     "help": "malformed records: stop with file:line, or count"})

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise LlamalabError("gatt: give the dialogues, --data FILE (ShareGPT JSON/JSONL)")
        for name in ("short_fraction", "combine"):
            if not 0 <= getattr(self, name) <= 1:
                raise LlamalabError(f"gatt: --{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.max_turns < 0 or self.min_turns < 1 or (self.max_turns and self.max_turns < self.min_turns):
            raise LlamalabError(f"gatt: need 1 <= --min-turns ({self.min_turns}) <= --max-turns ({self.max_turns}, "
                                f"0 = all)")
        if self.max_tokens < 1:
            raise LlamalabError(f"gatt: --max-tokens must be >= 1, got {self.max_tokens}")


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    constraints = read_constraints(cfg.instructions) if cfg.instructions else default_constraints()
    opts = GattOptions(placement=cfg.placement, short_fraction=cfg.short_fraction, combine=cfg.combine,
                       every_turn=cfg.every_turn, check_rules=cfg.check_rules, temperature=cfg.temperature,
                       max_tokens=cfg.max_tokens, seed=cfg.seed)
    record = {k: v for k, v in to_dict(cfg).items() if k != "api_key"}
    with ChatClient(cfg, cache_dir=Path(cfg.out) / "cache") as client:
        meta = run_gatt(cfg.data, cfg.out, client, constraints, opts, max_turns=cfg.max_turns,
                        min_turns=cfg.min_turns, limit=cfg.limit, on_error=cfg.on_error, config=record,
                        instructions_source=cfg.instructions or "default")
    led, c = meta["ledger"], meta["requests"]
    drops = ", ".join(f"{k} {v}" for k, v in sorted(led["dropped"].items())) or "none"
    print(f"gatt: {led['read']} dialogues read, {led['kept']} kept -> {led['records']} training records "
          f"({led['turns_sampled']} answers); dropped {sum(led['dropped'].values())} ({drops}); requests sent "
          f"{c['sent']}, cached {c['cache_hits']}, failed {c['failures']}; {meta['seconds']:.1f}s -> {cfg.out}")
    return meta


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
