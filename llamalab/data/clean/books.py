"""Books (Gutenberg, Books3-like): strip the Project Gutenberg licence header/footer, and remove
book-level near-duplicates (MinHash, default > 90% estimated Jaccard, as LLaMA did).

Near-dup is corpus state, so it lives in :class:`BookDeduper` (a thin wrapper over
``dedup.NearDupIndex``); ``clean_book`` itself is pure.
"""

from __future__ import annotations

import re

from llamalab.data.clean import CleanResult, drop
from llamalab.data.dedup import NearDupIndex
from llamalab.data.filters import count_words

_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> tuple[str, list[str]]:
    """(body between the START and END markers, removed lines). Unchanged if there are none."""
    start, end = _START.search(text), _END.search(text)
    if not start and not end:
        return text, []
    a = start.end() if start else 0
    b = end.start() if end else len(text)
    removed = [ln for ln in (text[:a] + "\n" + text[b:]).splitlines() if ln.strip()]
    return text[a:b].strip("\n\r "), removed


def clean_book(text: str, min_words: int = 1000) -> CleanResult:
    body, removed = strip_gutenberg(text.lstrip("\ufeff"))
    res = CleanResult(body)
    res.add_lines("books:gutenberg_boilerplate", removed)
    if count_words(body, min_words) < min_words:
        return drop("books:too_short", res)
    return res


class BookDeduper:
    """``check_and_add(id, text)`` -> (id of the kept near-duplicate, similarity) or None."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 128) -> None:
        self.index = NearDupIndex(threshold=threshold, num_perm=num_perm, k=5)

    def check_and_add(self, doc_id: str, text: str) -> tuple[str, float] | None:
        return self.index.check_and_add(doc_id, text)
