"""Mix cleaned sources by weight and epochs into one seeded stream: token shards or a JSONL file.

``llamalab data mix CLEAN_OUT --preset llama --rename '{"web": "commoncrawl"}' --tokenizer tok/ --output shards/``
or with ``--weights '{"web": 0.7, "wiki": {"weight": 0.3, "epochs": 2}}'``. With a tokenizer the
stream feeds the shard writer (``manifest.json`` gets a ``mixture`` record: planned and actual
bytes, passes and tokens per source); without one it is written to ``OUTPUT/mixed.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import (
    LlamalabError,
    Progress,
    print0,
    write_json_atomic,
)
from llamalab.data.mixture import (
    PRESETS,
    SourceWeight,
    load_clean_output,
    mixture_stream,
    parse_weights,
    plan_mixture,
)


@dataclass
class Config:
    inputs: list[str] = field(default_factory=list, metadata={"positional": True,
                                                              "help": "clean output folder(s) or docs/ folders"})
    preset: str = field(default="", metadata={"choices": ["", *PRESETS], "help": "named weights (llama)"})
    weights: dict = field(default_factory=dict, metadata={"help": "JSON: {source: weight | {weight, epochs}}"})
    rename: dict = field(default_factory=dict, metadata={"help": "JSON: {data source name: weights name}"})
    allow_missing: bool = field(default=False, metadata={"help": "renormalise when a weighted source has no data"})
    seed: int = 0
    tokenizer: str = field(default="", metadata={"help": "tokenizer: write token shards (else mixed.jsonl)"})
    output: str = "mixed"
    shard_tokens: int = 50_000_000
    val_fraction: float = 0.01
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})


def resolve_weights(cfg: Config) -> dict[str, SourceWeight]:
    if cfg.preset and cfg.weights:
        raise LlamalabError("mix: give --preset or --weights, not both")
    if cfg.preset:
        return PRESETS[cfg.preset]()
    if not cfg.weights:
        raise LlamalabError("mix: give --preset llama or --weights '{\"source\": weight, ...}'")
    return parse_weights(cfg.weights, "--weights")


def main(cfg: Config) -> dict:
    if not cfg.inputs:
        raise LlamalabError("mix: give at least one clean output folder")
    t0 = time.perf_counter()
    weights = resolve_weights(cfg)
    by_source = load_clean_output(cfg.inputs, cfg.on_error)
    for old, new in cfg.rename.items():
        if old not in by_source:
            raise LlamalabError(f"--rename: no source {old!r} in the data (have {', '.join(sorted(by_source))})")
        by_source[new] = [d.__class__(d.id, d.text, new, d.provenance, d.meta) for d in by_source.pop(old)]
    sizes = {n: sum(len(d.text.encode("utf-8")) for d in docs) for n, docs in by_source.items()}
    plan = plan_mixture(sizes, weights, cfg.allow_missing)
    if plan.missing:
        print0(f"mix: no data for {', '.join(plan.missing)}: weights renormalised over the rest")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    actual_bytes: Counter = Counter()
    n_docs = 0

    def counted():
        nonlocal n_docs
        for d in mixture_stream(by_source, plan, cfg.seed):
            actual_bytes[d.source] += len(d.text.encode("utf-8"))
            n_docs += 1
            yield d

    record = {"seed": cfg.seed, "preset": cfg.preset or None, "rename": cfg.rename, **plan.to_dict()}
    if cfg.tokenizer:
        from llamalab.data.shards import MANIFEST, ShardWriterConfig, write_shards
        from llamalab.tokenizer import Tokenizer

        manifest = write_shards(list(counted()), Tokenizer(cfg.tokenizer), out,
                                ShardWriterConfig(cfg.shard_tokens, cfg.val_fraction))
        record["actual_bytes"] = dict(actual_bytes)
        manifest["mixture"] = record
        write_json_atomic(out / MANIFEST, manifest)
        where = out / MANIFEST
    else:
        bar = Progress(None, "mix: writing", unit="docs")
        tmp = out / "mixed.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for d in counted():
                f.write(json.dumps({"id": d.id, "text": d.text, "source": d.source, "provenance": d.provenance,
                                    "epoch": d.meta["epoch"]}, ensure_ascii=False) + "\n")
                bar.update(1)
        bar.close()
        tmp.replace(out / "mixed.jsonl")
        record["actual_bytes"] = dict(actual_bytes)
        write_json_atomic(out / "mixture.json", record)
        where = out / "mixture.json"
    secs = time.perf_counter() - t0
    total = sum(actual_bytes.values())
    print0(f"{'source':<16} {'weight':>7} {'actual':>7} {'passes':>7} {'MB':>9}")
    for n, s in plan.sources.items():
        print0(f"{n:<16} {s['weight']:>7.3f} {actual_bytes[n] / max(total, 1):>7.3f} {s['passes']:>7.2f} "
               f"{actual_bytes[n] / 1e6:>9.2f}")
    print0(f"mix: {n_docs:,} documents, {total / 1e6:.2f} MB from {len(plan.sources)} sources in {secs:.1f} s "
           f"({total / 1e6 / max(secs, 1e-9):.2f} MB/s) -> {where}")
    return record


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
