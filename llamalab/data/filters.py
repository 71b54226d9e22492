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
from itertools import pairwise, repeat
from operator import itemgetter
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
_DFA_MAX_WINDOW = 12  # bytes: a model whose feature scanner remembers more is walked byte by byte


def dfa_window(nextmove: np.ndarray, rowbase: np.ndarray, max_window: int = _DFA_MAX_WINDOW) -> int | None:
    """The number of bytes ``W`` after which the state of a byte DFA no longer depends on what came
    before: for every text ``t``, ``state(t) == state(t[-W:])`` (both walked from state 0), or None.

    Proved on the table itself, not assumed from how it was built: the pairs ``(state(z),
    state(z[1:]))`` over all strings ``z`` of length k are followed for k = 1, 2, ...; once every
    pair is equal, ``state(z) == state(z[1:])`` for all ``|z| = W + 1``, and by induction the claim
    holds. ``nextmove[rowbase[s] + byte]`` is the transition (py3langid's layout)."""
    byte = np.arange(256, dtype=np.int64)
    rowbase = rowbase.astype(np.int64)
    a = nextmove[rowbase[0] + byte].astype(np.int64)
    r = np.zeros_like(a)
    for k in range(1, max_window + 2):
        keep = a != r
        if not keep.any():
            return k - 1
        # the next pair depends only on the two states' rows: follow distinct pairs of unequal rows
        ra, rr = rowbase[a[keep]], rowbase[r[keep]]
        diff = ra != rr
        pairs = np.unique((ra[diff] << 24) | rr[diff])  # rowbase < 2**32 (checked): one sort dedups
        a = nextmove[((pairs >> 32) << 8)[:, None] + byte].ravel().astype(np.int64)
        r = nextmove[(pairs & 0xFFFFFFFF)[:, None] + byte].ravel().astype(np.int64)
    return None


def _fast_identifier_class(base):
    """py3langid's identifier with its per-byte Python loop (``visit_counts``: ~70% of language id)
    replaced by numpy: the feature scanner is a DFA whose state depends only on the last ``W``
    bytes (:func:`dfa_window`, proved on the model at load), so every position's state is a walk
    of ``W`` steps from state 0, done for all positions at once. The features are then counted in
    first-visit order, as ``collections.Counter`` orders them, so the float32 score is computed
    from the same operands in the same order as py3langid's (checked on load and in the tests)."""

    class FastIdentifier(base):
        def _prepare(self) -> bool:
            # the transition table as a view of py3langid's own array (no copy: 39 MB)
            nm = np.frombuffer(self.tk_nextmove, dtype=np.dtype(self.tk_nextmove.typecode))
            rb = np.frombuffer(self.tk_row, dtype=np.dtype(self.tk_row.typecode)).astype(np.int64) << 8
            if not len(rb) or int(rb.max()) + 256 > len(nm) or len(nm) >= 1 << 31 or int(nm.max()) >= len(rb):
                return False
            self._window = dfa_window(nm, rb)
            # The float16 weights as float32: numpy casts them to float32 for the product anyway
            # (same operands, half the time; +57 MB)
            self._nm_rb = (nm, rb.astype(np.int32), np.asarray(self.tk_output, dtype=np.int32))
            self._ptc32 = np.asarray(self.nb_ptc, dtype=np.float32)
            return self._window is not None

        def set_languages(self, langs=None):
            super().set_languages(langs)
            self._ptc32 = np.asarray(self.nb_ptc, dtype=np.float32)

        def _raw_score(self, text):
            nm, rb, out = self._nm_rb
            b = np.frombuffer(text, dtype=np.uint8)
            n = len(b)
            st = np.zeros(n, dtype=np.int32)
            for j in range(min(self._window, n) - 1, -1, -1):  # position i reads b[i-j], oldest first
                st[j:] = nm[rb[st[j:]] + b[:n - j]]  # states < 2**31: checked in _prepare
            f = out[st]
            f = f[f >= 0]
            if not f.size:
                return super()._raw_score(b"")
            uniq, first, counts = np.unique(f, return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")  # Counter's order: first visit
            return np.log1p(counts[order].astype(np.float32)) @ self._ptc32[uniq[order]] + self.nb_pc

    return FastIdentifier


_LANGID_CHECK = ("The quick brown fox jumps over the lazy dog.", "Le renard brun saute par-dessus le chien.",
                 "Der schnelle braune Fuchs springt.", "敏捷的棕色狐狸跳过了懒狗。", "Быстрая лиса", "x", "")


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import (  # optional extra: llamalab[data]
            MODEL_FILE,
            LanguageIdentifier,
        )

        ident = None
        try:  # NOTE: relies on py3langid 0.4's internals; any mismatch falls back to py3langid as is
            fast = _fast_identifier_class(LanguageIdentifier).from_model_file(MODEL_FILE, norm_probs=True)
            if fast._prepare():
                plain = LanguageIdentifier(fast.nb_ptc, fast.nb_pc, fast.nb_classes, fast.tk_nextmove,
                                           fast.tk_output, norm_probs=True, tk_row=fast.tk_row)
                if all(fast.classify(t) == plain.classify(t) for t in _LANGID_CHECK):
                    ident = fast
        except (AttributeError, TypeError, ValueError):
            ident = None
        _IDENTIFIER = ident or LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
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
    mean_len = len("".join(ws)) / n  # the characters of all words, without a Python loop
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
    if _alpha_words(text, ws) / n < cfg.min_alpha_words:
        return "gopher:non_alpha_words"
    if _stop_words(text, ws, cfg.min_stop_words) < cfg.min_stop_words:
        return "gopher:stop_words"
    return None


# On ASCII text (most pages) two Gopher counts are one regex scan instead of a loop over words:
# there, str.isalpha() is [A-Za-z], lower() only maps A-Z, and re's \s is str.split()'s whitespace
# (both Py_UNICODE_ISSPACE; tests/data/test_fast_paths.py checks all 128 characters). Other text
# takes the per-word loops, the definitions.
_NO_ALPHA_WORD_ASCII = re.compile(r"(?<!\S)[^\sA-Za-z]+(?!\S)")
_STOP_STRIP = ".,;:!?\"'"
_STOP_WORD_ASCII = re.compile(r"(?<!\S)[.,;:!?\"']*(" + "|".join(sorted(STOP_WORDS)) + r")[.,;:!?\"']*(?!\S)")


def _alpha_words(text: str, ws: list[str]) -> int:
    """How many of the words ``ws`` (``text.split()``) hold an alphabetic character."""
    if text.isascii():
        return len(ws) - len(_NO_ALPHA_WORD_ASCII.findall(text))
    return sum(1 for w in ws if w.isalpha() or any(c.isalpha() for c in w))


def _stop_words(text: str, ws: list[str], enough: int) -> int:
    """How many distinct STOP_WORDS are among the words (lower-cased, stripped of punctuation),
    counting no further than ``enough``."""
    if not text.isascii():
        return min(len(STOP_WORDS.intersection(w.lower().strip(_STOP_STRIP) for w in ws)), enough)
    found: set[str] = set()
    for m in _STOP_WORD_ASCII.finditer(text.lower()):
        found.add(m.group(1))
        if len(found) >= enough:
            break
    return len(found)


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


_BAD_WORDS_ASCII = ("javascript", "cookie", "terms of use", "privacy policy", "all rights reserved")


def _c4_rest_reason(line: str, cfg: HeuristicConfig) -> str | None:
    """c4_line_reason after its BAD_LINE_PATTERNS, which cannot match this line."""
    s = line.strip()
    if not s.endswith(TERMINAL):
        return "c4:no_terminal_punct"
    if len(s.split(maxsplit=cfg.min_line_words)) < cfg.min_line_words:
        return "c4:short_line"
    return None


def c4_lines(text: str, cfg: HeuristicConfig | None = None) -> tuple[str, dict[str, list[str]]]:
    """Apply C4's line rules: (kept text, {reason: dropped lines}). Blank lines are kept."""
    cfg = cfg or HeuristicConfig()
    kept: list[str] = []
    dropped: dict[str, list[str]] = {}
    # An ASCII page holding none of the patterns' words (any case) needs no pattern search on its
    # lines: for ASCII text IGNORECASE is ASCII case folding, which lower() is.
    if text.isascii():
        low = text.lower()
        line_reason = c4_line_reason if any(w in low for w in _BAD_WORDS_ASCII) else _c4_rest_reason
    else:
        line_reason = c4_line_reason
    for line in text.splitlines():
        if not line.strip():
            kept.append(line)
            continue
        reason = line_reason(line, cfg)
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
        """Count the texts' trigrams (added to any counted before). Only ``c3`` is counted token by
        token (``Counter.update``, in C); the other tables are its sums, rebuilt from it in its
        order, which is first occurrence: the same counts and key order as counting each
        table per trigram."""
        self.__dict__.pop("_table", None)  # the counts change: the scoring tables are rebuilt when next used
        for text in texts:
            self.c3.update(self._trigrams(text))
        # plain dicts while summing (Counter's __missing__ is a Python call per new key)
        c1: dict = {}
        c2: dict = {}
        ctx1: dict = {}
        ctx2: dict = {}
        n1_1: dict = {}
        n1_2: dict = {}
        for (u, v, w), c in self.c3.items():
            uv, vw = (u, v), (v, w)
            ctx2[uv] = ctx2.get(uv, 0) + c
            n1_2[(u, v)] = n1_2.get(uv, 0) + 1  # its own key tuple, as before: lm.pkl stays byte-identical
            c2[vw] = c2.get(vw, 0) + c
        for (v, w), c in c2.items():  # c2's order is first occurrence too, so these keep theirs
            c1[w] = c1.get(w, 0) + c
            ctx1[v] = ctx1.get(v, 0) + c
            n1_1[v] = n1_1.get(v, 0) + 1
        self.c1, self.c2, self.ctx1, self.ctx2 = Counter(c1), Counter(c2), Counter(ctx1), Counter(ctx2)
        self.n1_1, self.n1_2 = Counter(n1_1), Counter(n1_2)
        self.total = sum(c1.values())
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
        """(sum of natural-log probabilities, number of predicted tokens) over the text's lines.

        Scored by :class:`_LMTable` (numpy over the whole text); the same numbers as summing
        ``math.log(self.prob(u, v, w))`` over :meth:`_trigrams`, which the tests check."""
        table = self.__dict__.get("_table")
        if table is None:
            table = self._table = _LMTable.build(self)
        if table is False:  # vocabulary too large for the packed keys: the per-trigram path
            lp, n = 0.0, 0
            for u, v, w in self._trigrams(text):
                lp += math.log(self.prob(u, v, w))
                n += 1
            return lp, n
        return table.log_prob(text)

    def perplexity(self, text: str) -> float:
        lp, n = self.log_prob(text)
        return math.exp(-lp / n) if n else float("inf")

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            pickle.dump({k: v for k, v in self.__dict__.items() if k != "_table"}, f, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path: str | Path) -> NgramLM:
        lm = cls()
        with open(path, "rb") as f:
            lm.__dict__.update(pickle.load(f))
        return lm


class _LMTable:
    """An :class:`NgramLM`'s counts as numpy arrays and one hash table, scoring a whole text at once.

    Tokens become ids (0: never seen, whose counts are all 0, as for any unseen string); bigram,
    context and trigram keys are packed into one int64 (``V < 2**20``; a tag in bits 60-61 tells
    the three apart) and all of a text's keys are looked up at once in one :class:`_IntTable`
    (dicts cost ~1 us a lookup in cache misses, a sorted array's ``searchsorted`` more). Every
    probability is computed with the same float64 operations in the same order as
    :meth:`NgramLM.prob`, and the logs are summed one by one in text order, so the result is
    bit-identical (numpy's pairwise sum would not be).
    """

    def __init__(self, lm: NgramLM, vocab: dict[str, int]) -> None:
        self.vocab, self.d = vocab, float(lm.d)
        V = self.V = len(vocab) + 1
        self.bos, self.eos = vocab[lm.BOS], vocab[lm.EOS]
        self.p1 = np.full(V, lm._p1(lm.BOS + lm.EOS + "<unk>"))  # a string no token can be
        for t, i in vocab.items():
            self.p1[i] = lm._p1(t)
        self.ctx1, self.n1_1 = np.zeros(V), np.zeros(V)
        for t, c in lm.ctx1.items():
            self.ctx1[vocab[t]] = c
        for t, c in lm.n1_1.items():
            self.n1_1[vocab[t]] = c

        n1_2 = lm.n1_2
        keys = np.concatenate([_pack(vocab, lm.c2, V) | _C2, _pack(vocab, lm.ctx2, V) | _CTX2, _pack(vocab, lm.c3, V)])
        vals = np.concatenate([_counts(lm.c2), (_counts(lm.ctx2) << 32) | _counts(n1_2, lm.ctx2), _counts(lm.c3)])
        self.table = _IntTable(keys, vals)

    @classmethod
    def build(cls, lm: NgramLM) -> _LMTable | bool:
        vocab: dict[str, int] = {}
        for t in (lm.BOS, lm.EOS, *lm.c1, *lm.ctx1):
            vocab.setdefault(t, len(vocab) + 1)
        if len(vocab) + 1 >= 1 << 20:
            return False
        return cls(lm, vocab)

    def ids(self, text: str) -> np.ndarray:
        """Token ids of the text's non-empty lines, each line as BOS BOS tokens EOS."""
        get, seq, pad = self.vocab.get, [], (self.bos, self.bos)
        for line in text.splitlines():
            if not line.strip():
                continue
            # an ASCII line lowers to the same tokens; elsewhere lower() may change the length
            toks = _TOKEN.findall(line.lower()) if line.isascii() else lm_tokens(line)
            seq += pad
            seq += map(get, toks, repeat(0))
            seq.append(self.eos)
        return np.array(seq, dtype=np.int64)

    def probs(self, text: str) -> np.ndarray:
        seq = self.ids(text)
        pos = np.flatnonzero(seq != self.bos)  # every token but the padding is predicted, from the two before
        u, v, w = seq[pos - 2], seq[pos - 1], seq[pos]
        V, d, n = self.V, self.d, len(pos)

        p1 = self.p1[w]
        cv = self.ctx1[v]
        uv = u * V + v
        found = self.table.get(np.concatenate([(v * V + w) | _C2, uv | _CTX2, uv * V + w]))
        c2, ctx, c3 = found[:n].astype(np.float64), found[n:2 * n], found[2 * n:].astype(np.float64)
        cuv, n12 = (ctx >> 32).astype(np.float64), (ctx & 0xFFFFFFFF).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p2 = (np.maximum(c2 - d, 0.0) + d * self.n1_1[v] * p1) / cv
            p2 = np.where(cv == 0, p1, p2)
            p = (np.maximum(c3 - d, 0.0) + d * n12 * p2) / cuv
            return np.where(cuv == 0, p2, p)

    def log_prob(self, text: str) -> tuple[float, int]:
        probs = self.probs(text).tolist()
        lp, log = 0.0, math.log
        for p in probs:  # in order, one by one: NgramLM's sum exactly
            lp += log(p)
        return lp, len(probs)


_C2, _CTX2 = 1 << 60, 2 << 60  # key tags: bigram, trigram context (trigrams untagged, < V**3 < 2**60)
_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: multiplicative hashing


class _IntTable:
    """A read-only int64 -> int64 hash table looked up a whole array at a time: keys sorted by
    bucket (``2**bits`` buckets, ~1 key each), so a query reads one short contiguous run; no
    per-key Python. ``get`` gives 0 for a missing key."""

    def __init__(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.bits = max(1, int(len(keys)).bit_length())
        h = self._bucket(keys)
        order = np.argsort(h, kind="stable")
        self.keys = np.append(keys[order], -1)  # -1: no key is negative; pads the last bucket's run
        self.vals = np.append(vals[order], 0)
        counts = np.bincount(h, minlength=1 << self.bits)
        self.start = np.concatenate([[0], np.cumsum(counts)])
        self.width = np.arange(max(1, int(counts.max()) if len(counts) else 1))

    def _bucket(self, q: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((q.astype(np.uint64) * _FIB) >> np.uint64(64 - self.bits)).astype(np.int64)

    def get(self, q: np.ndarray) -> np.ndarray:
        h = self._bucket(q)
        a, b = self.start[h], self.start[h + 1]
        idx = np.minimum(a[:, None] + self.width, b[:, None] - 1)  # stays in the bucket (or on its last key)
        hit = self.keys[idx] == q[:, None]
        j = hit.argmax(axis=1)
        return np.where(hit.any(axis=1), self.vals[idx[np.arange(len(q)), j]], 0)


def _pack(vocab: dict[str, int], counter: Counter, V: int) -> np.ndarray:
    """The counter's tuple keys as packed ids ``(a * V + b) * V + c``, in the counter's order."""
    n = len(counter)
    key = np.zeros(n, dtype=np.int64)
    # NOTE: itemgetter, not zip(*counter): a transposed copy is ~1M new tuples, and the garbage
    # collector's passes over the counters' millions of objects made that 10x slower
    for j in range(len(next(iter(counter))) if n else 0):
        key = key * V + np.fromiter(map(vocab.__getitem__, map(itemgetter(j), counter)), np.int64, n)
    return key


def _counts(counter: Counter, keys=None) -> np.ndarray:
    """The counter's values, in the order of ``keys`` (default: its own)."""
    if keys is None:
        return np.fromiter(counter.values(), np.int64, len(counter))
    return np.fromiter(map(counter.__getitem__, keys), np.int64, len(keys))


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
