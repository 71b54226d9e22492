"""Describe data: a clean run's ledger and kept documents, a shard manifest, or raw input files.

``llamalab data stats PATH`` where PATH is a ``llamalab data clean`` output folder (ledger table,
documents and MB kept per source), a ``stats.json`` ledger, a shard folder / ``manifest.json``
(tokens per source, the mixture record), or files/folders of raw documents (documents, MB, words
per source, and with ``--languages`` the language mix of a sample).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, Progress, print0, read_json
from llamalab.data.ledger import Ledger
from llamalab.data.readers import ReadStats, read_documents


@dataclass
class Config:
    paths: list[str] = field(default_factory=list, metadata={"positional": True,
                                                             "help": "clean output, stats.json, manifest, or raw inputs"})
    text_field: str = "text"
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})
    languages: bool = field(default=False, metadata={"help": "identify the language of up to --sample documents"})
    sample: int = 1000


def describe_documents(paths: list[str], cfg: Config) -> dict:
    """Documents, bytes and words per source (source = the file's folder name)."""
    stats = ReadStats()
    docs, nbytes, nwords, langs = Counter(), Counter(), Counter(), Counter()
    bar = Progress(None, "stats: reading", unit="docs")
    t0 = time.perf_counter()
    for i, d in enumerate(read_documents(paths, text_field=cfg.text_field, on_error=cfg.on_error, stats=stats)):
        src = d.meta["source"] if isinstance(d.meta.get("source"), str) else d.source
        docs[src] += 1
        nbytes[src] += len(d.text.encode("utf-8"))
        nwords[src] += len(d.text.split())
        if cfg.languages and i < cfg.sample:
            from llamalab.data.filters import detect_language

            langs[detect_language(d.text)[0]] += 1
        bar.update(1)
    bar.close()
    secs = time.perf_counter() - t0
    print0(f"{'source':<20} {'docs':>9} {'MB':>9} {'words/doc':>10}")
    for s in sorted(docs):
        print0(f"{s:<20} {docs[s]:>9,} {nbytes[s] / 1e6:>9.2f} {nwords[s] / docs[s]:>10.0f}")
    if langs:
        print0("languages (sample): " + ", ".join(f"{k} {v}" for k, v in langs.most_common(10)))
    errors = ", ".join(f"{k}: {v}" for k, v in stats.errors.items()) or "none"
    total = sum(nbytes.values())
    print0(f"stats: {sum(docs.values()):,} documents, {total / 1e6:.2f} MB in {stats.files} files, {secs:.1f} s "
           f"({sum(docs.values()) / max(secs, 1e-9):,.0f} docs/s, {total / 1e6 / max(secs, 1e-9):.2f} MB/s) | "
           f"bad input: {errors}")
    return {"documents": dict(docs), "bytes": dict(nbytes), "words": dict(nwords), "languages": dict(langs),
            "errors": dict(stats.errors)}


def describe_manifest(path: Path) -> dict:
    m = read_json(path, what="shard manifest")
    toks = m.get("tokens_by_source", {})
    total = sum(toks.values()) or 1
    print0(f"{'source':<20} {'tokens':>14} {'share':>7}")
    for s, n in sorted(toks.items(), key=lambda kv: -kv[1]):
        print0(f"{s:<20} {n:>14,} {n / total:>7.3f}")
    mix = m.get("mixture")
    if mix:
        print0("mixture: " + ", ".join(f"{n} w={s['weight']:.3f} x{s['passes']:.2f}" for n, s in mix["sources"].items()))
    print0(f"stats: {m['n_documents']:,} documents, {m['n_tokens']['train']:,} train + {m['n_tokens']['val']:,} val "
           f"tokens in {len(m['shards'])} shards ({path})")
    return {"tokens_by_source": toks, "mixture": mix}


def describe_ledger(path: Path) -> dict:
    led = Ledger.load(path)
    print0(led.summary_table())
    return led.to_dict()


def main(cfg: Config) -> dict:
    if not cfg.paths:
        raise LlamalabError("stats: give a clean output folder, a stats.json, a manifest or input files")
    out: dict = {}
    raw = []
    for p in map(Path, cfg.paths):
        if p.is_dir() and (p / "stats.json").exists():
            out[str(p)] = {"ledger": describe_ledger(p / "stats.json")}
            if (p / "docs").is_dir():
                out[str(p)]["kept"] = describe_documents([str(p / "docs")], cfg)
        elif p.name == "stats.json":
            out[str(p)] = {"ledger": describe_ledger(p)}
        elif p.name == "manifest.json" or (p.is_dir() and (p / "manifest.json").exists()):
            out[str(p)] = describe_manifest(p if p.name == "manifest.json" else p / "manifest.json")
        else:
            raw.append(str(p))
    if raw:
        out["inputs"] = describe_documents(raw, cfg)
    return out


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
