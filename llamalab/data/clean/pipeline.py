"""The cleaning pipeline behind ``llamalab data clean``: plan shards, fit models, clean shards in
parallel, deduplicate across the corpus, and account for every document in the ledger.

Stages, each resumable (see :mod:`llamalab.data.executor`):

1. **plan**: every source's inputs are cut into shards: a group of files for one-document-per-file
   sources (code, books, arXiv), or a range of documents of one file for many-documents files
   (JSONL, a wiki dump, a Posts.xml). NOTE: a range shard re-reads its file up to its range; this
   keeps shards independent (no pre-split copies on disk) at the cost of reading a big file once
   per shard. Split big JSONL inputs into several files for large runs.
2. **models** (web sources with a reference corpus): the n-gram LM and the reference classifier are
   trained on the reference, perplexity cutoffs are measured on the first ``calib_docs`` web
   pages; saved under ``models/`` so every worker loads the same ones.
3. **hashes** (web, ``line_dedup``): each shard's normalised-line hashes; merged into the
   first-shard table used to drop repeated lines (first occurrence kept).
4. **clean** (per shard, parallel): source cleaner, then decontamination; kept documents go to
   ``stage1/<shard>.jsonl``, drops to the shard's ledger (and ``rejects/`` with keep_rejects).
5. **dedup** (one pass, in shard order): exact duplicates across all sources, then MinHash near
   duplicates within each source; writes ``docs/<source>/<shard>.jsonl``, the output of the stage.

``stats.json`` holds the merged ledger; its invariant ``read == kept + dropped`` is checked.

The output folder's names that other stages read (``llamalab data mix`` and ``stats``) are the
constants :data:`DOCS`, :data:`STATS` and :data:`PLAN`. A clean config file
(:func:`load_clean_config`) holds the sources plus any :class:`CleanSettings` key.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from llamalab.common import LlamalabError, print0, read_json, write_json_atomic
from llamalab.data import filters
from llamalab.data.clean import CleanResult
from llamalab.data.dedup import (
    Decontaminator,
    ExactDedup,
    NearDupIndex,
    dedup_lines,
    first_seen,
    shard_line_hashes,
)
from llamalab.data.executor import marker_path, run_tasks
from llamalab.data.ledger import Ledger, open_rejects
from llamalab.data.readers import Document, ReadStats, expand_paths, read_documents

DOCS = "docs"  # the output: docs/<source>/<shard>.jsonl
STATS = "stats.json"  # the merged ledger
PLAN = "plan.json"  # the shard plan and the settings it was made with (resuming checks them)

KINDS = ("web", "code", "wiki", "books", "arxiv", "stackexchange", "text")
MULTI_DOC_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".xml")


@dataclass
class SourceSpec:
    name: str
    kind: str
    inputs: list[str]
    text_field: str = "text"
    text_mode: str = "file"
    near_dup_threshold: float = 0.0  # 0: the kind's default (books 0.9, others the run's setting)

    def validate(self, where: str) -> None:
        if self.kind not in KINDS:
            raise LlamalabError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.inputs:
            raise LlamalabError(f"{where}: source {self.name!r} has no inputs")


@dataclass
class CleanSettings:
    """Settings of a cleaning run. ``llamalab data clean``'s Config extends this class, so each
    setting is declared once and is a flag and a config-file key at the same time."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    line_dedup: bool = True
    reference: list[str] = field(default_factory=list, metadata={"help": "reference corpus (wiki dump or text) "
                                                                          "for the perplexity LM and classifier"})
    calib_docs: int = 500
    drop_buckets: list[str] = field(default_factory=lambda: ["tail"])
    min_reference_score: float = 0.5
    eval_files: list[str] = field(default_factory=list, metadata={"help": "evaluation sets to decontaminate against"})
    decontam: str = field(default="remove", metadata={
        "choices": ["remove", "drop", "flag", "off"],
        "help": "eval overlap: remove the paragraphs that match (keep the rest), drop the whole document, "
                "flag it, or off"})
    decontam_n: int = 13
    exact_dedup: bool = True
    near_dup: bool = True
    near_dup_threshold: float = 0.8
    shard_docs: int = 1000
    files_per_shard: int = 100
    keep_rejects: bool = field(default=False, metadata={"help": "write rejected documents with their reason"})
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"],
                                                     "help": "bad input lines: stop with file:line, or count them"})
    max_docs: int = 0  # per multi-document file (JSONL, dump), 0 = all: smoke runs
    max_doc_bytes: int = field(default=0, metadata={
        "help": "drop documents larger than this many bytes as too_long, never reading them whole (0: no limit)"})

    @classmethod
    def pick(cls, obj: object) -> "CleanSettings":
        """The cleaning settings of ``obj`` (a subclass instance, such as the command's Config)."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})


# ----------------------------------------------------------------------------- reading


def _files(spec: SourceSpec) -> list[Path]:
    files = expand_paths(spec.inputs)
    if spec.kind == "stackexchange":
        files = [f for f in files if f.name.split(".")[0] == "Posts"]
    elif spec.kind == "arxiv":
        files = [f for f in files if f.suffix == ".tex"]
    elif spec.kind == "wiki":
        files = [f for f in files if ".xml" in f.suffixes]
    if not files:
        raise LlamalabError(f"source {spec.name!r}: no input files of kind {spec.kind} under {spec.inputs}")
    return files


def read_source(spec: SourceSpec, files: list[Path], on_error: str, stats: ReadStats,
                max_doc_bytes: int = 0) -> Iterator[Document]:
    """The documents of a source's files: a dump reader for wiki and Stack Exchange, else by suffix.

    A dump that is truncated or not a dump stops with one line naming it, or with ``on_error="skip"``
    is counted (``truncated_file`` / ``unreadable_file``) after the pages read before the damage."""
    if spec.kind == "wiki":
        from llamalab.data.clean.wiki import read_dump as read_file
    elif spec.kind == "stackexchange":
        from llamalab.data.clean.stackexchange import read_threads as read_file
    else:
        yield from read_documents(files, spec.name, spec.text_field, spec.text_mode, on_error, stats, max_doc_bytes)
        return
    for f in files:
        stats.files += 1
        stats.bytes += f.stat().st_size
        try:
            for doc in read_file(f, spec.name):
                if max_doc_bytes and len(doc.text) > max_doc_bytes // 4 and _text_bytes(doc) > max_doc_bytes:
                    stats.add_error("too_long", doc.provenance)
                    continue
                yield doc
        except (EOFError, OSError, zlib.error) as e:
            reason = "truncated_file" if isinstance(e, EOFError) else "unreadable_file"
            if on_error != "skip":
                raise LlamalabError(f"{f}: {'truncated' if reason == 'truncated_file' else 'unreadable'} "
                                    f"{spec.kind} dump ({e}); use on_error=skip to count and skip it") from None
            stats.add_error(reason, str(f))
        except LlamalabError:
            if on_error != "skip":
                raise
            stats.add_error("unreadable_file", str(f))


def _multi_doc(spec: SourceSpec, f: Path) -> bool:
    name = f.name[: -len(f.suffixes[-1])] if f.suffix in (".gz", ".zst", ".bz2") else f.name
    return spec.kind in ("wiki", "stackexchange") or name.endswith(MULTI_DOC_SUFFIXES) or spec.text_mode != "file"


def plan_shards(sources: list[SourceSpec], s: CleanSettings) -> list[dict]:
    """The shard list: ``{"index", "name", "source", "files", "start", "end"}`` in corpus order."""
    shards: list[dict] = []
    for spec in sources:
        files = _files(spec)
        single = [f for f in files if not _multi_doc(spec, f)]
        for k in range(0, len(single), s.files_per_shard):
            shards.append({"source": spec.name, "files": [str(f) for f in single[k:k + s.files_per_shard]],
                           "start": 0, "end": -1})
        for f in (f for f in files if _multi_doc(spec, f)):
            n = sum(1 for _ in read_source(spec, [f], "skip", ReadStats(), s.max_doc_bytes))
            if s.max_docs:
                n = min(n, s.max_docs)
            for a in range(0, max(n, 1), s.shard_docs):
                last = a + s.shard_docs >= n
                shards.append({"source": spec.name, "files": [str(f)], "start": a,
                               "end": -1 if last else a + s.shard_docs})
    for i, sh in enumerate(shards):
        sh["index"] = i
        sh["name"] = f"{i:05d}_{sh['source']}"
    return shards


def shard_documents(spec: SourceSpec, shard: dict, on_error: str, ledger: Ledger,
                    max_doc_bytes: int = 0) -> Iterator[Document]:
    """The shard's documents. A read error (counted under stage "read") belongs to the shard that
    holds the next good document, or to the file's last shard, so each is counted exactly once."""
    from collections import Counter

    stats = ReadStats()
    seen: Counter = Counter()
    start, end = shard["start"], shard["end"]
    for i, doc in enumerate(read_source(spec, [Path(f) for f in shard["files"]], on_error, stats, max_doc_bytes)):
        if end != -1 and i >= end:
            return
        if i >= start:
            _count_read_errors(ledger, stats, seen)
            yield doc
        seen = Counter(stats.errors)
    _count_read_errors(ledger, stats, seen)


def _count_read_errors(ledger: Ledger, stats: ReadStats, seen) -> None:
    new = stats.errors - seen
    for reason, count in sorted(new.items()):
        ledger.read += count
        ledger.docs[("read", reason)] += count
    if new:
        for ex in stats.error_examples[-sum(new.values()):]:
            where, reason = ex.rsplit(": ", 1)
            ledger._example("read", reason, where, "")


# ----------------------------------------------------------------------------- models (web)


def _chunks(text: str, n_words: int = 200) -> list[str]:
    ws = text.split()
    return [" ".join(ws[i:i + n_words]) for i in range(0, len(ws), n_words) if len(ws[i:i + n_words]) >= 20]


def fit_models(sources: list[SourceSpec], shards: list[dict], s: CleanSettings, out: Path) -> dict:
    """Train the LM and classifier on the reference and calibrate cutoffs on web pages."""
    from llamalab.data.clean.wiki import clean_wiki, read_dump

    mdir = out / "models"
    if (mdir / "models.json").exists():
        return read_json(mdir / "models.json", what="models")
    ref_texts: list[str] = []
    for f in expand_paths(s.reference):
        if ".xml" in f.suffixes:
            ref_texts += [r.text for r in (clean_wiki(d.text) for d in read_dump(f)) if r.kept]
        else:
            ref_texts += [d.text for d in read_documents([f], "reference", on_error="skip")]
    if not ref_texts:
        raise LlamalabError(f"reference corpus {s.reference}: no usable text")
    webs = {sp.name for sp in sources if sp.kind == "web"}
    calib: list[str] = []
    for sh in shards:
        if sh["source"] not in webs or len(calib) >= s.calib_docs:
            continue
        spec = next(sp for sp in sources if sp.name == sh["source"])
        for d in shard_documents(spec, sh, "skip", Ledger(), s.max_doc_bytes):
            text, _ = filters.c4_lines(d.text)
            if len(text.split()) >= 20:
                calib.append(text)
            if len(calib) >= s.calib_docs:
                break
    if not calib:
        raise LlamalabError("models: no web page long enough to calibrate perplexity buckets")
    t0 = time.perf_counter()
    lm = filters.NgramLM().fit(ref_texts)
    cutoffs = filters.bucket_cutoffs([lm.perplexity(t) for t in calib])
    positives = [c for t in ref_texts for c in _chunks(t)]
    clf = filters.ReferenceClassifier().fit(positives, calib)
    mdir.mkdir(parents=True, exist_ok=True)
    lm.save(mdir / "lm.pkl")
    clf.save(mdir / "classifier.npz")
    info = {"lm": str(mdir / "lm.pkl"), "classifier": str(mdir / "classifier.npz"), "cutoffs": list(cutoffs),
            "reference_docs": len(ref_texts), "reference_tokens": lm.total, "calibration_docs": len(calib),
            "seconds": round(time.perf_counter() - t0, 2)}
    write_json_atomic(mdir / "models.json", info)
    return info


# ----------------------------------------------------------------------------- per-shard tasks

_CACHE: dict[str, object] = {}


def _cached(key: str, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def hashes_task(task: dict) -> dict:
    spec = SourceSpec(**task["spec"])
    out = Path(task["out"]) / "hashes" / f"{task['shard']['name']}.npy"
    max_doc_bytes = task.get("max_doc_bytes", 0)
    hs = shard_line_hashes(d.text for d in shard_documents(spec, task["shard"], "skip", Ledger(), max_doc_bytes))
    arr = np.array(sorted(hs), dtype=np.uint64)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(out)
    return {"file": str(out), "n": len(arr)}


def _first_seen_table(out: Path) -> dict[int, int]:
    z = np.load(out / "models" / "first_seen.npz")
    return dict(zip(z["hashes"].tolist(), z["shards"].tolist()))


def _clean_one(kind: str, doc: Document, shard_index: int, ctx: dict) -> CleanResult:
    if kind == "web":
        from llamalab.data.clean.web import WebConfig, clean_web

        s = ctx["settings"]
        cfg = WebConfig(languages=s.languages, drop_buckets=s.drop_buckets, min_reference_score=s.min_reference_score)
        first = ctx.get("first_seen")
        line_dedup = None
        if first is not None:
            def line_dedup(text: str) -> tuple[str, list[str]]:
                return dedup_lines(text, shard_index, first, ctx["seen_here"])
        return clean_web(doc.text, cfg, line_dedup, ctx.get("lm"), ctx.get("cutoffs"), ctx.get("classifier"))
    if kind == "code":
        from llamalab.data.clean.code import clean_code

        return clean_code(doc.text, doc.meta)
    if kind == "wiki":
        from llamalab.data.clean.wiki import clean_wiki

        return clean_wiki(doc.text)
    if kind == "books":
        from llamalab.data.clean.books import clean_book

        return clean_book(doc.text)
    if kind == "arxiv":
        from llamalab.data.clean.arxiv import clean_latex

        return clean_latex(doc.text)
    if kind == "stackexchange":
        from llamalab.data.clean.stackexchange import clean_thread

        return clean_thread(doc.meta["question"], doc.meta["answers"])
    return CleanResult(doc.text) if doc.text.strip() else CleanResult(None, "text:empty")


def _text_bytes(doc) -> int:
    """Bytes of a document's text; a Stack Exchange thread also counts its title and answers."""
    n = len(doc.text.encode("utf-8"))
    q = doc.meta.get("question") if isinstance(doc.meta, dict) else None
    if isinstance(q, dict):
        n += len(str(q.get("Title", "")).encode("utf-8"))
        n += sum(len(str(a.get("Body", "")).encode("utf-8")) for a in doc.meta.get("answers", []))
    return n


def _context(task: dict, spec: SourceSpec, s: CleanSettings) -> dict:
    out = Path(task["out"])
    ctx: dict = {"settings": s, "seen_here": set()}
    if spec.kind == "web":
        if task.get("models"):
            m = task["models"]
            ctx["lm"] = _cached(m["lm"], lambda: filters.NgramLM.load(m["lm"]))
            ctx["classifier"] = _cached(m["classifier"], lambda: filters.ReferenceClassifier.load(m["classifier"]))
            ctx["cutoffs"] = tuple(m["cutoffs"])
        if s.line_dedup:
            ctx["first_seen"] = _cached(str(out / "first_seen"), lambda: _first_seen_table(out))
    if s.eval_files and s.decontam != "off":
        key = "decontam:" + json.dumps([s.eval_files, s.decontam_n])
        ctx["decontam"] = _cached(key, lambda: Decontaminator.from_files(s.eval_files, s.decontam_n))
    return ctx


def _decontaminate(dc: Decontaminator, mode: str, doc_id: str, res: CleanResult, meta: dict, led: Ledger) -> bool:
    """Apply decontamination ``mode`` to a cleaned document; False when the document is dropped.

    ``remove`` cuts the paragraphs eval n-grams overlap (a document left empty is dropped),
    ``drop`` drops the document at its first matching n-gram, ``flag`` keeps it marked."""
    if mode == "drop":
        hit = dc.match(res.text)
        if hit:
            led.drop_doc("decontam", hit, doc_id, res.text)
            return False
        return True
    if mode == "flag":
        _, found = dc.find(res.text)
        if found:
            led.flag("decontam", found[0].eval_file, doc_id, res.text)
            meta["contaminated"] = found[0].eval_file
            meta["contamination"] = [{"eval": c.item, "ngram": c.ngram} for c in found]
            for c in found:
                led.decontam(doc_id, c.eval_file, {"eval": c.item, "ngram": c.ngram, "ngrams": c.ngrams}, "flagged")
        return True
    text, records = dc.remove(res.text)
    if not records:
        return True
    if not text.strip():
        for r in records:
            led.decontam(doc_id, r["eval"].rsplit(":", 1)[0], r, "document_dropped")
        led.drop_doc("decontam", records[0]["eval"].rsplit(":", 1)[0], doc_id, res.text)
        return False
    for r in records:
        led.decontam(doc_id, r["eval"].rsplit(":", 1)[0], r, "removed")
    res.text = text
    meta["decontaminated"] = [{k: r[k] for k in ("eval", "ngram", "chars_removed")} for r in records]
    return True


def clean_task(task: dict) -> dict:
    """Clean one shard: write ``stage1/<name>.jsonl``; return its ledger as a dict."""
    spec, s, shard = SourceSpec(**task["spec"]), CleanSettings(**task["settings"]), task["shard"]
    out = Path(task["out"])
    ctx = _context(task, spec, s)
    rejects = open_rejects(out / "rejects" / f"{shard['name']}.jsonl.tmp") if s.keep_rejects else None
    led = Ledger(rejects=rejects)
    path = out / "stage1" / f"{shard['name']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in shard_documents(spec, shard, s.on_error, led, s.max_doc_bytes):
            led.read += 1
            led.bytes_read += _text_bytes(doc)  # text bytes: compressed inputs compare fairly
            res = _clean_one(spec.kind, doc, shard["index"], ctx)
            for reason, lines in res.dropped_lines.items():
                led.drop_lines("clean", reason, doc.id, lines)
            if not res.kept:
                led.drop_doc("clean", res.reason or "unknown", doc.id, doc.text)
                continue
            meta = dict(res.meta)
            if "decontam" in ctx and not _decontaminate(ctx["decontam"], s.decontam, doc.id, res, meta, led):
                continue
            led.kept += 1
            led.bytes_kept += len(res.text.encode("utf-8"))
            row = {"id": doc.id, "text": res.text, "source": doc.source, "provenance": doc.provenance}
            if meta:
                row["meta"] = meta
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    if rejects is not None:
        rejects.close()
        (out / "rejects" / f"{shard['name']}.jsonl.tmp").replace(out / "rejects" / f"{shard['name']}.jsonl")
    return {"ledger": led.to_dict(), "file": str(path)}


# ----------------------------------------------------------------------------- corpus dedup


def corpus_dedup(sources: list[SourceSpec], shards: list[dict], s: CleanSettings, out: Path) -> dict:
    """Exact (all sources) then near-dup (per source) over stage1 shards, in shard order."""
    done = marker_path(out / "dedup", "all")
    if done.exists():
        return read_json(done, what="done marker")["result"]
    led = Ledger()
    rejects = open_rejects(out / "rejects" / "dedup.jsonl") if s.keep_rejects else None
    led.rejects = rejects
    exact = ExactDedup()
    near: dict[str, NearDupIndex] = {}
    kinds = {sp.name: sp for sp in sources}
    for sh in shards:
        spec = kinds[sh["source"]]
        dst = out / DOCS / sh["source"] / f"{sh['name']}.jsonl"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        with (open(out / "stage1" / f"{sh['name']}.jsonl", encoding="utf-8") as src,
              open(tmp, "w", encoding="utf-8") as f):
            for line in src:
                row = json.loads(line)
                led.read += 1
                if s.exact_dedup and exact.check_and_add(row["id"], row["text"]):
                    led.drop_doc("dedup", "exact", row["id"], row["text"])
                    continue
                thr = spec.near_dup_threshold or (0.9 if spec.kind == "books" else s.near_dup_threshold)
                if s.near_dup and spec.kind != "code":
                    if spec.name not in near:  # NOTE: not setdefault: building an LSH index costs ~30 ms
                        near[spec.name] = NearDupIndex(threshold=thr)
                    idx = near[spec.name]
                    if idx.check_and_add(row["id"], row["text"]):
                        led.drop_doc("dedup", "near_duplicate", row["id"], row["text"])
                        continue
                led.kept += 1
                led.bytes_kept += len(row["text"].encode("utf-8"))
                f.write(line)
        tmp.replace(dst)
    if rejects is not None:
        rejects.close()
    led.rejects = None
    result = {"ledger": led.to_dict()}
    write_json_atomic(done, {"task": "all", "result": result})
    return result


# ----------------------------------------------------------------------------- driver


def run_clean(sources: list[SourceSpec], s: CleanSettings, out: str | Path, executor: str = "local",
              workers: int = 1) -> Ledger:
    """All stages; returns the merged ledger (also written to ``<out>/stats.json``, :data:`STATS`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        t = now

    for i, sp in enumerate(sources):
        sp.validate(f"sources[{i}]")
    if len({sp.name for sp in sources}) != len(sources):
        raise LlamalabError("sources: every source needs a distinct name")
    if s.decontam not in ("remove", "drop", "flag", "off"):
        raise LlamalabError(f"decontam must be remove, drop, flag or off, got {s.decontam!r}")
    plan_file = out / PLAN
    fingerprint = {"sources": [asdict(sp) for sp in sources],
                   "settings": {k: v for k, v in asdict(s).items() if k != "keep_rejects"}}
    if plan_file.exists():
        plan = read_json(plan_file, what="shard plan")
        # a setting added after the run began (absent from its plan) matches while it keeps its default
        old = dict(plan.get("settings") or {})
        for k, v in asdict(CleanSettings()).items():
            if k not in old and fingerprint["settings"].get(k) == v:
                old[k] = v
        if {**{k: plan.get(k) for k in fingerprint}, "settings": old} != fingerprint:
            # NOTE: resuming with other settings would mix two runs' shards in one output
            raise LlamalabError(f"{out}: holds a run with different sources or settings (see {plan_file}); "
                                f"use another --output, or delete the folder to start over")
        shards = plan["shards"]
    else:
        shards = plan_shards(sources, s)
        write_json_atomic(plan_file, {**fingerprint, "shards": shards})
    lap("plan")
    by_name = {sp.name: sp for sp in sources}
    webs = [sh for sh in shards if by_name[sh["source"]].kind == "web"]
    models = fit_models(sources, shards, s, out) if webs and s.reference else None
    lap("models")
    if webs and s.line_dedup and not (out / "models" / "first_seen.npz").exists():
        tasks = [{"name": sh["name"], "index": sh["index"], "shard": sh, "out": str(out),
                  "spec": asdict(by_name[sh["source"]]), "max_doc_bytes": s.max_doc_bytes} for sh in webs]
        res = run_tasks(hashes_task, tasks, out / "hashes", executor, workers, "clean: line hashes")
        first = first_seen([np.load(r["file"]).tolist() for r in res])
        # NOTE: first_seen is keyed by position in the web-shard list, which preserves corpus order
        order = {i: sh["index"] for i, sh in enumerate(webs)}
        (out / "models").mkdir(parents=True, exist_ok=True)
        np.savez(out / "models" / "first_seen.npz", hashes=np.array(list(first), dtype=np.uint64),
                 shards=np.array([order[v] for v in first.values()], dtype=np.int64))
    lap("line_hashes")
    tasks = [{"name": sh["name"], "index": sh["index"], "shard": sh, "out": str(out), "models": models,
              "spec": asdict(by_name[sh["source"]]), "settings": asdict(s)} for sh in shards]
    results = run_tasks(clean_task, tasks, out / "stage1", executor, workers, "clean: shards", _rate())
    ledger = Ledger()
    for r in results:
        ledger.merge(Ledger.from_dict(r["ledger"]))
    ledger.check()
    lap("clean")
    dd = Ledger.from_dict(corpus_dedup(sources, shards, s, out)["ledger"])
    # the dedup pass re-reads what clean kept: fold it in as further drops of the same documents
    ledger.docs.update(dd.docs)
    ledger.kept -= dd.dropped
    ledger.bytes_kept = dd.bytes_kept
    for k, v in dd.examples.items():
        ledger.examples.setdefault(k, v)
    ledger.check()
    lap("dedup")
    ledger.save(out / STATS)
    write_json_atomic(out / "timings.json", timings)  # NOTE: kept out of stats.json, which must not vary
    return ledger


def _rate():
    """Progress text: documents and MB cleaned so far, and their rates (this run's shards)."""
    t0, n, mb = time.perf_counter(), 0, 0.0

    def describe(result: dict) -> str:
        nonlocal n, mb
        n += result["ledger"]["read"]
        mb += result["ledger"]["bytes_read"] / 1e6
        dt = max(time.perf_counter() - t0, 1e-9)
        return f"| {n:,} docs {n / dt:,.0f} docs/s {mb / dt:.2f} MB/s"

    return describe


def load_clean_config(path: str | Path) -> tuple[list[SourceSpec], dict]:
    """A clean config file: ``{"sources": [...], <setting>: value, ...}``.

    Returns the sources, their relative inputs made relative to the file's folder, and the other
    keys as a dict of settings (checked by the caller against the settings it knows).
    """
    data = read_json(path, what="clean config")
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        raise LlamalabError(f"{path}: expected an object with a 'sources' list")
    base = Path(path).parent
    sources = load_sources(data["sources"], str(path))
    for sp in sources:
        sp.inputs = [str(p if Path(p).is_absolute() else base / p) for p in sp.inputs]
    return sources, {k: v for k, v in data.items() if k != "sources"}


def fill_defaults(target: object, values: dict, defaults: object, where: str) -> None:
    """Set each of ``values`` on ``target`` where ``target`` still holds the default.

    A value already changed (a flag given on the command line) wins over the file's; a key
    ``target`` has no field for is an error naming ``where``.
    """
    for k, v in values.items():
        if not hasattr(target, k):
            raise LlamalabError(f"{where}: unknown setting {k!r}")
        if getattr(target, k) == getattr(defaults, k):
            setattr(target, k, v)


def load_sources(obj: list[dict], where: str) -> list[SourceSpec]:
    out = []
    for i, d in enumerate(obj):
        if not isinstance(d, dict) or "name" not in d or "kind" not in d or "inputs" not in d:
            raise LlamalabError(f"{where}: sources[{i}] needs 'name', 'kind' and 'inputs'")
        try:
            out.append(SourceSpec(**d))
        except TypeError as e:
            raise LlamalabError(f"{where}: sources[{i}]: {e}") from None
    return out


def print_summary(ledger: Ledger, seconds: float, out: Path) -> None:
    print0(ledger.summary_table())
    if ledger.decontam_total:
        print0(f"decontam: {ledger.decontam_total:,} contaminated stretch(es) ('decontaminated' in {out / STATS}):")
        for r in ledger.decontaminated[:3]:
            size = f", {r['chars_removed']:,} chars" if "chars_removed" in r else ""
            print0(f"  {r['id']}: {r['action'].replace('_', ' ')}{size}; eval item {r['eval']}, n-gram "
                   f"\"{r['ngram']}\"")
    mb = ledger.bytes_read / 1e6
    print0(f"clean: read {ledger.read:,} documents ({mb:.2f} MB) -> kept {ledger.kept:,} "
           f"({ledger.bytes_kept / 1e6:.2f} MB), dropped {ledger.dropped:,}, "
           f"lines dropped {sum(ledger.lines.values()):,} in {seconds:.1f} s "
           f"({ledger.read / max(seconds, 1e-9):,.0f} docs/s, {mb / max(seconds, 1e-9):.2f} MB/s) | "
           f"output {out / DOCS}, stats {out / STATS}")
