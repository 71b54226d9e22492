"""The whole pipeline in one command: corpus -> tokenizer -> shards -> pretraining -> evaluation ->
samples -> report.

With no flags it runs offline on a built-in real-text corpus (Python's documentation and standard
library, ``llamalab.data.builtin``) and the ``tiny`` preset, in about 10 minutes on 2 CPU cores;
``--data PATH`` (text/JSONL/Parquet files or folders) and ``--preset NAME`` run the same steps on
a user's own data and model. Each step is the same library call its own CLI command makes (the
steps are in :mod:`llamalab.pipeline`); this module only wires them together and records what it did.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0, write_json_atomic
from llamalab.config import from_dict
from llamalab.data.shards import ShardWriterConfig, write_shards
from llamalab.model.config import get_preset
from llamalab.model.folder import resolve_model_path
from llamalab.pipeline import (
    energy_estimate,
    load_corpus,
    print_outcome,
    sample,
    source_counts,
    unigram_entropy,
    write_corpus,
)
from llamalab.report.html import write_report
from llamalab.run_dir import RunDir
from llamalab.tokenizer.spm import TokenizerTrainConfig, train_tokenizer


@dataclass
class Config:
    name: str = field(default="", metadata={"help": "run name: runs/<name> (default: <preset>-<date>-<time>)"})
    runs_dir: str = "runs"
    preset: str = field(default="tiny", metadata={"help": "model preset (llamalab info --all)"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "text/JSONL/Parquet files or folders (default: the built-in Python docs + stdlib corpus)"})
    text_field: str = "text"
    text_mode: str = field(default="file", metadata={"choices": ["file", "paragraphs", "lines"]})
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})
    vocab_size: int = field(default=0, metadata={"help": "tokenizer size (0: the preset's vocab size)"})
    tokenizer: str = field(default="", metadata={"help": "use this tokenizer.model instead of training one"})
    seq_len: int = 256
    global_batch_tokens: int = 8192
    steps: int = 600
    lr: float = 2e-3
    max_seconds: float = field(default=0.0, metadata={"help": "stop pretraining after this long (0: no limit)"})
    checkpoint_interval: int = 100
    eval_interval: int = 100
    samples: int = 4
    sample_tokens: int = 64
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337
    device_power_watts: float = field(default=0.0, metadata={
        "help": "average power of the training device for the energy estimate (0: 300 W per GPU, 10 W per CPU core)"})
    pue: float = field(default=1.1, metadata={"help": "data-centre power usage effectiveness (LLaMA used 1.1)"})
    carbon_intensity: float = field(default=0.385, metadata={
        "help": "kg CO2eq per kWh of the grid (LLaMA used the US average 0.385)"})


def main(cfg: Config) -> dict[str, Any]:
    from llamalab.commands import pretrain

    t0 = time.perf_counter()
    preset = get_preset(cfg.preset)
    if cfg.seq_len > preset.model.max_seq_len:
        raise LlamalabError(f"seq_len ({cfg.seq_len}) is longer than the model's context model.max_seq_len "
                            f"({preset.model.max_seq_len})")
    name = cfg.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir(Path(cfg.runs_dir) / name)
    if run.checkpoints.exists():
        raise LlamalabError(f"{run.root} exists already; choose another --name (or continue it with llamalab "
                            f"pretrain --resume)")
    run.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    print0(f"[1/6] corpus -> {run.corpus}")
    t = time.perf_counter()
    docs, origin = load_corpus(cfg.data, cfg.text_field, cfg.text_mode, cfg.on_error)
    corpus_files = write_corpus(docs, run.corpus)
    by_source, bytes_by_source = source_counts(docs)
    print0(f"      {len(docs):,} documents, {sum(bytes_by_source.values()) / 1e6:.2f} MB from "
           + ", ".join(f"{k} ({v:,} docs)" for k, v in by_source.items()))
    timings["corpus"] = time.perf_counter() - t

    print0("[2/6] tokenizer")
    t = time.perf_counter()
    if cfg.tokenizer:
        from llamalab.tokenizer import Tokenizer

        tok = Tokenizer(cfg.tokenizer)
        tok_stats = tok.info()
    else:
        tok, tok_stats = train_tokenizer(TokenizerTrainConfig(
            inputs=[str(p) for p in corpus_files], output=str(run.tokenizer_dir),
            vocab_size=cfg.vocab_size or preset.model.vocab_size, seed=cfg.seed))
        print0(f"      vocab {tok.vocab_size:,}, {tok_stats['bytes_per_token']} bytes/token on held-out lines")
    timings["tokenizer"] = time.perf_counter() - t

    print0("[3/6] shards")
    t = time.perf_counter()
    manifest = write_shards(docs, tok, run.data, ShardWriterConfig(val_fraction=0.05))
    print0(f"      {manifest['n_tokens']['train']:,} train / {manifest['n_tokens']['val']:,} val tokens")
    timings["shards"] = time.perf_counter() - t

    print0(f"[4/6] pretrain ({cfg.preset})")
    pcfg = from_dict(pretrain.Config, {
        "data": str(run.data), "run_dir": str(run.root), "preset": cfg.preset,
        "model_overrides": {"vocab_size": tok.vocab_size},
        "seq_len": cfg.seq_len, "global_batch_tokens": cfg.global_batch_tokens, "steps": cfg.steps,
        "max_seconds": cfg.max_seconds, "optim": {"lr": cfg.lr}, "checkpoint_interval": cfg.checkpoint_interval,
        "eval_interval": cfg.eval_interval, "eval_batches": 16, "device": cfg.device, "dtype": cfg.dtype,
        "seed": cfg.seed, "report": False})  # the pipeline writes the fuller report at the end
    t = time.perf_counter()
    train_summary = pretrain.main(pcfg)
    timings["pretrain"] = time.perf_counter() - t

    print0("[5/6] evaluation and samples")
    t = time.perf_counter()
    entropy = unigram_entropy(run.data)
    samples = sample(resolve_model_path(run.root), cfg.samples, cfg.sample_tokens, cfg.seed) if cfg.samples else []
    timings["eval"] = time.perf_counter() - t

    meta = json.loads(run.meta.read_text())
    energy = energy_estimate(timings["pretrain"], meta.get("device", "cpu"), cfg.device_power_watts, cfg.pue,
                             cfg.carbon_intensity)
    summary = {
        "run": str(run.root), "preset": cfg.preset, "corpus": {**origin, "documents": len(docs),
                                                               "documents_by_source": dict(by_source),
                                                               "bytes_by_source": dict(bytes_by_source)},
        "tokenizer": {k: tok_stats.get(k) for k in ("vocab_size", "bytes_per_token", "sha256")},
        "train": train_summary, "val_loss": train_summary["val_loss"], "unigram_entropy": entropy,
        "total_train_flops": meta["flops_per_token"] * train_summary["tokens_seen"], "energy": energy,
        "timings": timings, "samples": samples, "pipeline_config": dataclasses.asdict(cfg),
    }
    write_json_atomic(run.summary, summary)
    write_json_atomic(run.samples, samples)

    print0("[6/6] report")
    print_outcome(run.root, time.perf_counter() - t0, summary, write_report(run.root))
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
