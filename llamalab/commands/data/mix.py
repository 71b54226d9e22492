"""Mix cleaned sources by weight and epochs into one seeded stream: token shards or a JSONL file.

``llamalab data mix CLEAN_OUT --preset llama --rename '{"web": "commoncrawl"}' --tokenizer tok/ --output shards/``
or with ``--weights '{"web": 0.7, "wiki": {"weight": 0.3, "epochs": 2}}'``. With a tokenizer the
stream feeds the shard writer (``manifest.json`` gets a ``mixture`` record: planned and actual
bytes, passes and tokens per source); without one it is written to ``OUTPUT/mixed.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, print0
from llamalab.data.mixture import (
    PRESETS,
    SIZE_BY,
    load_clean_output,
    mixture_stream,
    plan_mixture,
    print_mixture,
    rename_sources,
    resolve_weights,
    smallest_documents,
    source_sizes,
    write_mixture,
)


@dataclass
class Config:
    inputs: list[str] = field(default_factory=list, metadata={"positional": True,
                                                              "help": "clean output folder(s) or docs/ folders"})
    preset: str = field(default="", metadata={"choices": ["", *PRESETS], "help": "named weights (llama)"})
    weights: dict = field(default_factory=dict, metadata={"help": "JSON: {source: weight | {weight, epochs}}"})
    rename: dict = field(default_factory=dict, metadata={"help": "JSON: {data source name: weights name}"})
    allow_missing: bool = field(default=False, metadata={"help": "renormalise when a weighted source has no data"})
    size_by: str = field(default="smallest", metadata={
        "choices": list(SIZE_BY), "help": "smallest: every source keeps its weight, the first to run out of epochs "
                                          "bounds the stream; largest: the largest source is read once, smaller "
                                          "ones repeat up to their epochs cap"})
    max_epochs: float = field(default=0.0, metadata={"help": "cap on passes over any source (0: the weights' "
                                                             "own epochs)"})
    seed: int = 0
    tokenizer: str = field(default="", metadata={"help": "tokenizer: write token shards (else mixed.jsonl)"})
    output: str = "mixed"
    shard_tokens: int = 50_000_000
    val_fraction: float = 0.01
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})


def main(cfg: Config) -> dict:
    if not cfg.inputs:
        raise LlamalabError("mix: give at least one clean output folder")
    t0 = time.perf_counter()
    weights = resolve_weights(cfg.preset, cfg.weights)
    by_source = rename_sources(load_clean_output(cfg.inputs, cfg.on_error), cfg.rename)
    plan = plan_mixture(source_sizes(by_source), weights, cfg.allow_missing, cfg.size_by, cfg.max_epochs,
                        smallest_documents(by_source))
    if plan.missing:
        print0(f"mix: no data for {', '.join(plan.missing)}: weights renormalised over the rest")
    record = {"seed": cfg.seed, "preset": cfg.preset or None, "rename": cfg.rename, **plan.to_dict()}
    tokenizer = shard_cfg = None
    if cfg.tokenizer:
        from llamalab.data.shards import ShardWriterConfig
        from llamalab.tokenizer import Tokenizer

        tokenizer, shard_cfg = Tokenizer(cfg.tokenizer), ShardWriterConfig(cfg.shard_tokens, cfg.val_fraction)
    where, tally = write_mixture(mixture_stream(by_source, plan, cfg.seed), Path(cfg.output), record,
                                 tokenizer, shard_cfg)
    print_mixture(plan, tally, time.perf_counter() - t0, where, record["warnings"])
    return record


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
