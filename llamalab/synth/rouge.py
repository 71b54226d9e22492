"""ROUGE-L F-measure, equal to ``rouge_score.RougeScorer(["rougeL"], use_stemmer=False)``, fast for many candidates.

Self-Instruct keeps a new instruction only when its ROUGE-L against every kept instruction is below
0.7. Done pairwise in Python (as ``rouge-score`` does, with an O(m*n) table per pair), checking one
instruction against 10k kept ones takes about a second; :class:`RougeIndex` does it with numpy in
about a millisecond:

- **Tokens**: :func:`tokenize` is rouge-score's tokenizer (lowercase, every run of characters other
  than ``a-z0-9`` becomes a space, split); tokens are mapped to integers once, when added.
- **LCS, bit-parallel** (Allison and Dix 1986; Hyyrö 2004): the new instruction (m tokens) is the
  pattern, a bit vector of m bits (``ceil(m/64)`` uint64 words). For each pattern token the match
  mask marks the positions where it occurs. Every kept instruction is a row of token ids; one pass
  over its columns applies ``U = V & M[t]; V = (V + U) | (V - U)`` to all rows at once (numpy,
  carries propagated across words); ``LCS = m - popcount(V)``. Padding maps to an all-zero mask, which
  leaves V unchanged, so rows of different lengths share one matrix.
- **Length bound**: ``F <= 2 min(m, n) / (m + n)``, so with a threshold t only candidates of length
  within ``[m t / (2 - t), m (2 - t) / t]`` can reach it. Kept instructions live in buckets by
  length (powers of two), and buckets wholly outside the range are skipped.

Scores are computed with rouge-score's own float formula (``p = lcs/n``, ``r = lcs/m``,
``2 p r / (p + r)``), so they are bit-for-bit equal, not just close.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")


def tokenize(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lowercase, non-alphanumerics -> space, split."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if _VALID.match(t)]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel over ``a``)."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def f_measure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge-score's F from an LCS length (0 when either side is empty or nothing matches)."""
    if not target_len or not prediction_len:
        return 0.0
    p = lcs / prediction_len
    r = lcs / target_len
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_l(target: str | Sequence[str], prediction: str | Sequence[str]) -> float:
    """ROUGE-L F-measure of two texts (or token lists), as ``RougeScorer(["rougeL"]).score(target, prediction)``."""
    a = tokenize(target) if isinstance(target, str) else list(target)
    b = tokenize(prediction) if isinstance(prediction, str) else list(prediction)
    return f_measure(lcs_length(a, b), len(a), len(b))


def _bucket(n: int) -> int:
    return max(0, (n - 1).bit_length())  # 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...


class _Bucket:
    """Token ids of instructions of lengths in (2^(k-1), 2^k], one column per instruction (``ids[j]`` holds
    the j-th token of every instruction, contiguous), padded with ``pad``."""

    def __init__(self, width: int, pad: int) -> None:
        self.width, self.pad = width, pad
        self.ids = np.full((width, 16), pad, dtype=np.int64)
        self.lens = np.zeros(16, dtype=np.int64)
        self.index = np.zeros(16, dtype=np.int64)
        self.n = 0

    def add(self, ids: Sequence[int], index: int) -> None:
        if self.n == len(self.lens):
            cap = 2 * self.n
            self.ids = np.concatenate([self.ids, np.full((self.width, cap - self.n), self.pad, dtype=np.int64)], axis=1)
            self.lens = np.concatenate([self.lens, np.zeros(cap - self.n, dtype=np.int64)])
            self.index = np.concatenate([self.index, np.zeros(cap - self.n, dtype=np.int64)])
        self.ids[:len(ids), self.n] = ids
        self.lens[self.n] = len(ids)
        self.index[self.n] = index
        self.n += 1


class RougeIndex:
    """The kept instructions; :meth:`best` finds the most similar one to a new instruction by ROUGE-L F."""

    PAD = -1

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.vocab: dict[str, int] = {}
        self.buckets: dict[int, _Bucket] = {}
        self.texts: list[str] = []
        self.n_empty = 0
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> int:
        """Keep ``text``; returns its index (the order of addition)."""
        index = len(self.texts)
        self.texts.append(text)
        toks = tokenize(text)
        if not toks:
            self.n_empty += 1  # scores 0 against everything: stored only as text
            return index
        ids = [self.vocab.setdefault(t, len(self.vocab)) for t in toks]
        k = _bucket(len(ids))
        if k not in self.buckets:
            self.buckets[k] = _Bucket(1 << k, self.PAD)
        self.buckets[k].add(ids, index)
        return index

    def scores(self, text: str, min_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(kept indices, ROUGE-L F) for every kept instruction that can reach ``min_score`` (all when 0)."""
        toks = tokenize(text)
        m = len(toks)
        if not m or not self.buckets:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        lo, hi = 1, 1 << 62
        if min_score > 0:
            lo = m * min_score / (2 - min_score)
            hi = m * (2 - min_score) / min_score if min_score < 2 else 0
        # the pattern: one match mask per vocabulary id (words of 64 bits), plus the all-zero pad mask at the end
        words = (m + 63) // 64
        known = [(i, self.vocab.get(t)) for i, t in enumerate(toks)]
        vocab_ids = sorted({v for _, v in known if v is not None})
        lookup = {v: j for j, v in enumerate(vocab_ids)}
        masks = np.zeros((len(vocab_ids) + 1, words), dtype=np.uint64)
        for i, v in known:
            if v is not None:
                masks[lookup[v], i // 64] |= np.uint64(1) << np.uint64(i % 64)
        remap = np.full(len(self.vocab) + 1, len(vocab_ids), dtype=np.int64)  # unknown/pad -> the zero mask
        remap[vocab_ids] = np.arange(len(vocab_ids))
        full = np.full(words, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        if m % 64:
            full[-1] = np.uint64((1 << (m % 64)) - 1)
        out_idx, out_f = [], []
        for k in sorted(self.buckets):
            b = self.buckets[k]
            if b.n == 0 or b.width < lo or (b.width >> 1) + 1 > hi:
                continue
            lens = b.lens[:b.n]
            # NOTE: bits above m may fill with carries; carries only move up, so they never reach the m
            # bits that count, and one mask at the end replaces a mask per step
            if words == 1:
                v = np.full(b.n, full[0], dtype=np.uint64)
                m1 = masks[:, 0]
                for j in range(int(lens.max())):
                    u = v & m1[remap[b.ids[j, :b.n]]]  # PAD = -1 picks remap's last entry: the zero mask
                    v = (v + u) | (v ^ u)  # u is a subset of v: v - u == v ^ u (no borrows)
                v = (v & full[0])[:, None]
            else:
                v = np.broadcast_to(full, (b.n, words)).copy()
                for j in range(int(lens.max())):
                    u = v & masks[remap[b.ids[j, :b.n]]]
                    v = _add(v, u) | (v ^ u)
                v &= full
            lcs = m - np.bitwise_count(v).sum(axis=1).astype(np.int64)
            p = lcs / lens
            r = lcs / m
            with np.errstate(invalid="ignore", divide="ignore"):
                f = np.where(lcs > 0, 2 * p * r / (p + r), 0.0)
            out_idx.append(b.index[:b.n])
            out_f.append(f)
        if not out_idx:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return np.concatenate(out_idx), np.concatenate(out_f)

    def best(self, text: str, min_score: float = 0.0) -> tuple[float, int | None]:
        """(highest ROUGE-L F, index of that kept instruction; the earliest on ties).

        With ``min_score > 0`` candidates that cannot reach it are skipped, so a result below
        ``min_score`` is only the best of those compared (the true best is below ``min_score`` too).
        """
        idx, f = self.scores(text, min_score)
        if not len(f):
            return 0.0, None
        top = f.max()
        return float(top), int(idx[f == top].min())


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Multi-word unsigned addition of (rows, words) little-endian uint64 arrays (carry into the next word)."""
    out = np.empty_like(a)
    carry = np.zeros(a.shape[0], dtype=np.uint64)
    for w in range(a.shape[1]):
        s = a[:, w] + b[:, w]
        c1 = s < a[:, w]
        s2 = s + carry
        c2 = s2 < s
        out[:, w] = s2
        carry = (c1 | c2).astype(np.uint64)
    return out
