"""Per-source cleaners: one module per kind of source (web, code, wiki, books, arxiv, stackexchange).

Each cleaner is a pure function ``text -> CleanResult`` you can call alone (no files, no global
state); corpus-level state (line hashes seen in other shards, models trained on a reference
corpus, the MinHash index) is passed in by the caller. A result says either "drop, for this
reason" or "keep this (possibly shortened) text", plus the lines it removed by reason, so the
ledger can count everything.

:mod:`llamalab.data.clean.pipeline` runs these cleaners over a whole corpus (sharding, models,
decontamination, corpus-level dedup, the ledger): the library behind ``llamalab data clean``. It is
not imported here, so a single cleaner stays cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CleanResult:
    text: str | None  # None: the document is dropped
    reason: str | None = None  # why it was dropped
    dropped_lines: dict[str, list[str]] = field(default_factory=dict)  # reason -> removed lines
    meta: dict = field(default_factory=dict)  # scores worth keeping (language, perplexity, bucket...)

    @property
    def kept(self) -> bool:
        return self.text is not None

    def add_lines(self, reason: str, lines: list[str]) -> None:
        if lines:
            self.dropped_lines.setdefault(reason, []).extend(lines)


def drop(reason: str, result: CleanResult | None = None) -> CleanResult:
    r = result or CleanResult(None)
    r.text, r.reason = None, reason
    return r
