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


def print_outcome(run: Path, seconds: float, summary: dict[str, Any], report: Path,
                  bundle: Path | None = None) -> None:
    """The end of ``llamalab run``: validation loss against the unigram baseline, the sweep, memorization,
    compute, samples, the report; last the release bundle and the command that verifies it."""
    val, entropy, energy = summary["val_loss"], summary["unigram_entropy"], summary["energy"]
    print0("")
    print0(f"run {run} finished in {seconds:.0f}s")
    print0(f"  validation loss   {val:.4f} nats/token" if val is not None else "  validation loss   n/a")
    print0(f"  unigram entropy   {entropy:.4f} nats/token (a model that only knows token frequencies)")
    if val is not None:
        print0(f"  -> {entropy - val:.2f} nats below unigram "
               f"({math.exp(val):.1f} vs {math.exp(entropy):.1f} perplexity)")
    last = (summary.get("evaluation") or {}).get("last", {})
    if "perplexity" in last:
        p = last["perplexity"]
        print0(f"  sweep             held-out text: {p.get('nll_per_token', float('nan')):.4f} nats/token, "
               f"{p.get('bits_per_byte', float('nan')):.4f} bits/byte at the last checkpoint")
    for task, m in last.items():
        if "acc_norm" in m:
            chance = summary["evaluation"].get(f"{task}_chance")
            print0(f"  benchmark         {task}: acc {m.get('acc', float('nan')):.3f}, acc_norm {m['acc_norm']:.3f} "
                   f"on {summary['evaluation'].get(f'{task}_items', '?')} items"
                   + (f" (chance {chance:.2f})" if chance else ""))
    memo = summary.get("memorization")
    if memo:
        c = memo["last"]
        print0(f"  memorization      {c['mean_score']:.3f} mean score, {c['extractable']}/{c['n']} training "
               f"sequences exactly extractable (k={memo['k']}, l={memo['l']}) at the last checkpoint")
    print0(f"  compute           {summary['total_train_flops']:.3g} FLOPs, {energy['kwh'] * 1000:.2f} Wh, "
           f"{energy['kg_co2eq'] * 1000:.2f} g CO2eq")
    for s in summary["samples"][:2]:
        print0(f"  sample            {s['prompt'] + s['completion']!r}"[:160])
    print0(f"  report            {report}")
    if bundle is not None:
        print0(f"  release bundle    {bundle}")
        print0(f"  verify it with    llamalab release verify {bundle} --steps 2")


# ----------------------------------------------------------------------------- evaluation of every checkpoint

HELDOUT = "heldout.jsonl"  # RUN/eval/heldout.jsonl: the validation text (perplexity task)
CLOZE = "cloze.jsonl"  # RUN/eval/cloze.jsonl: the next-line multiple-choice items
CLOZE_TASK = "cloze_task.json"  # RUN/eval/cloze_task.json: the task definition (llamalab eval ... --task FILE)
CLOZE_DEFINITION = {
    "name": "cloze", "kind": "multiple_choice", "reader": "mc", "prompt": "{question}", "choice": "{choice}",
    "doc": "next line of a held-out document among lines of other held-out documents (llamalab.pipeline."
           "cloze_items); chance = 1 / number of choices"}


def heldout_texts(data_root: Path, docs: Sequence[Document], tokenizer: Any, max_bytes: int) -> tuple[list[str], dict]:
    """The run's validation text, in manifest order, up to ``max_bytes`` (0: all): whole held-out documents
    when the shards split by document, else the decoded validation tokens of each document (the tail the
    trainer never read). Returns the texts and a note of what was kept and left out."""
    from llamalab.data.shards import load_manifest

    manifest = load_manifest(data_root)
    by_id = {d.id: d.text for d in docs}
    whole = str(manifest.get("val_split", "")).startswith("documents")
    texts, n_bytes, cut = [], 0, 0
    for shard in manifest["shards"]:
        if shard["split"] != "val":
            continue
        mm = None
        for rec in shard["documents"]:
            if whole and rec["id"] in by_id:
                text = by_id[rec["id"]]
            else:
                if mm is None:
                    mm = np.memmap(data_root / shard["file"], dtype=np.dtype(manifest["dtype"]), mode="r")
                text = tokenizer.decode([int(t) for t in mm[rec["start"]:rec["end"]]])
            if not text.strip():
                continue
            size = len(text.encode("utf-8"))
            if max_bytes and n_bytes + size > max_bytes and texts:
                cut += 1
                continue
            texts.append(text)
            n_bytes += size
    note = {"documents": len(texts), "bytes": n_bytes, "left_out_over_max_bytes": cut,
            "from": "whole held-out documents" if whole else "decoded validation tokens"}
    return texts, note


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def cloze_items(texts: Sequence[str], n: int, choices: int = 4, seed: int = 0, context_chars: int = 400,
                min_chars: int = 20, max_chars: int = 160) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A multiple-choice benchmark from held-out text that a trained LM beats chance on: the context is the lines
    before a line of a document (up to ``context_chars``), the choices are that line and ``choices - 1`` lines
    of other documents (of the same document, 20+ lines away, when there is only one). Lines of
    ``min_chars``..``max_chars`` characters (stripped) are candidates; returns ``{question, choices, answer, id}``
    items and counts of what was skipped."""
    import random

    rng = random.Random(seed)
    lines = [t.split("\n") for t in texts]
    ok = lambda s: min_chars <= len(s.strip()) <= max_chars  # noqa: E731
    cands = [(d, i) for d, ls in enumerate(lines) for i, s in enumerate(ls) if i > 0 and ok(s)]
    skipped = {"no_context": 0, "too_few_distractors": 0}
    if not cands:
        raise LlamalabError(f"cloze: no held-out line of {min_chars}..{max_chars} characters after another line; "
                            "the validation text is too small for the benchmark")
    rng.shuffle(cands)
    items = []
    for d, i in cands:
        if len(items) >= n:
            break
        ctx = "\n".join(lines[d][:i])[-context_chars:]
        if not ctx.strip():
            skipped["no_context"] += 1
            continue
        gold = lines[d][i]
        pool = [(e, j) for e, j in cands if (e != d if len(lines) > 1 else abs(j - i) > 20)
                and lines[e][j].strip() != gold.strip()]
        picks = {lines[e][j] for e, j in rng.sample(pool, min(len(pool), 4 * choices))}
        picks.discard(gold)
        if len(picks) < choices - 1:
            skipped["too_few_distractors"] += 1
            continue
        opts = rng.sample(sorted(picks), choices - 1)
        answer = rng.randrange(choices)
        opts.insert(answer, gold)
        items.append({"id": f"doc{d}:line{i + 1}", "question": ctx + "\n", "choices": opts, "answer": answer})
    return items, skipped


def write_eval_data(run: Path, texts: Sequence[str], n_cloze: int, seed: int) -> tuple[list[str], list[str], dict]:
    """Write the perplexity and cloze data and task files under ``RUN/eval/``; returns (task names or files,
    data paths, notes) for :func:`llamalab.eval.sweep.sweep`."""
    import json

    from llamalab.run_dir import RunDir

    rd = RunDir(run)
    heldout = write_jsonl(rd.eval_file(HELDOUT), [{"id": f"val{i}", "text": t} for i, t in enumerate(texts)])
    tasks, paths, notes = ["perplexity"], [str(heldout)], {}
    if n_cloze:
        try:
            items, skipped = cloze_items(texts, n_cloze, seed=seed)
        except LlamalabError as e:  # too little held-out text: the sweep keeps perplexity, says why
            print0(f"      cloze benchmark skipped: {e}")
            return tasks, paths, {"cloze_skipped": str(e)}
        cloze = write_jsonl(rd.eval_file(CLOZE), items)
        task_file = rd.eval_file(CLOZE_TASK)
        task_file.write_text(json.dumps(CLOZE_DEFINITION, indent=1) + "\n")
        tasks.append(str(task_file))
        paths.append(str(cloze))
        notes = {"cloze_items": len(items), "cloze_chance": 1 / 4, "cloze_skipped": skipped}
    return tasks, paths, notes


def sweep_run(run: Path, tasks: Sequence[str], paths: Sequence[str], every: int, limit: int = 0,
              device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """``llamalab eval sweep`` on the run's checkpoints: results, ``eval/curves.json`` and the curve figures."""
    from llamalab.eval.run import EvalSettings
    from llamalab.eval.sweep import sweep, write_curves
    from llamalab.eval.tasks import get_task

    sweep(run, [get_task(t) for t in tasks], list(paths), EvalSettings(limit=limit), every=every, device=device,
          dtype=dtype)
    return write_curves(run)


def memorize(run: Path, chunks: int, per_chunk: int, k: int, cont: int, every: int, seed: int,
             device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """``llamalab eval memorization`` on the run: training sequences by data chunk, every ``every``-th checkpoint."""
    from llamalab.eval.memorization import memorize_run, run_sequence_source, sample_sequences

    steps, at = run_sequence_source(run)
    samples, bounds = sample_sequences(steps, at, chunks, per_chunk, seed, k + cont)
    if not samples:
        raise LlamalabError(f"{run}: no training sequence of at least k + l = {k + cont} tokens for memorization")
    return memorize_run(run, samples, bounds, k, cont, every=every, device=device, dtype=dtype)


def build_bundle(run: Path, output: Path) -> Path | None:
    """The release bundle of the run (:func:`llamalab.release.bundle.build_release`); None, with a printed note,
    when the release package is not installed in this tree.

    NOTE: the GGUF form needs the optional ``gguf`` package (extra ``gguf``); without it the bundle is
    built with the llamalab and HF forms only, and says so, rather than failing the whole run at its end.
    """
    import importlib.util

    try:
        from llamalab.release.bundle import build_release
    except ImportError as e:
        print0(f"      release skipped: llamalab.release is not available ({e})")
        return None
    has_gguf = importlib.util.find_spec("gguf") is not None
    if not has_gguf:
        print0("      release: no GGUF form (the gguf package is not installed: pip install 'llamalab[gguf]')")
    return Path(build_release(run, output, gguf=has_gguf))


def curve_summary(curves: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value at the last checkpoint}} for the main metrics."""
    keep = ("nll_per_token", "bits_per_byte", "token_perplexity", "acc", "acc_norm")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in curves.items():
        for m, pts in metrics.items():
            if m in keep and pts:
                out.setdefault(task, {})[m] = pts[-1]["value"]
    return out
