"""Describe data at any stage: a clean run (its ledger and kept documents), a shard manifest, or
raw input files. Behind ``llamalab data stats``.

Each ``describe_*`` prints a table and returns the same numbers as a dict. Raw documents are
grouped by source: the record's ``source`` field when it has one, else the file's folder name.
NOTE: language identification is the slow part (py3langid per document), so it runs on the first
``sample`` documents only, and only when asked.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from llamalab.common import Progress, print0, read_json
from llamalab.data.clean.pipeline import DOCS, STATS
from llamalab.data.ledger import Ledger
from llamalab.data.readers import ReadStats, read_documents
from llamalab.data.shards import MANIFEST


def describe_documents(paths: list[str], text_field: str = "text", on_error: str = "raise",
                       languages: bool = False, sample: int = 1000) -> dict:
    """Documents, bytes and words per source (source = the file's folder name)."""
    stats = ReadStats()
    docs, nbytes, nwords, langs = Counter(), Counter(), Counter(), Counter()
    bar = Progress(None, "stats: reading", unit="docs")
    t0 = time.perf_counter()
    for i, d in enumerate(read_documents(paths, text_field=text_field, on_error=on_error, stats=stats)):
        src = d.meta["source"] if isinstance(d.meta.get("source"), str) else d.source
        docs[src] += 1
        nbytes[src] += len(d.text.encode("utf-8"))
        nwords[src] += len(d.text.split())
        if languages and i < sample:
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
    """Tokens per source and the mixture record of a shard manifest."""
    m = read_json(path, what="shard manifest")
    toks = m.get("tokens_by_source", {})
    total = sum(toks.values()) or 1
    print0(f"{'source':<20} {'tokens':>14} {'share':>7}")
    for s, n in sorted(toks.items(), key=lambda kv: -kv[1]):
        print0(f"{s:<20} {n:>14,} {n / total:>7.3f}")
    mix = m.get("mixture")
    if mix:
        print0("mixture: " + ", ".join(f"{n} w={s['weight']:.3f} x{s['passes']:.2f}"
                                       for n, s in mix["sources"].items()))
    print0(f"stats: {m['n_documents']:,} documents, {m['n_tokens']['train']:,} train + {m['n_tokens']['val']:,} val "
           f"tokens in {len(m['shards'])} shards ({path})")
    return {"tokens_by_source": toks, "mixture": mix}


def describe_ledger(path: Path) -> dict:
    """A clean run's ledger (``stats.json``), as the table ``clean`` printed."""
    led = Ledger.load(path)
    print0(led.summary_table())
    return led.to_dict()


def describe_paths(paths: list[str], text_field: str = "text", on_error: str = "raise",
                   languages: bool = False, sample: int = 1000) -> dict:
    """Each path by what it is: a clean output folder, a ledger, a shard folder or manifest; the
    rest are read together as raw documents (under the key ``inputs``)."""
    out: dict = {}
    raw = []
    for p in map(Path, paths):
        if p.is_dir() and (p / STATS).exists():
            out[str(p)] = {"ledger": describe_ledger(p / STATS)}
            if (p / DOCS).is_dir():
                out[str(p)]["kept"] = describe_documents([str(p / DOCS)], text_field, on_error, languages, sample)
        elif p.name == STATS:
            out[str(p)] = {"ledger": describe_ledger(p)}
        elif p.name == MANIFEST or (p.is_dir() and (p / MANIFEST).exists()):
            out[str(p)] = describe_manifest(p if p.name == MANIFEST else p / MANIFEST)
        else:
            raw.append(str(p))
    if raw:
        out["inputs"] = describe_documents(raw, text_field, on_error, languages, sample)
    return out
