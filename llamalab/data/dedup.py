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
  :meth:`Decontaminator.remove` works at the granularity that matched (as LLaMA 2 measured
  contamination per span, not per document): the paragraphs an n-gram overlaps are removed and
  the rest of the document is kept (a 42-play Shakespeare file loses Polonius' speech quoted by
  one MMLU item, not the other 41 plays). A paragraph longer than ``max_unit_chars`` is handled
  line by line, a longer line in pieces of that size cut at whitespace. Each removal names the
  eval item (``file:line``) and the first n-gram that matched.
- Long documents: every function here normalises text in pieces of ``_PIECE`` characters cut at
  whitespace, and hashes, shingles and n-grams are streamed, so the memory they need does not grow
  with the length of one document (a 20 MB line used to cost ~13 bytes of Python objects per
  byte in a word list). Results are the same as on the whole text, since normalisation never
  joins or splits words across whitespace.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamalab.common import LlamalabError, iter_jsonl

_DIGITS = re.compile(r"\d")
_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_SPACES = re.compile(r"\s+")
_WS = re.compile(r"\s")
_PIECE = 1 << 16  # characters normalised / hashed at a time


def pieces(text: str, size: int = _PIECE) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, each cut just before a
    whitespace character (a run of ``size`` characters without whitespace is cut where it is)."""
    n = len(text)
    a = 0
    while n - a > size:
        m = _WS.search(text, a + size, min(n, a + 2 * size))
        b = m.start() if m else a + 2 * size
        if b >= n:
            break
        yield text[a:b]
        a = b
    yield text[a:]


def _normalize(s: str) -> str:
    s = s.lower()
    if not s.isascii():  # NOTE: the per-character accent strip is the slow part; ASCII skips it
        s = unicodedata.normalize("NFD", s)
        s = "".join(c for c in s if unicodedata.category(c) != "Mn")
    s = _DIGITS.sub("0", s)
    s = _PUNCT.sub(" ", s)
    return _SPACES.sub(" ", s).strip()


def normalize_line(line: str) -> str:
    """CCNet's normalisation: lower case, accents stripped, digits -> 0, punctuation removed."""
    if len(line) <= _PIECE:
        return _normalize(line)
    return " ".join(p for p in map(_normalize, pieces(line)) if p)


def normalized_words(text: str) -> Iterator[str]:
    """The words of ``normalize_line(text)``, produced piece by piece."""
    for piece in pieces(text):
        yield from _normalize(piece).split()


def hash64(s: str) -> int:
    # surrogatepass: a lone surrogate (from an eval file's JSON) must not stop hashing
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


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
    """sha1 of the text with whitespace runs made one space (streamed for long texts)."""
    if len(text) <= _PIECE:
        return hashlib.sha1(_SPACES.sub(" ", text).strip().encode("utf-8")).hexdigest()
    h, first = hashlib.sha1(), True
    for piece in pieces(text):
        ws = piece.split()
        if ws:
            h.update(("" if first else " ").encode() + " ".join(ws).encode("utf-8"))
            first = False
    return h.hexdigest()


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


_PERMUTATIONS: dict[tuple[int, int], object] = {}


def _new_minhash(num_perm: int, seed: int):
    """An empty datasketch MinHash. Its constructor draws its ``num_perm`` permutations anew each time
    (a RandomState and 256 draws: a quarter of near-dup time on web pages), so they are drawn once per
    (num_perm, seed) and handed to later ones: the same values, as the signatures are."""
    from datasketch import MinHash  # optional extra: llamalab[data]

    first = _PERMUTATIONS.get((num_perm, seed))
    if first is None:
        m = MinHash(num_perm=num_perm, seed=seed)
        _PERMUTATIONS[(num_perm, seed)] = m
        return m
    if hasattr(first, "scheme"):  # datasketch >= 2.0 wants the scheme with given permutations
        return MinHash(num_perm=num_perm, seed=seed, permutations=first.permutations, scheme=first.scheme)
    return MinHash(num_perm=num_perm, seed=seed, permutations=first.permutations)


def minhash(text: str, num_perm: int = 128, k: int = 5, seed: int = 1, batch: int = 1 << 15):
    """MinHash of the text's word ``k``-shingles. A long text is shingled in streamed batches: a
    minimum does not care about repeats, so the signature equals the one of the shingle set."""
    m = _new_minhash(num_perm, seed)
    if len(text) <= _PIECE:
        m.update_batch(list(shingles(text, k)))
        return m
    window: deque[str] = deque(maxlen=k)
    buf: list[bytes] = []
    for w in normalized_words(text):
        window.append(w)
        if len(window) == k:
            buf.append(" ".join(window).encode("utf-8"))
            if len(buf) >= batch:
                m.update_batch(buf)
                buf = []
    if len(window) < k and window:  # fewer than k words in all: the one shingle is all of them
        buf.append(" ".join(window).encode("utf-8"))
    if buf:
        m.update_batch(buf)
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


def eval_items(path: str | Path) -> list[tuple[str, str]]:
    """``(label, text)`` of every item in an eval file; the label is ``file:line`` (1-based). A JSON
    line's text is all its string values (and lists of strings) joined; a plain text file's items
    are its non-empty paragraphs, labelled with their first line."""
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"eval file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if not name.endswith((".jsonl", ".json")):
                out, line, nl = [], 1, "\n"
                for para in f.read().split("\n\n"):
                    if para.strip():
                        out.append((f"{path.name}:{line + len(para) - len(para.lstrip(nl))}", para))
                    line += para.count("\n") + 2
                return out
            return [(f"{path.name}:{n}", " ".join(_strings(obj))) for n, obj in iter_jsonl(f, path)]
    except (EOFError, OSError, UnicodeDecodeError) as e:
        raise LlamalabError(f"{path}: not a readable eval file ({e})") from None


def eval_texts(path: str | Path) -> list[str]:
    """The text of every item in an eval file (see :func:`eval_items`)."""
    return [t for _, t in eval_items(path)]


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


_BLANK_RUN = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def units(text: str, max_chars: int = 2000) -> list[tuple[int, int]]:
    """``(start, end)`` spans that partition ``text``: paragraphs (with the blank lines after them);
    a paragraph over ``max_chars`` as its lines, a line over ``max_chars`` in pieces cut at whitespace.
    Every cut is at whitespace, so the words of the units are the words of the text, in order."""
    out: list[tuple[int, int]] = []

    def paragraph(a: int, b: int) -> None:
        if b - a <= max_chars:
            out.append((a, b))
            return
        while a < b:
            nl = text.find("\n", a, b)
            end = b if nl < 0 else nl + 1
            if end - a <= max_chars:
                out.append((a, end))
            else:
                for piece in pieces(text[a:end], max_chars):
                    out.append((a, a + len(piece)))
                    a += len(piece)
            a = end

    pos = 0
    for m in _BLANK_RUN.finditer(text):
        paragraph(pos, m.end())
        pos = m.end()
    if pos < len(text):
        paragraph(pos, len(text))
    return out


@dataclass
class Contamination:
    """One contiguous stretch of units that eval n-grams overlap."""

    first: int  # first unit index
    last: int  # last unit index (inclusive)
    item: str  # the eval item of the first n-gram that matched: "file:line"
    ngram: str  # that n-gram (normalised words)
    ngrams: int = 1  # n-grams that matched in the stretch

    @property
    def eval_file(self) -> str:
        return self.item.rsplit(":", 1)[0]


class Decontaminator:
    """An index of the word n-grams of evaluation sets; ``match`` names the set a text overlaps,
    ``remove`` cuts the overlapping paragraphs out of a text and says which item matched."""

    def __init__(self, n: int = 13) -> None:
        self.n = n
        self.index: dict[int, int] = {}  # n-gram hash -> item number
        self.labels: list[str] = []  # item number -> "file:line"
        self.items = 0
        self.too_short = 0

    def add(self, name: str, texts: Iterable[str], labels: Iterable[str] | None = None) -> None:
        labels = iter(labels) if labels is not None else None
        for k, t in enumerate(texts):
            item = len(self.labels)
            self.labels.append(next(labels) if labels is not None else f"{name}:{k + 1}")
            grams = ngram_hashes(t, self.n)
            self.items += 1
            if not grams:
                self.too_short += 1
            for g in grams:
                self.index.setdefault(g, item)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], n: int = 13) -> Decontaminator:
        d = cls(n)
        for p in paths:
            items = eval_items(p)
            d.add(Path(p).name, [t for _, t in items], [label for label, _ in items])
        return d

    def _hits(self, text: str, spans: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, int, int, str]]:
        """(first unit, last unit, item, n-gram) of every matching n-gram, in text order."""
        spans = spans if spans is not None else [(0, len(text))]
        window: deque[tuple[str, int]] = deque(maxlen=self.n)
        for u, (a, b) in enumerate(spans):
            for w in normalized_words(text[a:b]):
                window.append((w, u))
                if len(window) == self.n:
                    gram = " ".join(x for x, _ in window)
                    item = self.index.get(hash64(gram))
                    if item is not None:
                        yield window[0][1], u, item, gram

    def match(self, text: str) -> str | None:
        """The eval file of the first n-gram ``text`` shares with an eval item, or None."""
        for _, _, item, _ in self._hits(text):
            return self.labels[item].rsplit(":", 1)[0]
        return None

    def find(self, text: str, max_unit_chars: int = 2000) -> tuple[list[tuple[int, int]], list[Contamination]]:
        """The text's units (see :func:`units`) and the contaminated stretches of them."""
        if not self.index:
            return [], []
        spans = units(text, max_unit_chars)
        found: list[Contamination] = []
        for first, last, item, gram in self._hits(text, spans):
            if found and first <= found[-1].last + 1 and last >= found[-1].first:
                found[-1].last = max(found[-1].last, last)
                found[-1].ngrams += 1
            else:
                found.append(Contamination(first, last, self.labels[item], gram))
        return spans, found

    def remove(self, text: str, max_unit_chars: int = 2000) -> tuple[str, list[dict]]:
        """``text`` without the units eval n-grams overlap, and one record per removed stretch:
        ``{"eval": "file:line", "ngram", "ngrams", "chars_removed", "text"}`` (``text``: what was cut)."""
        spans, found = self.find(text, max_unit_chars)
        if not found:
            return text, []
        records, kept, pos = [], [], 0
        for c in found:
            a, b = spans[c.first][0], spans[c.last][1]
            kept.append(text[pos:a])
            records.append({"eval": c.item, "ngram": c.ngram, "ngrams": c.ngrams, "chars_removed": b - a,
                            "text": text[a:b]})
            pos = b
        kept.append(text[pos:])
        out = "".join(kept)
        return (out.rstrip() if pos == len(text) else out), records
