"""The ledger: every document or line a stage drops is counted, by stage and reason.

Trade-offs: counts are exact and cheap (a ``Counter`` keyed by ``(stage, reason)``); examples are
a bounded sample (the first ``max_examples`` per key, each cut to ``example_chars``) so the stats
file stays small on a large corpus. Rejected documents themselves go to an optional JSONL file
(``--keep-rejects``) because they can be as large as the kept output.

Ledgers are built per shard (in worker processes) and merged in shard order, so the merged
ledger, and its examples, are the same whichever executor ran the shards.

Invariant checked by :meth:`Ledger.check`: ``documents read == kept + dropped`` (lines are
counted separately: a line drop shortens a document, it does not remove it).

Decontamination that cuts a stretch out of a document (``decontam="remove"``) counts the stretch's
lines under ``("decontam", <eval file>)`` and keeps a record of it in ``decontaminated`` (the
first ``max_records``): the document id, the eval item (``file:line``), the first n-gram that
matched, how many n-grams did, and how many characters were removed.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from llamalab.common import LlamalabError, read_json, write_json_atomic

LEDGER_VERSION = 1


@dataclass
class Ledger:
    read: int = 0
    kept: int = 0
    docs: Counter = field(default_factory=Counter)  # (stage, reason) -> dropped documents
    lines: Counter = field(default_factory=Counter)  # (stage, reason) -> dropped lines
    flagged: Counter = field(default_factory=Counter)  # (stage, reason) -> kept but flagged
    examples: dict = field(default_factory=dict)  # "stage/reason" -> [{"id", "text"}]
    bytes_read: int = 0
    bytes_kept: int = 0
    max_examples: int = 3
    example_chars: int = 200
    rejects: IO | None = field(default=None, repr=False)
    decontaminated: list = field(default_factory=list)  # one record per removed stretch (first max_records)
    decontam_total: int = 0  # stretches removed or found, all of them
    max_records: int = 1000

    def _example(self, stage: str, reason: str, doc_id: str, text: str) -> None:
        ex = self.examples.setdefault(f"{stage}/{reason}", [])
        if len(ex) < self.max_examples:
            ex.append({"id": doc_id, "text": text[: self.example_chars]})

    def drop_doc(self, stage: str, reason: str, doc_id: str, text: str) -> None:
        self.docs[(stage, reason)] += 1
        self._example(stage, reason, doc_id, text)
        if self.rejects is not None:
            self.rejects.write(json.dumps({"id": doc_id, "stage": stage, "reason": reason, "text": text},
                                          ensure_ascii=False) + "\n")

    def drop_lines(self, stage: str, reason: str, doc_id: str, lines: list[str]) -> None:
        if not lines:
            return
        self.lines[(stage, reason)] += len(lines)
        self._example(stage, reason, doc_id, "\n".join(lines))
        if self.rejects is not None:
            self.rejects.write(json.dumps({"id": doc_id, "stage": stage, "reason": reason, "lines": lines},
                                          ensure_ascii=False) + "\n")

    def decontam(self, doc_id: str, reason: str, record: dict, action: str) -> None:
        """A contaminated stretch of a document: ``action`` is ``removed`` (its lines are counted as
        dropped), ``flagged``, or ``document_dropped`` (the caller counts the document)."""
        text = record.get("text", "")
        if action == "removed":
            lines = [ln for ln in text.splitlines() if ln.strip()] or [text]
            self.lines[("decontam", reason)] += len(lines)
            self._example("decontam", reason, doc_id, text)
        self.decontam_total += 1
        row = {"id": doc_id, "action": action, **{k: v for k, v in record.items() if k != "text"}}
        if len(self.decontaminated) < self.max_records:
            self.decontaminated.append(row)
        if self.rejects is not None and action == "removed":
            self.rejects.write(json.dumps({"id": doc_id, "stage": "decontam", "reason": reason,
                                           **{k: v for k, v in row.items() if k != "id"}, "text": text},
                                          ensure_ascii=False) + "\n")

    def flag(self, stage: str, reason: str, doc_id: str, text: str) -> None:
        self.flagged[(stage, reason)] += 1
        self._example(stage, "flag:" + reason, doc_id, text)

    @property
    def dropped(self) -> int:
        return sum(self.docs.values())

    def check(self) -> None:
        """Raise if a document went missing without a count."""
        if self.read != self.kept + self.dropped:
            raise LlamalabError(f"ledger does not add up: read {self.read} != kept {self.kept} + "
                                f"dropped {self.dropped}")

    def merge(self, other: Ledger) -> Ledger:
        self.read += other.read
        self.kept += other.kept
        self.bytes_read += other.bytes_read
        self.bytes_kept += other.bytes_kept
        self.docs.update(other.docs)
        self.lines.update(other.lines)
        self.flagged.update(other.flagged)
        for k, v in other.examples.items():
            mine = self.examples.setdefault(k, [])
            mine.extend(v[: max(0, self.max_examples - len(mine))])
        self.decontam_total += other.decontam_total
        self.decontaminated.extend(other.decontaminated[: max(0, self.max_records - len(self.decontaminated))])
        return self

    def to_dict(self) -> dict:
        def rows(c: Counter) -> list[dict]:
            return [{"stage": s, "reason": r, "count": n} for (s, r), n in sorted(c.items())]

        out = {"version": LEDGER_VERSION, "read": self.read, "kept": self.kept, "dropped": self.dropped,
               "bytes_read": self.bytes_read, "bytes_kept": self.bytes_kept,
               "documents_dropped": rows(self.docs), "lines_dropped": rows(self.lines),
               "flagged": rows(self.flagged), "examples": self.examples}
        if self.decontam_total:  # NOTE: only when there is one, so a clean corpus' ledger is unchanged
            out["decontaminated"] = {"total": self.decontam_total, "records": self.decontaminated}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        dec = d.get("decontaminated") or {}
        led = cls(read=d["read"], kept=d["kept"], bytes_read=d.get("bytes_read", 0),
                  bytes_kept=d.get("bytes_kept", 0), examples=d.get("examples", {}),
                  decontaminated=list(dec.get("records", [])), decontam_total=dec.get("total", 0))
        for key, attr in (("documents_dropped", "docs"), ("lines_dropped", "lines"), ("flagged", "flagged")):
            for row in d.get(key, []):
                getattr(led, attr)[(row["stage"], row["reason"])] = row["count"]
        return led

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        d = read_json(Path(path), what="ledger")
        if "read" not in d or "kept" not in d:
            raise LlamalabError(f"{path}: not a llamalab ledger (no 'read'/'kept' fields)")
        return cls.from_dict(d)

    def summary_table(self) -> str:
        """A plain-text table: one row per (stage, reason), documents and lines, % of read."""
        lines = [f"{'stage':<14} {'reason':<28} {'docs':>9} {'lines':>9} {'% docs':>7}"]
        keys = sorted(set(self.docs) | set(self.lines) | set(self.flagged))
        for k in keys:
            pct = 100.0 * self.docs.get(k, 0) / max(1, self.read)
            reason = k[1] + (" (flagged)" if k in self.flagged else "")
            n_docs = self.docs.get(k, 0) or self.flagged.get(k, 0)
            lines.append(f"{k[0]:<14} {reason:<28} {n_docs:>9,} {self.lines.get(k, 0):>9,} {pct:>6.2f}%")
        lines.append(f"{'total':<14} {'read ' + format(self.read, ',') + ' / kept ' + format(self.kept, ','):<28} "
                     f"{self.dropped:>9,} {sum(self.lines.values()):>9,} "
                     f"{100.0 * self.dropped / max(1, self.read):>6.2f}%")
        return "\n".join(lines)


def open_rejects(path: str | Path) -> IO:
    """A text stream for rejected documents (gzip when the name ends in .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")
