"""The whole pipeline in one command: corpus -> tokenizer -> shards -> pretraining -> evaluation of every
checkpoint (validation loss and bits/byte, a next-line cloze benchmark) -> memorization by data chunk ->
samples -> report -> release bundle (LLM360: everything a stranger needs to check and continue the run).

With no flags it runs offline on a built-in real-text corpus (Python's documentation and standard
library, ``llamalab.data.builtin``) and the ``tiny`` preset, in under 10 minutes on 2 CPU cores
(``--sweep false --memorization false --release false`` for a quicker run);
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
    build_bundle,
    curve_summary,
    energy_estimate,
    heldout_texts,
    load_corpus,
    memorize,
    print_outcome,
    sample,
    source_counts,
    sweep_run,
    unigram_entropy,
    write_corpus,
    write_eval_data,
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
    sweep: bool = field(default=True, metadata={
        "help": "evaluate every checkpoint: validation loss and bits/byte, and the next-line cloze benchmark"})
    sweep_every: int = field(default=1, metadata={"help": "sweep every Nth checkpoint (the last one always)"})
    heldout_bytes: int = field(default=60_000, metadata={
        "help": "validation text for the sweep's perplexity and cloze items, in bytes (0: all of it)"})
    cloze_items: int = field(default=100, metadata={"help": "items of the cloze benchmark (0: none)"})
    memorization: bool = field(default=True, metadata={"help": "memorization of training data by data chunk"})
    mem_chunks: int = field(default=4, metadata={"help": "memorization: data chunks (equal step ranges)"})
    mem_per_chunk: int = field(default=16, metadata={"help": "memorization: training sequences per chunk"})
    mem_k: int = field(default=32, metadata={"help": "memorization: prompt tokens"})
    mem_l: int = field(default=32, metadata={"help": "memorization: continuation tokens compared"})
    release: bool = field(default=True, metadata={"help": "build the release bundle at the end"})
    release_output: str = field(default="", metadata={"help": "bundle folder (default: <runs-dir>/<name>-release)"})
    samples: int = 4
    sample_tokens: int = 64
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337

    def validate(self) -> None:
        for name in ("sweep_every", "mem_chunks", "mem_per_chunk", "mem_k", "mem_l"):
            if getattr(self, name) < 1:
                raise LlamalabError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("heldout_bytes", "cloze_items", "samples", "steps"):
            if getattr(self, name) < 0:
                raise LlamalabError(f"{name} must be >= 0, got {getattr(self, name)}")
    device_power_watts: float = field(default=0.0, metadata={
        "help": "average power of the training device for the energy estimate (0: 300 W per GPU, 10 W per CPU core)"})
    pue: float = field(default=1.1, metadata={"help": "data-centre power usage effectiveness (LLaMA used 1.1)"})
    carbon_intensity: float = field(default=0.385, metadata={
        "help": "kg CO2eq per kWh of the grid (LLaMA used the US average 0.385)"})


def main(cfg: Config) -> dict[str, Any]:
    from llamalab.commands import pretrain

    cfg.validate()
    t0 = time.perf_counter()
    preset = get_preset(cfg.preset)
    if cfg.seq_len > preset.model.max_seq_len:
        raise LlamalabError(f"seq_len ({cfg.seq_len}) is longer than the model's context model.max_seq_len "
                            f"({preset.model.max_seq_len})")
    if cfg.memorization and cfg.mem_k + cfg.mem_l > cfg.seq_len + 1:
        raise LlamalabError(f"mem_k + mem_l ({cfg.mem_k} + {cfg.mem_l}) is longer than a training window "
                            f"(seq_len + 1 = {cfg.seq_len + 1}); lower --mem-k/--mem-l or use --memorization false")
    name = cfg.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir(Path(cfg.runs_dir) / name)
    if run.checkpoints.exists():
        raise LlamalabError(f"{run.root} exists already; choose another --name (or continue it with llamalab "
                            f"pretrain --resume)")
    bundle_dir = Path(cfg.release_output) if cfg.release_output else Path(cfg.runs_dir) / f"{name}-release"
    if cfg.release and bundle_dir.exists():
        raise LlamalabError(f"release_output: {bundle_dir} exists already; choose another --name or --release-output")
    run.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    print0(f"[1/9] corpus -> {run.corpus}")
    t = time.perf_counter()
    docs, origin = load_corpus(cfg.data, cfg.text_field, cfg.text_mode, cfg.on_error)
    corpus_files = write_corpus(docs, run.corpus)
    by_source, bytes_by_source = source_counts(docs)
    print0(f"      {len(docs):,} documents, {sum(bytes_by_source.values()) / 1e6:.2f} MB from "
           + ", ".join(f"{k} ({v:,} docs)" for k, v in by_source.items()))
    timings["corpus"] = time.perf_counter() - t

    print0("[2/9] tokenizer")
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

    print0("[3/9] shards")
    t = time.perf_counter()
    manifest = write_shards(docs, tok, run.data, ShardWriterConfig(val_fraction=0.05))
    print0(f"      {manifest['n_tokens']['train']:,} train / {manifest['n_tokens']['val']:,} val tokens")
    timings["shards"] = time.perf_counter() - t

    print0(f"[4/9] pretrain ({cfg.preset})")
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

    print0("[5/9] sweep: validation loss, bits/byte and the cloze benchmark at every checkpoint")
    t = time.perf_counter()
    entropy = unigram_entropy(run.data)
    evaluation: dict[str, Any] = {}
    if cfg.sweep:
        texts, held = heldout_texts(run.data, docs, tok, cfg.heldout_bytes)
        if not texts:
            print0("      sweep skipped: the run has no validation text (val split empty)")
            evaluation = {"skipped": "no validation text"}
        else:
            tasks, paths, notes = write_eval_data(run.root, texts, cfg.cloze_items, cfg.seed)
            curves = sweep_run(run.root, tasks, paths, cfg.sweep_every, device=cfg.device, dtype=cfg.dtype)
            evaluation = {"heldout": held, **notes, "last": curve_summary(curves)}
    else:
        print0("      sweep off (--sweep false)")
    timings["sweep"] = time.perf_counter() - t

    print0("[6/9] memorization by data chunk")
    t = time.perf_counter()
    memo = None
    if cfg.memorization:
        memo = memorize(run.root, cfg.mem_chunks, cfg.mem_per_chunk, cfg.mem_k, cfg.mem_l, cfg.sweep_every,
                        cfg.seed, cfg.device, cfg.dtype)
    else:
        print0("      memorization off (--memorization false)")
    timings["memorization"] = time.perf_counter() - t

    print0("[7/9] samples")
    t = time.perf_counter()
    samples = sample(resolve_model_path(run.root), cfg.samples, cfg.sample_tokens, cfg.seed) if cfg.samples else []
    timings["samples"] = time.perf_counter() - t

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
        "evaluation": evaluation,
        "memorization": {k: memo[k] for k in ("k", "l", "n_sequences")} | {"last": memo["checkpoints"][-1]}
        if memo else None,
        "timings": timings, "samples": samples, "pipeline_config": dataclasses.asdict(cfg),
    }
    write_json_atomic(run.summary, summary)
    write_json_atomic(run.samples, samples)

    print0("[8/9] report")
    report = write_report(run.root)

    print0(f"[9/9] release -> {bundle_dir}")
    bundle = None
    if cfg.release:
        t = time.perf_counter()
        bundle = build_bundle(run.root, bundle_dir)
        timings["release"] = time.perf_counter() - t
        summary["release"] = str(bundle) if bundle else None
        write_json_atomic(run.summary, summary)
    else:
        print0("      release off (--release false)")
    print_outcome(run.root, time.perf_counter() - t0, summary, report, bundle)
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
