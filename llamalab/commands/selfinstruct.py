"""Make instruction-tuning data with a model, as Self-Instruct / Stanford Alpaca did: ``llamalab selfinstruct``.

``llamalab selfinstruct --base-url http://127.0.0.1:8000/v1 --out si/ --num-instructions 500`` asks the
model for batches of new instruction/input/output tasks shown a few seed and generated examples,
filters them as Alpaca does (length, banned keywords, punctuation, language, ROUGE-L >= 0.7 against
every kept instruction) and writes ``regen.json`` (Alpaca JSON for ``llamalab sft --format alpaca``),
``ledger.json`` (every rejection and why), ``meta.json`` and ``report.html``. Rerunning the same
command continues where it stopped. The pipeline is :mod:`llamalab.synth.selfinstruct`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.synth.client import ClientConfig

_DEFAULT_SEEDS = Path(__file__).resolve().parents[2].parent / "shared/data/selfinstruct/seed_tasks.jsonl"


@dataclass
class Config(ClientConfig):
    out: str = field(default="", metadata={"help": "output folder (resumed when it exists)"})
    seeds: str = field(default=str(_DEFAULT_SEEDS) if _DEFAULT_SEEDS.exists() else "", metadata={
        "help": "seed tasks JSONL ({instruction, instances: [{input, output}]}, Alpaca's seed_tasks.jsonl)"})
    num_instructions: int = field(default=100, metadata={"help": "stop when this many tasks are kept"})
    batch_size: int = field(default=5, metadata={"help": "new tasks asked for per request"})
    requests_per_round: int = field(default=8, metadata={
        "help": "requests sent together per round (the kept file and ledger are saved after each round)"})
    num_seed_examples: int = field(default=3, metadata={"help": "seed tasks shown per request"})
    num_generated_examples: int = field(default=2, metadata={"help": "generated tasks shown per request, once any"})
    max_requests: int = field(default=0, metadata={
        "help": "stop after this many requests (0: 10 x the requests needed if every task were kept)"})
    rouge_threshold: float = field(default=0.7, metadata={"help": "reject when ROUGE-L with any kept one is >= this"})
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = field(default=1536, metadata={"help": "tokens per reply (a reply cut here loses its last task)"})
    seed: int = field(default=0, metadata={"help": "sampling of the examples and the request seeds"})

    def validate(self) -> None:
        super().validate()
        if not self.out:
            raise LlamalabError("selfinstruct needs --out DIR")
        if not self.seeds:
            raise LlamalabError("seeds: give --seeds FILE (Alpaca's seed_tasks.jsonl; not found next to this checkout)")
        for name in ("num_instructions", "batch_size", "requests_per_round", "max_tokens"):
            if getattr(self, name) < 1:
                raise LlamalabError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_seed_examples", "num_generated_examples", "max_requests"):
            if getattr(self, name) < 0:
                raise LlamalabError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_seed_examples + self.num_generated_examples < 1:
            raise LlamalabError("num_seed_examples + num_generated_examples must be >= 1 (the prompt needs examples)")
        if not 0 < self.rouge_threshold <= 1:
            raise LlamalabError(f"rouge_threshold must be in (0, 1], got {self.rouge_threshold}")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise LlamalabError(f"temperature must be in [0, 2] and top_p in (0, 1], got {self.temperature}, "
                                f"{self.top_p}")


def main(cfg: Config) -> dict:
    from llamalab.synth.selfinstruct import run_selfinstruct

    return run_selfinstruct(cfg)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
