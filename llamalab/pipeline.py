"""The whole pipeline in one command: corpus -> tokenizer -> shards -> pretraining -> evaluation ->
samples -> report.

With no flags it runs offline on a built-in real-text corpus (Python's documentation and standard
library, ``llamalab.data.builtin``) and the ``tiny`` preset, in about 10 minutes on 2 CPU cores;
``--data PATH`` (text/JSONL/Parquet files or folders) and ``--preset NAME`` run the same steps on
a user's own data and model. Each step is the same library call its own CLI command makes; this
module only wires them together and records what it did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.common import LlamalabError, print0, write_json_atomic
from llamalab.config import from_dict
from llamalab.data.readers import Document, ReadStats, read_documents
from llamalab.data.shards import ShardWriterConfig, TokenDataset, write_shards
from llamalab.model.config import get_preset
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


PROMPTS = ["The ", "def ", "import ", "In Python, "]


def load_corpus(cfg: Config) -> tuple[list[Document], dict[str, Any]]:
    stats = ReadStats()
    if cfg.data:
        docs = list(read_documents(cfg.data, text_field=cfg.text_field, text_mode=cfg.text_mode,
                                   on_error=cfg.on_error, stats=stats))
        origin = {"inputs": cfg.data, "files": stats.files, "read_errors": dict(stats.errors)}
    else:
        from llamalab.data.builtin import builtin_corpus

        docs = builtin_corpus()
        origin = {"inputs": "built-in: pydoc_data.topics + the Python standard library (*.py)"}
    empty = sum(1 for d in docs if not d.text.strip())
    docs = [d for d in docs if d.text.strip()]
    origin["dropped"] = {"empty": empty, **{f"read:{k}": v for k, v in stats.errors.items()}}
    if not docs:
        where = ", ".join(cfg.data) if cfg.data else "the built-in corpus"
        raise LlamalabError(f"the corpus is empty: no text found in {where}")
    return docs, origin


def write_corpus(docs: list[Document], out: Path) -> list[Path]:
    """One JSONL file per source (the tokenizer trains from these; the record keeps them)."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for d in docs:
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in d.source) or "data"
        if name not in files:
            files[name] = open(out / f"{name}.txt", "w", encoding="utf-8")
        files[name].write(d.text.replace("\r", "") + "\n")
    for f in files.values():
        f.close()
    return [out / f"{n}.txt" for n in sorted(files)]


def unigram_entropy(data_root: Path) -> float:
    """Entropy (nats/token) of the training tokens' unigram distribution: the loss of a model that
    knows token frequencies and nothing else."""
    ds = TokenDataset.open(data_root, "train", 1)
    counts = np.zeros(ds.manifest["vocab_size"], dtype=np.int64)
    for s in ds.shards:
        counts += np.bincount(np.memmap(data_root / s["file"], dtype=ds.dtype, mode="r"), minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def energy_estimate(seconds: float, device: str, cfg: Config) -> dict[str, float]:
    """LLaMA/OPT accounting: energy = device power x hours x PUE; carbon = energy x grid intensity."""
    import os

    if cfg.device_power_watts:
        watts = cfg.device_power_watts
    elif device.startswith("cuda"):
        watts = 300.0
    else:
        watts = 10.0 * (os.cpu_count() or 1)
    kwh = watts * seconds / 3600 * cfg.pue / 1000
    return {"device_power_watts": watts, "hours": seconds / 3600, "pue": cfg.pue, "kwh": kwh,
            "carbon_intensity_kg_per_kwh": cfg.carbon_intensity, "kg_co2eq": kwh * cfg.carbon_intensity}


def sample(model_dir: Path, n: int, max_tokens: int, seed: int) -> list[dict[str, str]]:
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    engine = Engine.from_folder(model_dir, slots=max(1, n))
    prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed + i) for i in range(n)]
    outs = engine.generate(prompts, params)
    return [{"prompt": p, "completion": o.text} for p, o in zip(prompts, outs)]


def main(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    preset = get_preset(cfg.preset)
    if cfg.seq_len > preset.model.max_seq_len:
        raise LlamalabError(f"seq_len ({cfg.seq_len}) is longer than the model's context model.max_seq_len "
                            f"({preset.model.max_seq_len})")
    name = cfg.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(cfg.runs_dir) / name
    if (run / "checkpoints").exists():
        raise LlamalabError(f"{run} exists already; choose another --name (or continue it with llamalab pretrain --resume)")
    run.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    print0(f"[1/6] corpus -> {run / 'corpus'}")
    t = time.perf_counter()
    docs, origin = load_corpus(cfg)
    corpus_files = write_corpus(docs, run / "corpus")
    by_source = Counter(d.source for d in docs)
    bytes_by_source = Counter()
    for d in docs:
        bytes_by_source[d.source] += len(d.text.encode("utf-8"))
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
            inputs=[str(p) for p in corpus_files], output=str(run / "tokenizer"),
            vocab_size=cfg.vocab_size or preset.model.vocab_size, seed=cfg.seed))
        print0(f"      vocab {tok.vocab_size:,}, {tok_stats['bytes_per_token']} bytes/token on held-out lines")
    timings["tokenizer"] = time.perf_counter() - t

    print0("[3/6] shards")
    t = time.perf_counter()
    data_root = run / "data"
    manifest = write_shards(docs, tok, data_root, ShardWriterConfig(val_fraction=0.05))
    print0(f"      {manifest['n_tokens']['train']:,} train / {manifest['n_tokens']['val']:,} val tokens")
    timings["shards"] = time.perf_counter() - t

    print0(f"[4/6] pretrain ({cfg.preset})")
    from llamalab.train.pretrain import Config as PretrainConfig, main as pretrain

    pcfg = from_dict(PretrainConfig, {
        "data": str(data_root), "run_dir": str(run), "preset": cfg.preset, "model": {"vocab_size": tok.vocab_size},
        "seq_len": cfg.seq_len, "global_batch_tokens": cfg.global_batch_tokens, "steps": cfg.steps,
        "max_seconds": cfg.max_seconds, "optim": {"lr": cfg.lr}, "checkpoint_interval": cfg.checkpoint_interval,
        "eval_interval": cfg.eval_interval, "eval_batches": 16, "device": cfg.device, "dtype": cfg.dtype,
        "seed": cfg.seed, "report": False})  # the pipeline writes the fuller report at the end
    t = time.perf_counter()
    train_summary = pretrain(pcfg)
    timings["pretrain"] = time.perf_counter() - t

    print0("[5/6] evaluation and samples")
    t = time.perf_counter()
    entropy = unigram_entropy(data_root)
    from llamalab.train.checkpoint import list_checkpoints

    last = list_checkpoints(run / "checkpoints")[-1]
    samples = sample(last / "model", cfg.samples, cfg.sample_tokens, cfg.seed) if cfg.samples else []
    timings["eval"] = time.perf_counter() - t

    meta = json.loads((run / "meta.json").read_text())
    energy = energy_estimate(timings["pretrain"], meta.get("device", "cpu"), cfg)
    total_flops = meta["flops_per_token"] * train_summary["tokens_seen"]
    summary = {
        "run": str(run), "preset": cfg.preset, "corpus": {**origin, "documents": len(docs),
                                                          "documents_by_source": dict(by_source),
                                                          "bytes_by_source": dict(bytes_by_source)},
        "tokenizer": {k: tok_stats.get(k) for k in ("vocab_size", "bytes_per_token", "sha256")},
        "train": train_summary, "val_loss": train_summary["val_loss"], "unigram_entropy": entropy,
        "total_train_flops": total_flops, "energy": energy, "timings": timings, "samples": samples,
        "pipeline_config": dataclasses.asdict(cfg),
    }
    write_json_atomic(run / "summary.json", summary)
    write_json_atomic(run / "samples.json", samples)

    print0("[6/6] report")
    from llamalab.report.html import write_report

    report = write_report(run)
    val = train_summary["val_loss"]
    print0("")
    print0(f"run {run} finished in {time.perf_counter() - t0:.0f}s")
    print0(f"  validation loss   {val:.4f} nats/token" if val is not None else "  validation loss   n/a")
    print0(f"  unigram entropy   {entropy:.4f} nats/token (a model that only knows token frequencies)")
    if val is not None:
        print0(f"  -> {entropy - val:.2f} nats below unigram ({math.exp(val):.1f} vs {math.exp(entropy):.1f} perplexity)")
    print0(f"  compute           {total_flops:.3g} FLOPs, {energy['kwh'] * 1000:.2f} Wh, {energy['kg_co2eq'] * 1000:.2f} g CO2eq")
    for s in samples[:2]:
        print0(f"  sample            {s['prompt'] + s['completion']!r}"[:160])
    print0(f"  report            {report}")
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
