"""Mixtures: per-source weights and epochs -> one deterministic, seeded document stream.

Semantics (the LLaMA table's): ``weight`` is a source's share of the *stream* and ``epochs`` the
most passes over that source we accept. The stream's size is the largest total for which no
source needs more than its epochs: ``total = min_i(size_i * epochs_i / weight_i)``; source i then
contributes ``weight_i * total`` bytes, i.e. ``weight_i * total / size_i`` passes (<= epochs_i).
The source reaching the minimum *bounds* the stream (``bound_by``): a small source with a large
weight makes the whole mixture small.

``size_by="largest"`` is the other choice: the stream is sized so that the source with the most
data for its weight is read once (``total = max_i(size_i / weight_i)``), and the others repeat up
to their epochs (``max_epochs`` replaces every source's cap when given); a source that would need
more passes than its cap gets its cap and falls short of its weight. Weights are then a target,
and the record says what the plan achieves (``share``) next to what was asked (``weight``).
Whole passes take every document once in a seeded order; a fractional pass takes a seeded prefix
of a fresh order (a document is taken while at least half of it fits in the byte budget, so a
source of a few huge documents, one book, lands as close to its share as whole documents allow).
Sources are interleaved so that *every prefix* of the stream keeps the weights
(next document from the source furthest behind its target), not just the total.

Trade-offs and traps:
- NOTE: proportions are measured in UTF-8 bytes of text, not tokens: the mixture is planned
  before tokenization. Bytes per token differ by source (code and LaTeX tokenize worse than
  prose), so token shares drift a little; the manifest records both planned bytes and the
  tokens each source actually got.
- A repeated document keeps its id in every epoch, so the shard writer's id-hash validation split
  puts all its copies on the same side (no train/val leak through repetition).
- Sources named in the weights but absent from the data are an error unless ``allow_missing``,
  in which case the remaining weights are renormalised and the manifest says so.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llamalab.common import LlamalabError, Progress, print0, write_json_atomic
from llamalab.data.clean.pipeline import DOCS, PLAN
from llamalab.data.readers import Document, ReadStats, expand_paths, read_documents

if TYPE_CHECKING:
    from llamalab.data.shards import ShardWriterConfig
    from llamalab.tokenizer import Tokenizer

MIXED = "mixed.jsonl"  # the stream, without a tokenizer
RECORD = "mixture.json"  # its mixture record (with a tokenizer the record goes into the manifest)


@dataclass
class SourceWeight:
    weight: float
    epochs: float = 1.0


def llama_preset() -> dict[str, SourceWeight]:
    """Table 1 of the LLaMA paper (Touvron et al. 2023): sampling proportion and epochs (1.4T tokens)."""
    return {
        "commoncrawl": SourceWeight(0.670, 1.10),
        "c4": SourceWeight(0.150, 1.06),
        "github": SourceWeight(0.045, 0.64),
        "wikipedia": SourceWeight(0.045, 2.45),
        "books": SourceWeight(0.045, 2.23),
        "arxiv": SourceWeight(0.025, 1.06),
        "stackexchange": SourceWeight(0.020, 1.03),
    }


PRESETS = {"llama": llama_preset}


SIZE_BY = ("smallest", "largest")


@dataclass
class MixPlan:
    total_bytes: float
    sources: dict[str, dict] = field(default_factory=dict)  # name -> weight, epochs, size, planned bytes, passes
    missing: list[str] = field(default_factory=list)
    size_by: str = "smallest"
    bound_by: str = ""  # the source that sets the stream's size

    def to_dict(self) -> dict:
        return {"total_bytes": round(self.total_bytes), "sources": self.sources, "missing": self.missing,
                "size_by": self.size_by, "bound_by": self.bound_by}

    def bound_line(self) -> str:
        """One sentence: which source sets the stream's size, and why."""
        b = self.sources[self.bound_by]
        if self.size_by == "largest":
            return (f"mix: sized by the largest source for its weight, {self.bound_by} ({b['size_bytes'] / 1e6:.2f} MB "
                    f"at weight {b['weight']:.3f}, {b['passes']:.2f} passes): {self.total_bytes / 1e6:.2f} MB planned")
        return (f"mix: the stream is bounded by {self.bound_by}: {b['size_bytes'] / 1e6:.2f} MB x {b['max_epochs']:g} "
                f"epochs / weight {b['weight']:.3f} = {self.total_bytes / 1e6:.2f} MB; more data for {self.bound_by} "
                f"(or more epochs, or --size-by largest) makes a larger mixture")


def plan_mixture(sizes: dict[str, int], weights: dict[str, SourceWeight], allow_missing: bool = False,
                 size_by: str = "smallest", max_epochs: float = 0.0, smallest: dict[str, int] | None = None) -> MixPlan:
    """Bytes per source and passes, from the sources' sizes (bytes) and the weights/epochs.

    ``size_by``: ``smallest`` (every source keeps its weight; the first to reach its epochs bounds
    the stream) or ``largest`` (the largest source for its weight is read once, smaller ones repeat
    up to their cap and may fall short). ``max_epochs`` > 0 is every source's cap instead of its own.
    ``smallest`` (bytes of each source's smallest document) is recorded to explain shortfalls."""
    if size_by not in SIZE_BY:
        raise LlamalabError(f"mixture: size_by must be one of {', '.join(SIZE_BY)}, got {size_by!r}")
    if max_epochs < 0:
        raise LlamalabError(f"mixture: max_epochs must be > 0 (or 0: each source's own epochs), got {max_epochs}")
    missing = sorted(n for n in weights if not sizes.get(n))
    if missing and not allow_missing:
        raise LlamalabError(f"mixture: no data for source(s) {', '.join(missing)} "
                            f"(have: {', '.join(sorted(sizes)) or 'none'}); "
                            f"rename sources, drop them from the weights, or allow missing sources")
    extra = sorted(set(sizes) - set(weights))
    if extra:
        raise LlamalabError(f"mixture: source(s) {', '.join(extra)} have data but no weight")
    present = {n: w for n, w in weights.items() if n not in missing}
    if not present:
        raise LlamalabError("mixture: no source with both data and a weight")
    for n, w in present.items():
        if w.weight <= 0 or w.epochs <= 0:
            raise LlamalabError(f"mixture: source {n!r} needs weight > 0 and epochs > 0 (got {w.weight}, {w.epochs})")
    norm = sum(w.weight for w in present.values())
    share = {n: w.weight / norm for n, w in present.items()}
    cap = {n: max_epochs or w.epochs for n, w in present.items()}
    if size_by == "smallest":
        room = {n: sizes[n] * cap[n] / share[n] for n in present}
        bound = min(room, key=lambda n: (room[n], n))
    else:
        room = {n: sizes[n] / share[n] for n in present}
        bound = max(room, key=lambda n: (room[n], n))
    target = room[bound]
    planned = {n: min(share[n] * target, cap[n] * sizes[n]) for n in present}
    total = sum(planned.values())
    plan = MixPlan(total, missing=missing, size_by=size_by, bound_by=bound)
    for n in present:
        plan.sources[n] = {"weight": round(share[n], 6), "max_epochs": cap[n], "size_bytes": sizes[n],
                           "planned_bytes": round(planned[n]), "passes": round(planned[n] / sizes[n], 4),
                           "share": round(planned[n] / total, 6)}
        if smallest and n in smallest:
            plan.sources[n]["smallest_doc_bytes"] = smallest[n]
    return plan


def _source_order(docs: list[Document], passes: float, seed: int, name: str) -> Iterator[tuple[Document, int]]:
    """(document, epoch) for ``passes`` passes: whole passes, then a byte-budgeted seeded prefix."""
    size = sum(len(d.text.encode("utf-8")) for d in docs)
    budget = passes * size
    epoch = 0
    while budget > 0:
        order = list(range(len(docs)))
        random.Random(f"{seed}/{name}/{epoch}").shuffle(order)
        for i in order:
            n = len(docs[i].text.encode("utf-8"))
            if budget < n / 2:  # take a document when at least half of it fits: nearest to the target
                return
            yield docs[i], epoch
            budget -= n
        epoch += 1


def mixture_stream(docs_by_source: dict[str, list[Document]], plan: MixPlan, seed: int = 0) -> Iterator[Document]:
    """Interleave the sources: next document from the source with the lowest emitted/planned ratio."""
    iters = {n: _source_order(docs_by_source[n], s["passes"], seed, n) for n, s in plan.sources.items()}
    emitted = {n: 0 for n in iters}
    heap = [(0.0, n) for n in sorted(iters)]
    while heap:
        _, n = heapq.heappop(heap)
        item = next(iters[n], None)
        if item is None:
            continue
        doc, epoch = item
        emitted[n] += len(doc.text.encode("utf-8"))
        heapq.heappush(heap, (emitted[n] / plan.sources[n]["planned_bytes"], n))
        yield Document(doc.id, doc.text, n, doc.provenance, {**doc.meta, "epoch": epoch})


def load_clean_output(paths: list[str], on_error: str = "raise") -> dict[str, list[Document]]:
    """Documents by source from ``clean`` outputs: a ``docs/`` folder (one subfolder per source),
    the clean output folder holding it, or JSONL files (source = their folder's name)."""
    out: dict[str, list[Document]] = {}
    for p in paths:
        p = Path(p)
        if (p / DOCS).is_dir():
            p = p / DOCS
        elif (p / PLAN).exists():
            raise LlamalabError(f"{p}: a clean output folder without docs/: the clean run did not finish "
                                f"(run the same 'llamalab data clean' command again to resume it)")
        stats = ReadStats()
        for d in read_documents(expand_paths([p]), on_error=on_error, stats=stats):
            m = d.meta
            src = m["source"] if isinstance(m.get("source"), str) else d.source
            doc_id = m["id"] if isinstance(m.get("id"), str) else d.id
            prov = m["provenance"] if isinstance(m.get("provenance"), str) else d.provenance
            out.setdefault(src, []).append(Document(doc_id, d.text, src, prov, {}))
    for docs in out.values():
        docs.sort(key=lambda d: (d.provenance, d.id))  # NOTE: independent of file listing order
    return out


def parse_weights(obj: dict, where: str) -> dict[str, SourceWeight]:
    """``{"name": weight}`` or ``{"name": {"weight": w, "epochs": e}}``."""
    out = {}
    for name, v in obj.items():
        if isinstance(v, (int, float)):
            out[name] = SourceWeight(float(v))
        elif isinstance(v, dict) and "weight" in v:
            out[name] = SourceWeight(float(v["weight"]), float(v.get("epochs", 1.0)))
        else:
            raise LlamalabError(f"{where}: weight of {name!r} must be a number or {{'weight', 'epochs'}}, "
                                f"got {json.dumps(v)}")
    return out


def resolve_weights(preset: str, weights: dict) -> dict[str, SourceWeight]:
    """The weights of a named preset (``llama``) or of a ``--weights`` object; exactly one of them."""
    if preset and weights:
        raise LlamalabError("mix: give --preset or --weights, not both")
    if preset:
        return PRESETS[preset]()
    if not weights:
        raise LlamalabError("mix: give --preset llama or --weights '{\"source\": weight, ...}'")
    return parse_weights(weights, "--weights")


def rename_sources(by_source: dict[str, list[Document]], rename: dict[str, str]) -> dict[str, list[Document]]:
    """Rename sources (data name -> weights name), in place; every old name must be in the data."""
    for old, new in rename.items():
        if old not in by_source:
            raise LlamalabError(f"--rename: no source {old!r} in the data (have {', '.join(sorted(by_source))})")
        by_source[new] = [Document(d.id, d.text, new, d.provenance, d.meta) for d in by_source.pop(old)]
    return by_source


def source_sizes(by_source: dict[str, list[Document]]) -> dict[str, int]:
    """UTF-8 bytes of text per source: what the plan's shares are measured in."""
    return {n: sum(len(d.text.encode("utf-8")) for d in docs) for n, docs in by_source.items()}


def smallest_documents(by_source: dict[str, list[Document]]) -> dict[str, int]:
    """UTF-8 bytes of each source's smallest document (a source whose budget is under half of it gets nothing)."""
    return {n: min(len(d.text.encode("utf-8")) for d in docs) for n, docs in by_source.items() if docs}


@dataclass
class MixTally:
    """What a stream actually delivered: documents, and UTF-8 bytes per source."""

    documents: int = 0
    bytes: Counter = field(default_factory=Counter)

    def count(self, docs: Iterable[Document]) -> Iterator[Document]:
        for d in docs:
            self.bytes[d.source] += len(d.text.encode("utf-8"))
            self.documents += 1
            yield d


def write_mixture(stream: Iterable[Document], out: Path, record: dict, tokenizer: Tokenizer | None = None,
                  shard_cfg: ShardWriterConfig | None = None) -> tuple[Path, MixTally]:
    """Write the stream: token shards (the record goes into their manifest as ``mixture``) with a
    tokenizer, else ``mixed.jsonl`` plus ``mixture.json``. Adds ``actual_bytes`` and ``warnings``
    (sources under half their weight, see :func:`shortfalls`) to ``record``;
    returns the file holding the record and the tally."""
    out.mkdir(parents=True, exist_ok=True)
    tally = MixTally()
    if tokenizer is not None:
        from llamalab.data.shards import MANIFEST, write_shards

        manifest = write_shards(list(tally.count(stream)), tokenizer, out, shard_cfg)
        record["actual_bytes"] = dict(tally.bytes)
        record["warnings"] = shortfalls(record, tally.bytes)
        manifest["mixture"] = record
        write_json_atomic(out / MANIFEST, manifest)
        return out / MANIFEST, tally
    bar = Progress(None, "mix: writing", unit="docs")
    tmp = out / (MIXED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in tally.count(stream):
            f.write(json.dumps({"id": d.id, "text": d.text, "source": d.source, "provenance": d.provenance,
                                "epoch": d.meta["epoch"]}, ensure_ascii=False) + "\n")
            bar.update(1)
    bar.close()
    tmp.replace(out / MIXED)
    record["actual_bytes"] = dict(tally.bytes)
    record["warnings"] = shortfalls(record, tally.bytes)
    write_json_atomic(out / RECORD, record)
    return out / RECORD, tally


def shortfalls(record: dict, actual: dict[str, int]) -> list[str]:
    """A warning per source of a mixture record whose actual share (``actual``: bytes per source)
    is under half its weight, with the reason when the plan knows it."""
    total = sum(actual.values())
    out = []
    for n, s in record["sources"].items():
        got = actual.get(n, 0) / max(total, 1)
        if got >= 0.5 * s["weight"]:
            continue
        why = ""
        if s["share"] < 0.5 * s["weight"]:
            why = f": its {s['size_bytes'] / 1e6:.2f} MB may be read only {s['max_epochs']:g} times"
        elif s.get("smallest_doc_bytes", 0) > s["planned_bytes"] / 2:
            why = (f": its smallest document ({s['smallest_doc_bytes'] / 1e6:.3f} MB) is over twice its "
                   f"budget ({s['planned_bytes'] / 1e6:.3f} MB)")
        else:
            why = (f": its budget ({s['planned_bytes'] / 1e6:.3f} MB) is small next to its documents (one is "
                   f"taken when at least half of it fits)")
        hint = ("raise --max-epochs" if record.get("size_by") == "largest"
                else "try --size-by largest --max-epochs 4 (the largest source read once, small ones repeated)")
        out.append(f"mix: warning: {n} got {got:.3f} of the stream, planned {s['weight']:.3f}{why}; {hint}")
    return out


def print_mixture(plan: MixPlan, tally: MixTally, seconds: float, where: Path, warnings: list[str]) -> None:
    """Asked-for weight, planned and actual share per source, which source sets the size, the
    warnings (sources under half their weight), then one summary line."""
    total = sum(tally.bytes.values())
    print0(f"{'source':<16} {'weight':>7} {'planned':>7} {'actual':>7} {'passes':>7} {'cap':>5} {'MB':>9}")
    for n, s in plan.sources.items():
        print0(f"{n:<16} {s['weight']:>7.3f} {s['share']:>7.3f} {tally.bytes[n] / max(total, 1):>7.3f} "
               f"{s['passes']:>7.2f} {s['max_epochs']:>5.2f} {tally.bytes[n] / 1e6:>9.2f}")
    print0(plan.bound_line())
    for w in warnings:
        print0(w)
    print0(f"mix: {tally.documents:,} documents, {total / 1e6:.2f} MB from {len(plan.sources)} sources in "
           f"{seconds:.1f} s ({total / 1e6 / max(seconds, 1e-9):.2f} MB/s) -> {where}")
