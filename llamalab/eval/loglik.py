"""Log-likelihood scoring: (context, continuation) pairs, multiple choice, perplexity and bits per byte.

Tokenization follows lm-evaluation-harness so that scores are comparable with published ones:
trailing whitespace of the context moves to the continuation, the pair is encoded as one string
(``encode(context + continuation)``) and the continuation is whatever follows the tokens of
``encode(context)``. A sequence starts with BOS when the tokenizer adds one (``tokenizer.add_bos``:
LLaMA's and Llama 3's do, SmolLM2's does not). When a pair is
longer than the model's context, tokens are dropped from the left of the context.

Batching: pairs are sorted by length (longest first), right-padded and scored in one forward per
batch; padding sits after the last real token, so under the causal mask it changes nothing. The
trade-off: no prefix sharing between the choices of one question (a KV-cache prefix would save
compute on long contexts but makes batching irregular); the simple way is exact and fast enough
for CPU-sized models and GPU batches alike.

Multiple choice: ``acc`` = argmax of the summed continuation log-likelihood; ``acc_norm`` = argmax
of log-likelihood divided by the choice's length in characters, lm-eval's rule: the continuation is
``" " + choice`` and only ``len(choice)`` counts; ``acc_bytes`` divides by UTF-8 bytes instead (identical
for ASCII answers). Choices that continue one shared context by a single token each (MMLU's letters) are
scored from one forward pass of the context.

Perplexity: each document is scored on its own (BOS first) in windows of at most ``max_seq_len``
tokens; with ``stride < max_seq_len`` every window after the first re-reads
``max_seq_len - stride`` tokens as context, so each token is predicted once with at least that much
left context (lm-eval's rolling log-likelihood is ``stride = max_seq_len``). Bits per byte =
total NLL / (ln 2 * UTF-8 bytes), which, unlike token perplexity, compares across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from llamalab.common import Progress

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) int64 -> (B, T, V) logits


@dataclass
class Scored:
    """Log-likelihood of one continuation: the sum, token count, and whether it is the greedy output."""

    loglik: float
    n_tokens: int
    is_greedy: bool


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Our Transformer as a logits function (fp32 logits on the model's device)."""
    device = next(model.parameters()).device

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(tokens.to(device)).float()

    return fn


def prefix_ids(tokenizer) -> list[int]:
    """The token lm-eval puts before a text scored from its start (an empty context, a rolling document):
    BOS when the tokenizer has one, else EOS (lm-eval's ``prefix_token_id``), whatever the BOS rule."""
    for i in (tokenizer.bos_id, tokenizer.eos_id):
        if i is not None and i >= 0:
            return [i]
    return []


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context ids, BOS first with ``bos``; continuation ids).

    Trailing whitespace of the context moves to the continuation; an empty context is lm-eval's prefix token
    (:func:`prefix_ids`) with the continuation encoded alone."""
    if context == "":
        return prefix_ids(tokenizer), tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, bos=bos)
    ctx = tokenizer.encode(context, bos=bos)
    cont = whole[len(ctx):]
    if not cont:  # rare: the continuation merged into the context's last token; score it on its own
        cont = tokenizer.encode(continuation)
    return ctx, cont


def score_token_pairs(logits_fn: LogitsFn, pairs: Sequence[tuple[list[int], list[int]]], max_len: int,
                      batch_size: int = 16, pad_id: int = 0, label: str = "loglik") -> list[Scored]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair.

    Pairs that share their context and continue it by one token each (MMLU's `` A``/`` B``/`` C``/`` D``)
    are scored from one forward of that context: the same numbers, a quarter of the compute."""
    rows: list[tuple[list[int], list[tuple[int, list[int]]]]] = []  # input ids, (pair, targets at its end) ...
    shared: dict[tuple[int, ...], int] = {}  # a context continued by single tokens -> its row
    for i, (ctx, cont) in enumerate(pairs):
        full = (list(ctx) + list(cont))[-(max_len + 1):]  # drop from the left of the context
        n = min(len(cont), len(full) - 1)
        if n < 1:
            raise ValueError("a pair needs a non-empty context (BOS) and continuation")
        inp, tgt = full[:-1], full[-n:]
        if len(cont) == 1:
            key = tuple(inp)
            if key in shared:
                rows[shared[key]][1].append((i, tgt))
                continue
            shared[key] = len(rows)
        rows.append((inp, [(i, tgt)]))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    out: list[Scored | None] = [None] * len(pairs)
    bar = Progress(len(pairs), label, "seq")
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(rows[r][0]) for r in idx)
        x = torch.full((len(idx), T), pad_id, dtype=torch.long)
        for k, r in enumerate(idx):
            x[k, :len(rows[r][0])] = torch.tensor(rows[r][0])
        logp = F.log_softmax(logits_fn(x).float(), dim=-1).cpu()
        for k, r in enumerate(idx):
            inp, targets = rows[r]
            for i, tgt_ids in targets:
                tgt = torch.tensor(tgt_ids)
                lp = logp[k, len(inp) - len(tgt):len(inp)]
                out[i] = Scored(float(lp.gather(-1, tgt[:, None]).sum()), len(tgt),
                                bool((lp.argmax(-1) == tgt).all()))
            bar.update(len(targets))
    bar.close()
    return out  # type: ignore[return-value]


def score_text_pairs(logits_fn: LogitsFn, tokenizer, pairs: Sequence[tuple[str, str]], max_len: int,
                     batch_size: int = 16, label: str = "loglik") -> list[Scored]:
    """Text (context, continuation) pairs -> :class:`Scored`, tokenized the lm-eval way."""
    enc = [encode_pair(tokenizer, c, x, bos=getattr(tokenizer, "add_bos", True)) for c, x in pairs]
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    return score_token_pairs(logits_fn, enc, max_len, batch_size, pad, label)


# ----------------------------------------------------------------------------- multiple choice


def choice_text(continuation: str) -> str:
    """The answer as lm-eval measures it for ``acc_norm``: its continuation is ``target_delimiter + choice``
    (the delimiter a single space) and it divides by ``len(choice)``, so one leading space is not counted."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def choice_metrics(lls: Sequence[float], continuations: Sequence[str], gold: int) -> dict[str, float]:
    """acc (raw), acc_norm (per character of the choice, lm-eval's rule: :func:`choice_text`) and acc_bytes (per
    UTF-8 byte of it) for one item."""
    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=lambda i: values[i])  # first index wins ties

    chars = [max(len(choice_text(c)), 1) for c in continuations]
    nbytes = [max(len(choice_text(c).encode("utf-8")), 1) for c in continuations]
    return {
        "acc": float(argmax(lls) == gold),
        "acc_norm": float(argmax([ll / n for ll, n in zip(lls, chars)]) == gold),
        "acc_bytes": float(argmax([ll / n for ll, n in zip(lls, nbytes)]) == gold),
    }


# ----------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityTotals:
    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    docs: int = 0

    def metrics(self) -> dict[str, float]:
        t, b, w = max(self.tokens, 1), max(self.bytes, 1), max(self.words, 1)
        return {"token_perplexity": math.exp(self.nll / t), "bits_per_byte": self.nll / (b * math.log(2)),
                "word_perplexity": math.exp(min(self.nll / w, 700.0)), "nll_per_token": self.nll / t,
                "tokens": self.tokens, "bytes": self.bytes, "words": self.words, "documents": self.docs}


def rolling_windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, first_scored) over a sequence of ``n_tokens`` (index 0 = BOS).

    Targets ``first_scored..end-1`` are predicted from inputs ``start..end-2``; together the windows
    predict each of tokens 1..n-1 exactly once."""
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in (0, {max_len}], got {stride}")
    wins, scored = [], 1
    while scored < n_tokens:
        end = min(scored + stride, n_tokens)
        start = max(0, end - max_len - 1)
        wins.append((start, end, scored))
        scored = end
    return wins


def document_nll(logits_fn: LogitsFn, ids: list[int], max_len: int, stride: int) -> tuple[float, int]:
    """Summed NLL of tokens 1.. of ``ids`` (ids[0] is BOS, never predicted) and their count."""
    total, count = 0.0, 0
    for start, end, first in rolling_windows(len(ids), max_len, stride):
        x = torch.tensor([ids[start:end - 1]])
        logp = F.log_softmax(logits_fn(x).float(), dim=-1)[0].cpu()
        tgt = torch.tensor(ids[first:end])
        lp = logp[first - start - 1:end - start - 1]
        total -= float(lp.gather(-1, tgt[:, None]).sum())
        count += len(tgt)
    return total, count
