"""Deduplication: normalised-line hashes (CCNet), exact document hashes, MinHash LSH near-duplicates
(``datasketch``), and decontamination against evaluation sets by long n-gram overlap.

Trade-offs:
- Line dedup keeps the *first* occurrence of a normalised line in corpus order (shard index, then
  position) and drops the later ones. CCNet drops every line whose hash is in a shared set; keeping
  the first copy loses less text and, because "first" is defined by shard order and not by which
  worker finished first, the output is the same under any executor. It needs a first pass that
  collects every shard's hashes (``shard_line_hashes`` then ``first_seen``), held in memory:
  8 bytes per distinct line, fine for one machine's corpus, and the reason a cluster run would
  shard the hash table by hash prefix.
- Exact dedup hashes whitespace-normalised text (sha1); near-dup uses MinHash over word 5-gram
  shingles with an LSH index, and confirms a candidate by its estimated Jaccard so LSH's false
  positives do not drop distinct documents.
- Decontamination hashes word n-grams (13 by default, as GPT-3) of lower-cased, punctuation-free
  text. NOTE: an eval item shorter than ``n`` words has no n-gram and cannot be caught; lower
  ``n`` for short-question sets (at the price of more false positives on common phrases).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from llamalab.common import LlamalabError, iter_jsonl

_DIGITS = re.compile(r"\d")
_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalize_line(line: str) -> str:
    """CCNet's normalisation: lower case, accents stripped, digits -> 0, punctuation removed."""
    s = line.lower()
    if not s.isascii():  # NOTE: the per-character accent strip is the slow part; ASCII skips it
        s = unicodedata.normalize("NFD", s)
        s = "".join(c for c in s if unicodedata.category(c) != "Mn")
    s = _DIGITS.sub("0", s)
    s = _PUNCT.sub(" ", s)
    return _SPACES.sub(" ", s).strip()


def hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


def line_hashes(text: str) -> list[int]:
    """Hashes of the text's non-empty normalised lines, in order."""
    out = []
    for line in text.splitlines():
        n = normalize_line(line)
        if n:
            out.append(hash64(n))
    return out


def shard_line_hashes(texts: Iterable[str]) -> set[int]:
    out: set[int] = set()
    for t in texts:
        out.update(line_hashes(t))
    return out


def first_seen(per_shard: Sequence[Iterable[int]]) -> dict[int, int]:
    """hash -> index of the first shard (in shard order) where the normalised line occurs."""
    first: dict[int, int] = {}
    for i, hashes in enumerate(per_shard):
        for h in hashes:
            first.setdefault(h, i)
    return first


def dedup_lines(text: str, shard: int, first: dict[int, int], seen_here: set[int]) -> tuple[str, list[str]]:
    """Drop lines whose normalised hash first occurred in an earlier shard or earlier in this one.

    ``seen_here`` is the caller's running set for the current shard (updated in place).
    Returns (kept text, dropped lines). Blank lines are kept.
    """
    kept, dropped = [], []
    for line in text.splitlines():
        n = normalize_line(line)
        if not n:
            kept.append(line)
            continue
        h = hash64(n)
        if first.get(h, shard) < shard or h in seen_here:
            dropped.append(line)
        else:
            seen_here.add(h)
            kept.append(line)
    return "\n".join(kept).strip("\n"), dropped


# ----------------------------------------------------------------------------- exact and near-dup


def text_hash(text: str) -> str:
    return hashlib.sha1(_SPACES.sub(" ", text).strip().encode("utf-8")).hexdigest()


class ExactDedup:
    """Keeps the first document with a given whitespace-normalised text."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def check_and_add(self, doc_id: str, text: str) -> str | None:
        """The id of an earlier identical document, or None (and remember this one)."""
        h = text_hash(text)
        if h in self.seen:
            return self.seen[h]
        self.seen[h] = doc_id
        return None


def shingles(text: str, k: int = 5) -> set[bytes]:
    ws = normalize_line(text).split()
    if len(ws) < k:
        return {" ".join(ws).encode("utf-8")} if ws else set()
    return {" ".join(ws[i:i + k]).encode("utf-8") for i in range(len(ws) - k + 1)}


def minhash(text: str, num_perm: int = 128, k: int = 5, seed: int = 1):
    from datasketch import MinHash  # optional extra: llamalab[data]

    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(shingles(text, k)))
    return m


class NearDupIndex:
    """MinHash LSH over word shingles: ``check_and_add`` returns the key of a kept near-duplicate.

    A candidate from LSH counts only if its estimated Jaccard similarity is >= ``threshold``.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, k: int = 5) -> None:
        from datasketch import MinHashLSH  # optional extra: llamalab[data]

        if not 0.0 < threshold < 1.0:
            raise LlamalabError(f"near-dup threshold must be in (0, 1), got {threshold}")
        self.threshold, self.num_perm, self.k = threshold, num_perm, k
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.hashes: dict[str, object] = {}

    def check_and_add(self, key: str, text: str) -> tuple[str, float] | None:
        m = minhash(text, self.num_perm, self.k)
        best = None
        for cand in sorted(self.lsh.query(m)):  # sorted: deterministic choice among candidates
            sim = m.jaccard(self.hashes[cand])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (cand, sim)
        if best is None:
            self.lsh.insert(key, m)
            self.hashes[key] = m
        return best


# ----------------------------------------------------------------------------- decontamination


def eval_texts(path: str | Path) -> list[str]:
    """The text of every item in an eval file: all string values (and lists of strings) of each JSON
    line, joined; for a plain text file, its non-empty paragraphs."""
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"eval file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    with opener(path, "rt", encoding="utf-8") as f:
        if not name.endswith((".jsonl", ".json")):
            return [p for p in f.read().split("\n\n") if p.strip()]
        return [" ".join(_strings(obj)) for _, obj in iter_jsonl(f, path)]


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def ngram_hashes(text: str, n: int) -> set[int]:
    ws = normalize_line(text).split()
    return {hash64(" ".join(ws[i:i + n])) for i in range(len(ws) - n + 1)}


class Decontaminator:
    """An index of the word n-grams of evaluation sets; ``match`` names the set a text overlaps."""

    def __init__(self, n: int = 13) -> None:
        self.n = n
        self.index: dict[int, str] = {}
        self.items = 0
        self.too_short = 0

    def add(self, name: str, texts: Iterable[str]) -> None:
        for t in texts:
            grams = ngram_hashes(t, self.n)
            self.items += 1
            if not grams:
                self.too_short += 1
            for g in grams:
                self.index.setdefault(g, name)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], n: int = 13) -> Decontaminator:
        d = cls(n)
        for p in paths:
            d.add(Path(p).name, eval_texts(p))
        return d

    def match(self, text: str) -> str | None:
        ws = normalize_line(text).split()
        for i in range(len(ws) - self.n + 1):
            name = self.index.get(hash64(" ".join(ws[i:i + self.n])))
            if name is not None:
                return name
        return None
