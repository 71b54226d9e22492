"""The steps of ``llamalab run`` (corpus -> tokenizer -> shards -> pretraining -> evaluation ->
samples -> report) as library functions; :mod:`llamalab.commands.run` calls them in order.

With no data the corpus is a built-in real-text one (Python's documentation and standard library,
``llamalab.data.builtin``), so the pipeline runs offline. Each step is the same library call its own
CLI command makes (``tokenizer train``, ``data shard``, ``pretrain``, ``generate``, ``report``);
what is added here is the record of the whole run: where the corpus came from, the unigram entropy
baseline, the compute and energy estimate, and samples.

Energy (LLaMA, OPT): energy = device power x hours x PUE; carbon = energy x grid intensity. The
device power is a stated assumption (300 W per GPU, 10 W per CPU core unless given), not a
measurement: the estimate is as good as that figure.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.common import LlamalabError, print0
from llamalab.data.readers import Document, ReadStats, read_documents
from llamalab.data.shards import TokenDataset

PROMPTS = ["The ", "def ", "import ", "In Python, "]


def load_corpus(data: Sequence[str] = (), text_field: str = "text", text_mode: str = "file",
                on_error: str = "raise") -> tuple[list[Document], dict[str, Any]]:
    """The documents of ``data`` (files or folders; the built-in corpus when empty), empty ones
    dropped and counted; and where they came from."""
    stats = ReadStats()
    if data:
        docs = list(read_documents(list(data), text_field=text_field, text_mode=text_mode, on_error=on_error,
                                   stats=stats))
        origin = {"inputs": list(data), "files": stats.files, "read_errors": dict(stats.errors)}
    else:
        from llamalab.data.builtin import builtin_corpus

        docs = builtin_corpus()
        origin = {"inputs": "built-in: pydoc_data.topics + the Python standard library (*.py)"}
    empty = sum(1 for d in docs if not d.text.strip())
    docs = [d for d in docs if d.text.strip()]
    origin["dropped"] = {"empty": empty, **{f"read:{k}": v for k, v in stats.errors.items()}}
    if not docs:
        where = ", ".join(data) if data else "the built-in corpus"
        raise LlamalabError(f"the corpus is empty: no text found in {where}")
    return docs, origin


def source_counts(docs: Sequence[Document]) -> tuple[Counter, Counter]:
    """(documents, bytes) per source."""
    by_source, bytes_by_source = Counter(), Counter()
    for d in docs:
        by_source[d.source] += 1
        bytes_by_source[d.source] += len(d.text.encode("utf-8"))
    return by_source, bytes_by_source


def write_corpus(docs: Sequence[Document], out: Path) -> list[Path]:
    """One text file per source (the tokenizer trains from these; the record keeps them)."""
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


def energy_estimate(seconds: float, device: str, device_power_watts: float = 0.0, pue: float = 1.1,
                    carbon_intensity: float = 0.385) -> dict[str, float]:
    """LLaMA/OPT accounting: energy = device power x hours x PUE; carbon = energy x grid intensity."""
    if device_power_watts:
        watts = device_power_watts
    elif device.startswith("cuda"):
        watts = 300.0
    else:
        watts = 10.0 * (os.cpu_count() or 1)
    kwh = watts * seconds / 3600 * pue / 1000
    return {"device_power_watts": watts, "hours": seconds / 3600, "pue": pue, "kwh": kwh,
            "carbon_intensity_kg_per_kwh": carbon_intensity, "kg_co2eq": kwh * carbon_intensity}


def sample(model_dir: Path, n: int, max_tokens: int, seed: int) -> list[dict[str, str]]:
    """``n`` completions of the built-in prompts (temperature 0.8, top-k 50), one seed each."""
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    engine = Engine.from_folder(model_dir, slots=max(1, n))
    prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed + i) for i in range(n)]
    outs = engine.generate(prompts, params)
    return [{"prompt": p, "completion": o.text} for p, o in zip(prompts, outs)]


def print_outcome(run: Path, seconds: float, summary: dict[str, Any], report: Path) -> None:
    """The end of ``llamalab run``: validation loss against the unigram baseline, compute, samples."""
    val, entropy, energy = summary["val_loss"], summary["unigram_entropy"], summary["energy"]
    print0("")
    print0(f"run {run} finished in {seconds:.0f}s")
    print0(f"  validation loss   {val:.4f} nats/token" if val is not None else "  validation loss   n/a")
    print0(f"  unigram entropy   {entropy:.4f} nats/token (a model that only knows token frequencies)")
    if val is not None:
        print0(f"  -> {entropy - val:.2f} nats below unigram "
               f"({math.exp(val):.1f} vs {math.exp(entropy):.1f} perplexity)")
    print0(f"  compute           {summary['total_train_flops']:.3g} FLOPs, {energy['kwh'] * 1000:.2f} Wh, "
           f"{energy['kg_co2eq'] * 1000:.2f} g CO2eq")
    for s in summary["samples"][:2]:
        print0(f"  sample            {s['prompt'] + s['completion']!r}"[:160])
    print0(f"  report            {report}")
