"""Document filters: language id, Gopher/C4 heuristics, an n-gram perplexity model, and a linear
reference classifier. Every filter returns a *reason* string when it rejects (``None`` to keep),
so the caller can count it in the ledger; none of them mutates its input.

Trade-offs, stated once:
- Language id is ``py3langid`` (the langid.py model, shipped inside the package: no download).
  Its probabilities are normalised; short texts are unreliable, so ``min_chars`` guards them.
- Heuristics follow Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020) with their
  published thresholds as defaults; every threshold is a field of :class:`HeuristicConfig`.
- The perplexity model is a word trigram with interpolated absolute discounting (Kneser-Ney's
  simpler sibling), in pure Python. CCNet uses a KenLM 5-gram on SentencePiece pieces: ours is
  far smaller and slower per token, but needs no compiled dependency and trains in seconds on a
  reference sample. Perplexity buckets (head/middle/tail) are cut at quantiles measured on the
  corpus itself, as CCNet does.
- The reference classifier is logistic regression on hashed word uni+bigram features (crc32 into
  ``2**n_bits`` buckets: stable across processes, unlike Python's ``hash``), trained by plain SGD
  in numpy: the fastText-style linear model LLaMA used, without fastText.
"""

from __future__ import annotations

import math
import pickle
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from llamalab.common import LlamalabError
from llamalab.data.dedup import pieces

_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_LONG = 1 << 20  # characters: above this, filters count words in pieces before building lists


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def count_words(text: str, stop: int | None = None) -> int:
    """``len(text.split())`` without the list (pieces cut at whitespace); stops once past ``stop``."""
    n = 0
    for piece in pieces(text):
        n += len(piece.split())
        if stop is not None and n >= stop:
            return n
    return n


# ----------------------------------------------------------------------------- language id

_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import (  # optional extra: llamalab[data]
            MODEL_FILE,
            LanguageIdentifier,
        )

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect_language(text: str, max_chars: int = 4000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text`` (its first ``max_chars`` characters)."""
    lang, prob = _identifier().classify(text[:max_chars])
    return lang, float(prob)


def language_filter(text: str, languages: Sequence[str] = ("en",), min_prob: float = 0.5,
                    min_chars: int = 20) -> str | None:
    """Reject text whose identified language is not in ``languages`` with at least ``min_prob``."""
    if len(text.strip()) < min_chars:
        return "lang:too_short"
    lang, prob = detect_language(text)
    if lang not in languages:
        return f"lang:{lang}"
    if prob < min_prob:
        return "lang:low_confidence"
    return None


# ----------------------------------------------------------------------------- heuristics

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
BULLETS = ("•", "*", "-", "–", "‣", "◦", "·")
TERMINAL = ('.', '!', '?', '"', "'", '”', '’', ':', ';', ')')
_COOKIE = re.compile(r"\bcookies?\b", re.IGNORECASE)
_COOKIE_THEN = re.compile(r"\b(use|policy|accept|consent)\b", re.IGNORECASE)
_THEN_COOKIE = re.compile(r"\b(use|accept)\b", re.IGNORECASE)


class _CookieLine:
    """C4's cookie rule, ``cookies?.*(use|policy|accept|consent)|(use|accept).*cookies?`` (words,
    any case, on one line), in linear time: as one regex it backtracks quadratically (a 20 MB line
    took minutes). The leftmost first word ends first, so it is the only one worth trying."""

    def search(self, s: str) -> bool:
        for seg in s.split("\n") if "\n" in s else (s,):  # ".*" does not cross a newline
            m = _COOKIE.search(seg)
            if m and _COOKIE_THEN.search(seg, m.end()):
                return True
            m = _THEN_COOKIE.search(seg)
            if m and _COOKIE.search(seg, m.end()):
                return True
        return False


BAD_LINE_PATTERNS = {
    "javascript": re.compile(r"javascript", re.IGNORECASE),
    "cookie": _CookieLine(),
    "policy": re.compile(r"\b(terms of use|privacy policy|all rights reserved)\b", re.IGNORECASE),
}


@dataclass
class HeuristicConfig:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_ratio: float = 0.1  # ('#' + '...') per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    min_line_words: int = 3  # C4
    min_sentences: int = 3  # C4 uses 5 on whole pages; lowered for paragraph-sized documents


def gopher_filter(text: str, cfg: HeuristicConfig | None = None) -> str | None:
    """Gopher's document rules; the first failing rule's name, or None."""
    cfg = cfg or HeuristicConfig()
    if len(text) > _LONG and count_words(text, cfg.max_words + 1) > cfg.max_words:
        return "gopher:too_many_words"  # counted in pieces: a long page's word list is never built
    ws = text.split()
    n = len(ws)
    if n < cfg.min_words:
        return "gopher:too_few_words"
    if n > cfg.max_words:
        return "gopher:too_many_words"
    mean_len = sum(len(w) for w in ws) / n
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return "gopher:mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > cfg.max_symbol_ratio:
        return "gopher:symbol_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        if sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines:
            return "gopher:bullet_lines"
        if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines:
            return "gopher:ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in ws) / n < cfg.min_alpha_words:
        return "gopher:non_alpha_words"
    if len(STOP_WORDS.intersection(w.lower().strip(".,;:!?\"'") for w in ws)) < cfg.min_stop_words:
        return "gopher:stop_words"
    return None


def c4_line_reason(line: str, cfg: HeuristicConfig | None = None) -> str | None:
    """Why C4 would drop this line (None keeps it)."""
    cfg = cfg or HeuristicConfig()
    s = line.strip()
    for name, pat in BAD_LINE_PATTERNS.items():
        if pat.search(s):
            return f"c4:{name}"
    if not s.endswith(TERMINAL):
        return "c4:no_terminal_punct"
    if len(s.split(maxsplit=cfg.min_line_words)) < cfg.min_line_words:
        return "c4:short_line"
    return None


def c4_lines(text: str, cfg: HeuristicConfig | None = None) -> tuple[str, dict[str, list[str]]]:
    """Apply C4's line rules: (kept text, {reason: dropped lines}). Blank lines are kept."""
    kept: list[str] = []
    dropped: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            kept.append(line)
            continue
        reason = c4_line_reason(line, cfg)
        if reason is None:
            kept.append(line)
        else:
            dropped.setdefault(reason, []).append(line)
    return "\n".join(kept).strip("\n"), dropped


def c4_doc_filter(text: str, cfg: HeuristicConfig | None = None) -> str | None:
    """C4's page rules: lorem ipsum, curly braces (code on a web page), too few sentences."""
    cfg = cfg or HeuristicConfig()
    low = text.lower()
    if "lorem ipsum" in low:
        return "c4:lorem_ipsum"
    if "{" in text:
        return "c4:curly_brace"
    ends = _SENTENCE_END.finditer(text)
    if sum(1 for _ in zip(range(cfg.min_sentences), ends)) < cfg.min_sentences:
        return "c4:too_few_sentences"
    return None


# ----------------------------------------------------------------------------- n-gram perplexity


def lm_tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


class NgramLM:
    """Word trigram LM, interpolated absolute discounting down to an add-one unigram (with <unk>).

    ``P(w|u,v) = max(c(uvw)-D,0)/c(uv.) + D*N1+(uv.)/c(uv.) * P(w|v)``, same for bigrams; every
    probability is > 0 and each conditional sums to 1 over the vocabulary plus <unk>.
    """

    BOS, EOS = "<s>", "</s>"

    def __init__(self, discount: float = 0.75) -> None:
        self.d = discount
        self.c1: Counter = Counter()
        self.c2: Counter = Counter()
        self.c3: Counter = Counter()
        self.ctx1: Counter = Counter()  # c(v.)
        self.ctx2: Counter = Counter()  # c(uv.)
        self.n1_1: Counter = Counter()  # N1+(v.)
        self.n1_2: Counter = Counter()  # N1+(uv.)
        self.total = 0

    def _trigrams(self, text: str) -> Iterator[tuple[str, str, str]]:
        """(u, v, w) of every token of each non-empty line, the line padded with BOS BOS ... EOS."""
        for line in text.splitlines():
            if not line.strip():
                continue
            s = [self.BOS, self.BOS] + lm_tokens(line) + [self.EOS]
            yield from zip(s, s[1:], s[2:])

    def fit(self, texts: Iterable[str]) -> NgramLM:
        for text in texts:
            for u, v, w in self._trigrams(text):
                self.c1[w] += 1
                self.total += 1
                if self.c2[(v, w)] == 0:
                    self.n1_1[v] += 1
                self.c2[(v, w)] += 1
                self.ctx1[v] += 1
                if self.c3[(u, v, w)] == 0:
                    self.n1_2[(u, v)] += 1
                self.c3[(u, v, w)] += 1
                self.ctx2[(u, v)] += 1
        if self.total == 0:
            raise LlamalabError("perplexity model: the reference corpus has no tokens")
        return self

    def _p1(self, w: str) -> float:
        return (self.c1.get(w, 0) + 1) / (self.total + len(self.c1) + 1)

    def _p2(self, v: str, w: str) -> float:
        cv = self.ctx1.get(v, 0)
        if cv == 0:
            return self._p1(w)
        return (max(self.c2.get((v, w), 0) - self.d, 0) + self.d * self.n1_1[v] * self._p1(w)) / cv

    def prob(self, u: str, v: str, w: str) -> float:
        cuv = self.ctx2.get((u, v), 0)
        if cuv == 0:
            return self._p2(v, w)
        return (max(self.c3.get((u, v, w), 0) - self.d, 0) + self.d * self.n1_2[(u, v)] * self._p2(v, w)) / cuv

    def log_prob(self, text: str) -> tuple[float, int]:
        """(sum of natural-log probabilities, number of predicted tokens) over the text's lines."""
        lp, n = 0.0, 0
        for u, v, w in self._trigrams(text):
            lp += math.log(self.prob(u, v, w))
            n += 1
        return lp, n

    def perplexity(self, text: str) -> float:
        lp, n = self.log_prob(text)
        return math.exp(-lp / n) if n else float("inf")

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(self.__dict__, f, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path: str | Path) -> NgramLM:
        lm = cls()
        with open(path, "rb") as f:
            lm.__dict__.update(pickle.load(f))
        return lm


def bucket_cutoffs(perplexities: Sequence[float], head: float = 1 / 3, tail: float = 2 / 3) -> tuple[float, float]:
    """CCNet's bucket edges: the ``head`` and ``tail`` quantiles of the corpus' own perplexities."""
    finite = [p for p in perplexities if math.isfinite(p)]
    if not finite:
        raise LlamalabError("perplexity buckets: no document with a finite perplexity to calibrate on")
    q = np.quantile(np.asarray(finite), [head, tail])
    return float(q[0]), float(q[1])


def perplexity_bucket(ppl: float, cutoffs: tuple[float, float]) -> str:
    if ppl <= cutoffs[0]:
        return "head"
    return "middle" if ppl <= cutoffs[1] else "tail"


# ----------------------------------------------------------------------------- reference classifier


def hashed_features(text: str, n_bits: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values): word unigrams and bigrams hashed by crc32, l2-normalised counts."""
    ws = [w.lower() for w in words(text)]
    grams = ws + [a + " " + b for a, b in pairwise(ws)]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    mask = (1 << n_bits) - 1
    idx = np.fromiter((zlib.crc32(g.encode("utf-8")) & mask for g in grams), np.int64, len(grams))
    uniq, counts = np.unique(idx, return_counts=True)
    vals = counts.astype(np.float64)
    return uniq, vals / np.linalg.norm(vals)


class ReferenceClassifier:
    """Logistic regression: P(text looks like the reference corpus), on hashed n-gram features."""

    def __init__(self, n_bits: int = 18) -> None:
        self.n_bits = n_bits
        self.w = np.zeros(1 << n_bits)
        self.b = 0.0

    def fit(self, positives: Sequence[str], negatives: Sequence[str], epochs: int = 5, lr: float = 0.5,
            l2: float = 1e-6, seed: int = 0) -> ReferenceClassifier:
        if not positives or not negatives:
            raise LlamalabError("reference classifier: needs both reference and random documents to train")
        feats = ([hashed_features(t, self.n_bits) for t in positives]
                 + [hashed_features(t, self.n_bits) for t in negatives])
        ys = np.array([1.0] * len(positives) + [0.0] * len(negatives))
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            for i in rng.permutation(len(ys)):
                idx, val = feats[i]
                p = 1.0 / (1.0 + math.exp(-(float(self.w[idx] @ val) + self.b)))
                g = p - ys[i]
                self.w[idx] -= lr * (g * val + l2 * self.w[idx])
                self.b -= lr * g
        return self

    def score(self, text: str) -> float:
        idx, val = hashed_features(text, self.n_bits)
        z = float(self.w[idx] @ val) + self.b
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, w=self.w, b=np.array([self.b]), n_bits=np.array([self.n_bits]))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceClassifier:
        z = np.load(path)
        clf = cls(int(z["n_bits"][0]))
        clf.w, clf.b = z["w"], float(z["b"][0])
        return clf
