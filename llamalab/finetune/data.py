"""SFT data: read Alpaca / ShareGPT files, render them with the chat template, keep a ledger.

Formats (JSON array or JSONL, optionally ``.gz``):

- ``alpaca``: ``{"instruction", "input"?, "output"}`` (Stanford Alpaca). With the ``alpaca``
  template and a non-empty input, the prompt is exactly Stanford's with-input prompt (its preamble
  as the system text, ``### Input:`` after the instruction); with other templates the user turn is
  ``instruction + "\\n\\n" + input``.
- ``sharegpt``: ``{"conversations": [{"from", "value"}]}`` (ShareGPT / Vicuna), or OpenAI-style
  ``{"messages": [{"role", "content"}]}``. Roles: human/user -> user, gpt/assistant/chatgpt/model ->
  assistant, system -> system (first message only); anything else is an unknown role.
  A message may carry ``"weight": 0`` (or 1, the default; axolotl's ShareGPT convention): an assistant
  turn with weight 0 stays in the context but carries no loss. Ghost Attention data
  (:mod:`llamalab.synth.gatt`) marks every turn but the last this way. Turns merged by the clean-up
  below keep the loss if any of them had it; a conversation whose turns all have weight 0 is dropped
  (``no_loss_turn``), as is a split chunk with none left (counted as a fix of its record).

Conversations are normalised the way FastChat's Vicuna training does, and every fix is counted:
leading assistant turns are dropped (ShareGPT scrapes often start mid-conversation), consecutive
turns of the same role are merged (joined with a blank line), a trailing user turn without an answer
is dropped. A conversation with no assistant turn left, or with an unknown role, is dropped and
counted with that reason. Malformed input (bad JSON, missing fields, wrong types) raises a
:class:`LlamalabError` naming ``file:line`` by default, or is counted with that location under
``on_error="skip"``. Nothing is dropped without a line in :class:`SFTLedger`.

Rendering goes through :func:`llamalab.tokenizer.templates.render` (the one template implementation
shared with inference), giving token ids and a loss mask that is 1 on every assistant turn's content
and its closing token (EOS), 0 on system/user text and template scaffolding.

Overlong examples (more tokens than ``max_len``), by ``overlong``:

- ``split`` (default): the conversation is cut at turn boundaries into consecutive chunks of
  (user, assistant) turns, as many turns per chunk as fit; each chunk is rendered as its own
  conversation with the system prompt repeated. A single turn longer than ``max_len`` is truncated
  (its tail is lost). Trade-off: later chunks lose the earlier turns as context, but every
  assistant token is trained on once, instead of only the first ``max_len`` tokens (FastChat).
- ``truncate``: keep the first ``max_len`` tokens (FastChat's rule); the cut tail is counted.
- ``drop``: drop the example, counted as ``too_long``.

A truncated chunk with no assistant token left is dropped and counted (``too_long_no_answer``).
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, Progress
from llamalab.tokenizer.templates import render

FORMATS = ("alpaca", "sharegpt")
OVERLONG = ("split", "truncate", "drop")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "model": "assistant", "system": "system"}
ALPACA_INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")
MAX_ERRORS_KEPT = 20


@dataclass
class Example:
    """One rendered training example: ids and a 0/1 loss mask of the same length."""

    ids: list[int]
    mask: list[int]
    where: str  # file:line of the record it came from
    record: int = 0  # ordinal of that record among all read (chunks of one record share it)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SFTLedger:
    """Counts of what happened to every record read (printed in the SFT summary, saved as JSON).

    Not :class:`llamalab.data.ledger.Ledger`: that one counts pretraining documents and lines
    dropped per (stage, reason) and merges per-shard ledgers; this one counts conversations, the
    fixes applied to kept ones, the examples they became and their tokens.
    """

    read: int = 0
    kept: int = 0  # records that gave at least one example
    examples: int = 0  # examples after splitting
    dropped: Counter = field(default_factory=Counter)  # reason -> records
    fixes: Counter = field(default_factory=Counter)  # normalisations applied (records kept)
    tokens: int = 0  # tokens in the examples kept
    loss_tokens: int = 0  # assistant tokens trained on
    tokens_cut: int = 0  # tokens lost to truncation
    errors: list[str] = field(default_factory=list)  # first malformed records, "file:line: why"

    def drop(self, reason: str, where: str | None = None, why: str | None = None) -> None:
        self.dropped[reason] += 1
        if where is not None and len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{where}: {why or reason}")

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "examples": self.examples, "dropped": dict(self.dropped),
                "fixes": dict(self.fixes), "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "tokens_cut": self.tokens_cut, "errors": self.errors}

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        fixes = ", ".join(f"{k} {v}" for k, v in sorted(self.fixes.items())) or "none"
        return (f"{self.read} records read, {self.kept} kept -> {self.examples} examples, "
                f"{sum(self.dropped.values())} dropped ({drops}); fixes: {fixes}; {self.tokens:,} tokens, "
                f"{self.loss_tokens:,} trained on; {self.tokens_cut:,} cut by truncation")


def split_val(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random ``fraction`` of the *records* held out (at least one), so the
    chunks of one split conversation never straddle train and val."""
    if not fraction:
        return examples, []
    records = sorted({e.record for e in examples})
    random.Random(seed + 1).shuffle(records)
    k = max(1, round(fraction * len(records)))
    if k >= len(records):
        raise LlamalabError(f"sft: --val-fraction {fraction} leaves no training records")
    held = set(records[:k])
    return [e for e in examples if e.record not in held], [e for e in examples if e.record in held]


# ----------------------------------------------------------------------------- reading files


def _open_text(path: Path) -> str:
    if not path.exists():
        raise LlamalabError(f"data file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise LlamalabError(f"{path}: cannot read as UTF-8 text ({e})") from None


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, parsed value)`` for each record of a JSON array or JSONL file.

    A line that is not valid JSON yields ``(where, JSONDecodeError)`` so the caller can count it.
    """
    path = Path(path)
    text = _open_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    # NOTE: split on "\n" only: str.splitlines() also breaks at U+2028, U+0085..., which JSON strings
    # may hold unescaped (the ShareGPT sample does, line 1467)
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{i}", e


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array with the line each starts on (incremental raw_decode)."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted, item = 1, 0, 0

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise LlamalabError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield f"{path}:{line} (item {item})", value
        item += 1
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        ln = text.count("\n", 0, pos) + 1
        raise LlamalabError(f"{path}:{ln}: invalid JSON (expected ',' or ']' between array elements)")


# ----------------------------------------------------------------------------- to messages


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is the ledger key, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def alpaca_messages(rec: Any, template: str) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise BadRecord("malformed", f"expected an object with instruction/output, got {type(rec).__name__}")
    for k in ("instruction", "output"):
        if not isinstance(rec.get(k), str):
            raise BadRecord("malformed", f"field {k!r} missing or not a string")
    inp = rec.get("input", "")
    if not isinstance(inp, str):
        raise BadRecord("malformed", "field 'input' is not a string")
    if not rec["output"].strip():
        raise BadRecord("no_assistant_turn", "empty output")
    if not rec["instruction"].strip():
        raise BadRecord("no_user_turn", "empty instruction")
    msgs: list[dict[str, str]] = []
    user = rec["instruction"]
    if inp.strip():
        if template == "alpaca":
            msgs.append({"role": "system", "content": ALPACA_INPUT_PREAMBLE})
            user = f"{user}\n\n### Input:\n{inp}"
        else:
            user = f"{user}\n\n{inp}"
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def sharegpt_messages(rec: Any, fixes: Counter) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise BadRecord("malformed", f"expected an object with 'conversations', got {type(rec).__name__}")
    if "conversations" in rec:
        turns, rk, ck = rec["conversations"], "from", "value"
    elif "messages" in rec:
        turns, rk, ck = rec["messages"], "role", "content"
    else:
        raise BadRecord("malformed", "no 'conversations' (ShareGPT) or 'messages' (OpenAI) list")
    if not isinstance(turns, list):
        raise BadRecord("malformed", f"'{'conversations' if rk == 'from' else 'messages'}' is not a list")
    msgs: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(ck), str) or not isinstance(t.get(rk), str):
            raise BadRecord("malformed", f"turn {i}: expected {{{rk!r}: str, {ck!r}: str}}")
        role = ROLE_MAP.get(t[rk].lower())
        if role is None:
            raise BadRecord("unknown_role", f"turn {i}: unknown role {t[rk]!r} (known: {', '.join(ROLE_MAP)})")
        if role == "system" and i > 0:
            raise BadRecord("misplaced_system", f"turn {i}: a system message after the first turn")
        msg = {"role": role, "content": t[ck]}
        if "weight" in t:
            w = t["weight"]
            if isinstance(w, bool) or w not in (0, 1):
                raise BadRecord("malformed", f"turn {i}: 'weight' must be 0 or 1, got {w!r}")
            msg["weight"] = int(w)
        msgs.append(msg)
    return normalise(msgs, fixes)


def normalise(msgs: list[dict[str, str]], fixes: Counter) -> list[dict[str, str]]:
    """FastChat-style clean-up to system? (user, assistant)+; each fix counted in ``fixes``."""
    system = [msgs[0]] if msgs and msgs[0]["role"] == "system" else []
    turns = msgs[len(system):]
    if turns and turns[0]["role"] == "assistant":
        while turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
        fixes["leading_assistant_dropped"] += 1
    merged: list[dict[str, str]] = []
    for m in turns:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + m["content"]}
            if "weight" in merged[-1] or "weight" in m:  # the merged turn trains if any part did
                merged[-1]["weight"] = max(merged[-1].get("weight", 1), m.get("weight", 1))
            fixes["same_role_merged"] += 1
        else:
            merged.append(dict(m))
    if merged and merged[-1]["role"] == "user":
        merged.pop()
        if any(m["role"] == "assistant" for m in merged):
            fixes["trailing_user_dropped"] += 1
    if not any(m["role"] == "assistant" for m in merged):
        raise BadRecord("no_assistant_turn", "no assistant turn (after dropping leading assistant turns)")
    return system + merged


# ----------------------------------------------------------------------------- rendering


def _render(msgs: list[dict[str, Any]], template: str, tok: Any) -> tuple[list[int], list[int]]:
    ids, mask = render(msgs, template, tok, add_generation_prompt=False)
    weights = [m.get("weight", 1) for m in msgs if m["role"] == "assistant"]
    if all(weights):
        return ids, mask
    runs = _mask_runs(mask)  # one run of loss tokens per assistant turn (content + its closer)
    if len(runs) != len(weights):  # e.g. an empty answer with no closer token: find each turn by its prefix
        runs = _turn_spans(msgs, template, tok, len(ids))
    mask = list(mask)
    for (a, b), w in zip(runs, weights):
        if not w:
            mask[a:b] = [0] * (b - a)
    return ids, mask


def _mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _turn_spans(msgs: list[dict[str, Any]], template: str, tok: Any, n: int) -> list[tuple[int, int]]:
    """[start, end) token span of each assistant turn: from the end of the prompt before it to the end of the
    conversation rendered up to it."""
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            a = len(render(msgs[:k], template, tok, add_generation_prompt=True)[0])
            b = len(render(msgs[:k + 1], template, tok, add_generation_prompt=False)[0]) if k + 1 < len(msgs) else n
            spans.append((a, b))
    return spans


def render_example(msgs: list[dict[str, str]], template: str, tok: Any, max_len: int, overlong: str,
                   where: str, ledger: SFTLedger) -> list[Example]:
    """Render one conversation into 0+ examples of at most ``max_len`` tokens (module docstring rule)."""
    ids, mask = _render(msgs, template, tok)
    if not any(mask[1:]):  # every assistant turn has weight 0
        ledger.drop("no_loss_turn", where, "every assistant turn has weight 0 (nothing to train on)")
        return []
    if len(ids) <= max_len:
        return [Example(ids, mask, where)]
    if overlong == "drop":
        ledger.drop("too_long", where, f"{len(ids)} tokens > max_len {max_len} (overlong=drop)")
        return []
    if overlong == "truncate":
        ledger.fixes["truncated"] += 1
        kept = _truncated(ids, mask, max_len, where, ledger)
        if not kept:
            ledger.drop("too_long_no_answer", where, f"no assistant token within the first {max_len} tokens")
        return kept
    ledger.fixes["split"] += 1
    out: list[Example] = []
    for chunk in _turn_chunks(msgs, template, tok, max_len):
        cids, cmask = _render(chunk, template, tok)
        if not any(cmask[1:]):  # only weight-0 turns in this chunk
            ledger.fixes["chunk_dropped_no_loss"] += 1
            continue
        if len(cids) <= max_len:
            out.append(Example(cids, cmask, where))
            continue
        ledger.fixes["turn_truncated"] += 1
        kept = _truncated(cids, cmask, max_len, where, ledger)
        if not kept:  # NOTE: a lost chunk is a fix of a kept record; the record drops only if all are lost
            ledger.fixes["chunk_dropped_no_answer"] += 1
        out += kept
    if not out:
        ledger.drop("too_long_no_answer", where, f"no chunk has an assistant token within {max_len} tokens")
    return out


def _truncated(ids: list[int], mask: list[int], max_len: int, where: str, ledger: SFTLedger) -> list[Example]:
    """The first ``max_len`` tokens, or nothing when no assistant token survives (the caller counts it)."""
    ledger.tokens_cut += len(ids) - max_len
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):  # the first position is never a target
        return []
    return [Example(ids, mask, where)]


def _turn_chunks(msgs: list[dict[str, str]], template: str, tok: Any, max_len: int) -> list[list[dict[str, str]]]:
    """Greedy chunks of consecutive (user, assistant) pairs, the system message repeated in each."""
    system = [msgs[0]] if msgs[0]["role"] == "system" else []
    turns = msgs[len(system):]
    pairs = [turns[i:i + 2] for i in range(0, len(turns), 2)]
    chunks: list[list[dict[str, str]]] = []
    cur: list[list[dict[str, str]]] = []
    for pair in pairs:
        trial = system + [m for p in cur + [pair] for m in p]
        if cur and len(_render(trial, template, tok)[0]) > max_len:
            chunks.append(system + [m for p in cur for m in p])
            cur = [pair]
        else:
            cur.append(pair)
    if cur:
        chunks.append(system + [m for p in cur for m in p])
    return chunks


def load_sft_data(paths: Sequence[str | Path], fmt: str, template: str, tok: Any, max_len: int,
                  overlong: str = "split", on_error: str = "raise", ledger: SFTLedger | None = None,
                  limit: int = 0) -> tuple[list[Example], SFTLedger]:
    """Read, normalise, render and length-check every record of ``paths`` (see module docstring)."""
    if fmt not in FORMATS:
        raise LlamalabError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if overlong not in OVERLONG:
        raise LlamalabError(f"overlong: must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    if on_error not in ("raise", "skip"):
        raise LlamalabError(f"on_error: must be raise or skip, got {on_error!r}")
    ledger = ledger or SFTLedger()
    out: list[Example] = []
    bar = Progress(limit or None, "sft data", unit="records", every=5.0)
    for path in paths:
        for where, rec in iter_records(path):
            if limit and ledger.read >= limit:
                break
            ledger.read += 1
            exs = _one_record(where, rec, fmt, template, tok, max_len, overlong, on_error, ledger)
            for e in exs:
                e.record = ledger.read
            if exs:
                ledger.kept += 1
                out += exs
            bar.update(1, extra=f"{len(out)} examples")
    bar.close()
    ledger.examples = len(out)
    ledger.tokens = sum(len(e) for e in out)
    ledger.loss_tokens = sum(sum(e.mask[1:]) for e in out)
    return out, ledger


def _one_record(where: str, rec: Any, fmt: str, template: str, tok: Any, max_len: int, overlong: str,
                on_error: str, ledger: SFTLedger) -> list[Example]:
    try:
        if isinstance(rec, json.JSONDecodeError):
            raise BadRecord("malformed", f"invalid JSON ({rec.msg}, column {rec.colno})")
        fixes: Counter = Counter()
        msgs = alpaca_messages(rec, template) if fmt == "alpaca" else sharegpt_messages(rec, fixes)
    except BadRecord as e:
        if e.reason == "malformed" and on_error == "raise":
            raise LlamalabError(f"{where}: {e} (format {fmt}; --on-error skip counts and skips such records)") from None
        ledger.drop(e.reason, where, str(e))
        return []
    exs = render_example(msgs, template, tok, max_len, overlong, where, ledger)
    if exs:
        ledger.fixes.update(fixes)
    return exs
