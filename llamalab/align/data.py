"""Preference data: read pairs, render them with the chat template, keep a ledger.

Formats (JSON array or JSONL, optionally ``.gz``; ``fmt="auto"`` decides per record):

- ``pairs``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (or ``"messages"`` instead of ``"prompt"``).
  The prompt is a string (one user turn) or a role/content list ending with a user turn (an optional
  ``"system"`` string field is put first). ``chosen``/``rejected`` are strings (the answers), or role/content
  lists: either one assistant message, or the whole conversation (prompt + answer, the UltraFeedback/TRL
  shape), in which case the prompt may be left out and is taken from ``chosen`` (``rejected`` must start with
  the same turns, else the record is dropped as ``prompt_mismatch``).
- ``hh``: Anthropic HH-RLHF, ``{"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}`` whole
  dialogues. Each is split at its last ``"\\n\\nAssistant:"`` into a prompt and an answer; records whose two
  prompts differ are dropped (``prompt_mismatch``). The prompt's ``Human:``/``Assistant:`` turns become
  user/assistant messages (contents stripped).

Margin (Llama 2's "margin small", Touvron et al. 2023b, Table 28): a numeric per-pair ``"margin"``, or a
``"rating"`` label: ``significantly better`` 1.0, ``better`` 2/3, ``slightly better`` 1/3, ``negligibly better``
or ``unsure`` 0.0 (case and a trailing ``" / unsure"`` ignored). Missing: 0.0.

Conversation clean-up (each fix counted in the ledger): leading assistant turns dropped, consecutive turns of
one role merged (joined with a blank line). A prompt that does not end with a user turn is dropped
(``prompt_not_user``). Drops, each counted with ``file:line`` examples (``PreferenceLedger.errors``):
``identical`` (chosen == rejected after stripping), ``empty_answer``, ``prompt_mismatch``, ``no_prompt``,
and at encoding ``prompt_too_long`` (no answer token fits in ``max_len``) and ``identical_after_truncation``.
Malformed records (invalid JSON, missing fields, wrong types) raise a :class:`LlamalabError` naming
``file:line`` by default, or are counted as ``malformed`` under ``on_error="skip"``. The ledger always
balances: ``read == kept + sum(dropped)``.

Prompts alone (PPO, rejection sampling: :func:`read_prompts`) come from the same pair files (each distinct prompt
once) or from ``{"prompt": str | messages}`` / ``{"messages": [... ending with a user turn]}`` records.

Encoding renders ``prompt + [assistant: answer]`` through :func:`llamalab.tokenizer.templates.render` (the one
template implementation) for each answer. The loss mask is the template's assistant mask restricted to the
*last* assistant turn (the answer and its closing token); earlier assistant turns of a multi-turn prompt are
context. A pair whose rendered answer runs past ``max_len`` is truncated to ``max_len`` tokens (counted as the
fix ``truncated``), as TRL's DPO trainer keeps the prompt and cuts the answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.common import LlamalabError, Progress
from llamalab.finetune.data import ROLE_MAP, BadRecord, iter_records
from llamalab.tokenizer.templates import render

FORMATS = ("auto", "pairs", "hh")
MAX_ERRORS_KEPT = 20
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
# Llama 2's four preference levels -> "margin small" (Touvron et al. 2023b, Table 28)
RATING_MARGIN = {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
                 "negligibly better": 0.0, "unsure": 0.0, "negligibly better / unsure": 0.0,
                 "negligibly better/unsure": 0.0}


@dataclass
class PreferencePair:
    prompt: list[dict]  # [{"role", "content"}], ends with a user turn
    chosen: str
    rejected: str
    margin: float = 0.0
    where: str = ""  # "file:line"


@dataclass
class PreferenceLedger:
    """What happened to every record read: kept, dropped by reason (``file:line`` examples), fixes, tokens."""

    read: int = 0
    kept: int = 0  # pairs alive (after reading; encode_pairs moves its drops out of here)
    dropped: Counter = field(default_factory=Counter)  # reason -> records
    fixes: Counter = field(default_factory=Counter)  # clean-ups applied to kept records
    encoded: int = 0  # pairs encoded (encode_pairs)
    tokens: int = 0  # tokens of the encoded pairs (chosen + rejected rows)
    answer_tokens: int = 0  # of which answer tokens (carrying the loss)
    errors: list[str] = field(default_factory=list)  # first drops, "file:line: why"

    def drop(self, reason: str, where: str | None = None, why: str | None = None) -> None:
        self.dropped[reason] += 1
        if where is not None and len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{where}: {why or reason}")

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "fixes": dict(self.fixes),
                "encoded": self.encoded, "tokens": self.tokens, "answer_tokens": self.answer_tokens,
                "errors": self.errors}

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        fixes = ", ".join(f"{k} {v}" for k, v in sorted(self.fixes.items())) or "none"
        enc = (f"; {self.encoded} encoded, {self.tokens:,} tokens ({self.answer_tokens:,} answer)"
               if self.encoded else "")
        return (f"{self.read} records read, {self.kept} kept, {sum(self.dropped.values())} dropped ({drops}); "
                f"fixes: {fixes}{enc}")


# ----------------------------------------------------------------------------- reading


def margin_of(rec: dict) -> float:
    if "margin" in rec:
        m = rec["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise BadRecord("malformed", f"'margin' must be a number, got {m!r}")
        return float(m)
    if "rating" in rec:
        r = rec["rating"]
        key = r.strip().lower() if isinstance(r, str) else None
        if key not in RATING_MARGIN:
            raise BadRecord("malformed", f"'rating' must be one of significantly better, better, slightly better, "
                                         f"negligibly better / unsure; got {r!r}")
        return RATING_MARGIN[key]
    return 0.0


def parse_messages(value: Any, name: str) -> list[dict]:
    """A record's role/content list (``name``: its field, for errors) -> ``[{"role", "content"}]`` with the
    roles mapped to user/assistant/system (ShareGPT's ``from`` and role names as SFT reads them). Raises
    :class:`~llamalab.finetune.data.BadRecord` (``malformed``) naming the field and index."""
    if not isinstance(value, list):
        raise BadRecord("malformed", f"'{name}' must be a string or a list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRecord("malformed", f"{name}[{i}]: expected {{'role': str, 'content': str}}")
        raw = m.get("role", m.get("from"))
        role = ROLE_MAP.get(raw.lower()) if isinstance(raw, str) else None
        if role is None:
            raise BadRecord("malformed", f"{name}[{i}].role: unknown role {raw!r}")
        out.append({"role": role, "content": m["content"]})
    return out


def clean_prompt(msgs: list[dict], fixes: Counter) -> list[dict]:
    """system? then user/assistant alternating, ending with user (fixes counted; BadRecord otherwise)."""
    system = [msgs[0]] if msgs and msgs[0]["role"] == "system" else []
    turns = msgs[len(system):]
    if any(m["role"] == "system" for m in turns):
        raise BadRecord("malformed", "a system message after the first turn")
    if turns and turns[0]["role"] == "assistant":
        while turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
        fixes["leading_assistant_dropped"] += 1
    merged: list[dict] = []
    for m in turns:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
            fixes["same_role_merged"] += 1
        else:
            merged.append(dict(m))
    if not merged:
        raise BadRecord("no_prompt", "no user turn in the prompt")
    if merged[-1]["role"] != "user":
        raise BadRecord("prompt_not_user", "the prompt does not end with a user turn")
    return system + merged


def _answer(value: Any, name: str) -> tuple[list[dict] | None, str]:
    """(conversation before the answer or None, answer text) of a chosen/rejected field."""
    if isinstance(value, str):
        return None, value
    msgs = parse_messages(value, name)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise BadRecord("malformed", f"'{name}' as a list must end with an assistant message")
    return (msgs[:-1] or None), msgs[-1]["content"]


def pair_from_record(rec: Any) -> tuple[list[dict], str, str, float]:
    """``pairs`` format -> (raw prompt messages, chosen, rejected, margin)."""
    if not isinstance(rec, dict):
        raise BadRecord("malformed", f"expected an object with prompt/chosen/rejected, got {type(rec).__name__}")
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise BadRecord("malformed", f"field {k!r} missing")
    ctx_c, chosen = _answer(rec["chosen"], "chosen")
    ctx_r, rejected = _answer(rec["rejected"], "rejected")
    key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
    if key is not None:
        p = rec[key]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else parse_messages(p, key)
        for ctx in (ctx_c, ctx_r):  # whole conversations repeat the prompt: it must be that prompt
            if ctx is not None and ctx != prompt:
                raise BadRecord("prompt_mismatch", f"the turns before the answer differ from '{key}'")
    elif ctx_c is not None:
        if ctx_r is not None and ctx_r != ctx_c:
            raise BadRecord("prompt_mismatch", "chosen and rejected conversations differ before the answer")
        prompt = ctx_c
    else:
        raise BadRecord("malformed", "no 'prompt' or 'messages' (and chosen/rejected are not conversations)")
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise BadRecord("malformed", "'system' must be a string")
        if not prompt or prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}] + prompt
    return prompt, chosen, rejected, margin_of(rec)


def hh_turns(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}] (contents stripped)."""
    pieces = HH_TURN.split(text)
    if pieces[0].strip():
        raise BadRecord("malformed", "text before the first '\\n\\nHuman:' turn")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(pieces[1::2], pieces[2::2])]


def hh_from_record(rec: Any) -> tuple[list[dict], str, str, float]:
    """``hh`` format -> (raw prompt messages, chosen, rejected, margin)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("chosen"), str) or not isinstance(rec.get("rejected"), str):
        raise BadRecord("malformed", "expected {'chosen': str, 'rejected': str} (HH-RLHF dialogues)")
    cut = []
    for k in ("chosen", "rejected"):
        i = rec[k].rfind(HH_ASSISTANT)
        if i < 0:
            raise BadRecord("malformed", f"'{k}' has no '\\n\\nAssistant:' turn")
        cut.append((rec[k][:i], rec[k][i + len(HH_ASSISTANT):]))
    (pc, chosen), (pr, rejected) = cut
    if pc != pr:
        raise BadRecord("prompt_mismatch", "chosen and rejected dialogues differ before the last assistant turn")
    return hh_turns(pc), chosen.strip(), rejected.strip(), margin_of(rec)


def detect_format(rec: Any) -> str:
    if isinstance(rec, dict) and "prompt" not in rec and "messages" not in rec and isinstance(rec.get("chosen"), str):
        return "hh"
    return "pairs"


def read_preferences(paths: Sequence[str | Path], fmt: str = "auto", limit: int = 0,
                     on_error: str = "raise") -> tuple[list[PreferencePair], PreferenceLedger]:
    """Every record of ``paths`` as a :class:`PreferencePair`, or a counted drop (module docstring)."""
    if fmt not in FORMATS:
        raise LlamalabError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if on_error not in ("raise", "skip"):
        raise LlamalabError(f"on_error: must be raise or skip, got {on_error!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    ledger = PreferenceLedger()
    out: list[PreferencePair] = []
    bar = Progress(limit or None, "preference data", unit="records", every=5.0)
    for path in paths:
        for where, rec in iter_records(path):
            if limit and ledger.read >= limit:
                break
            ledger.read += 1
            pair = _one(where, rec, fmt, on_error, ledger)
            if pair is not None:
                out.append(pair)
            bar.update(1)
    bar.close()
    ledger.kept = len(out)
    return out, ledger


def _one(where: str, rec: Any, fmt: str, on_error: str, ledger: PreferenceLedger) -> PreferencePair | None:
    fixes: Counter = Counter()
    f = detect_format(rec) if fmt == "auto" else fmt
    try:
        if isinstance(rec, json.JSONDecodeError):
            raise BadRecord("malformed", f"invalid JSON ({rec.msg}, column {rec.colno})")
        raw, chosen, rejected, margin = hh_from_record(rec) if f == "hh" else pair_from_record(rec)
        prompt = clean_prompt(raw, fixes)
        if not chosen.strip() or not rejected.strip():
            raise BadRecord("empty_answer", f"empty {'chosen' if not chosen.strip() else 'rejected'} answer")
        if chosen.strip() == rejected.strip():
            raise BadRecord("identical", "chosen and rejected are the same answer")
    except BadRecord as e:
        if e.reason == "malformed" and on_error == "raise":
            raise LlamalabError(f"{where}: {e} (format {f}; --on-error skip counts and skips such records)") from None
        ledger.drop(e.reason, where, str(e))
        return None
    ledger.fixes.update(fixes)
    return PreferencePair(prompt, chosen, rejected, margin, where)


def prompt_key(prompt: list[dict]) -> str:
    """A prompt's identity: its (role, content) turns as JSON (equal prompts, equal keys)."""
    return json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)


def prompts_of(pairs: Iterable[PreferencePair]) -> list[list[dict]]:
    """The distinct prompts, in first-seen order."""
    seen: dict[str, list[dict]] = {}
    for p in pairs:
        seen.setdefault(prompt_key(p.prompt), p.prompt)
    return list(seen.values())

# ---------------------------------------------- prompts (PPO, rejection sampling), records to score (``rm score``)


@dataclass
class PromptLedger:
    """Records read, prompts kept, dropped by reason (first ``file:line`` examples), duplicates."""

    read: int = 0
    kept: int = 0
    duplicates: int = 0
    dropped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def drop(self, reason: str, where: str, why: str) -> None:
        self.dropped[reason] += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{where}: {why}")

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "duplicates": self.duplicates, "dropped": dict(self.dropped),
                "errors": self.errors}


def prompt_of_record(rec: Any, fmt: str = "auto") -> list[dict]:
    """The prompt of one record: a preference pair's (``pairs``/``hh`` by ``fmt``), ``{"prompt": str | messages}``
    or ``{"messages": [... ending with a user turn]}``, cleaned as pairs are. Raises
    :class:`~llamalab.finetune.data.BadRecord`."""
    if isinstance(rec, dict) and ("chosen" in rec or "rejected" in rec):
        return record_conversations(rec, fmt)[1][0][:-1]
    if not isinstance(rec, dict) or ("prompt" not in rec and "messages" not in rec):
        raise BadRecord("malformed", "expected {'prompt': str | messages}, {'messages': [...]} or a preference pair")
    p = rec.get("prompt", rec.get("messages"))
    msgs = [{"role": "user", "content": p}] if isinstance(p, str) else parse_messages(p, "prompt")
    return clean_prompt(msgs, Counter())


def read_prompts(paths: Sequence[str | Path], fmt: str = "auto", limit: int = 0,
                 on_error: str = "raise") -> tuple[list[tuple[str, list[dict]]], PromptLedger]:
    """The distinct prompts of ``paths`` in first-seen order, as (file:line, messages): a preference file's
    prompts (``pairs``/HH-RLHF; each distinct prompt once) or prompt records (:func:`prompt_of_record`). Duplicates
    are counted (``ledger.duplicates``); malformed records raise naming file:line, or are counted under
    ``on_error="skip"``; other bad records are dropped with their reason. PPO and rejection sampling read prompts
    by this."""
    ledger = PromptLedger()
    seen: set[str] = set()
    out: list[tuple[str, list[dict]]] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for where, rec in iter_records(path):
            if limit and ledger.read >= limit:
                break
            ledger.read += 1
            try:
                if isinstance(rec, json.JSONDecodeError):
                    raise BadRecord("malformed", f"invalid JSON ({rec.msg}, column {rec.colno})")
                prompt = prompt_of_record(rec, fmt)
            except BadRecord as e:
                if e.reason == "malformed" and on_error == "raise":
                    raise LlamalabError(f"{where}: {e} (--on-error skip counts and skips such records)") from None
                ledger.drop(e.reason, where, str(e))
                continue
            key = prompt_key(prompt)
            if key in seen:
                ledger.duplicates += 1
                continue
            seen.add(key)
            out.append((where, prompt))
    ledger.kept = len(out)
    return out, ledger


ANSWER_FIELDS = ("answer", "response", "completion", "output")


def record_conversations(rec: Any, fmt: str = "auto") -> tuple[str, list[list[dict]]]:
    """One record of a file to score -> ("pair", [prompt+chosen, prompt+rejected]) for a preference pair (``pairs``
    or ``hh`` format, as :func:`llamalab.align.data.read_preferences` reads them), or ("answer", [conversation])
    for ``{"prompt": str | messages, "answer" | "response" | "completion" | "output": str}`` or ``{"messages":
    [..., {"role": "assistant", ...}]}``. Raises :class:`~llamalab.finetune.data.BadRecord`."""
    if not isinstance(rec, dict):
        raise BadRecord("malformed", f"expected a JSON object, got {type(rec).__name__}")
    if "chosen" in rec or "rejected" in rec:
        f = detect_format(rec) if fmt == "auto" else fmt
        raw, chosen, rejected, _ = hh_from_record(rec) if f == "hh" else pair_from_record(rec)
        prompt = clean_prompt(raw, Counter())
        return "pair", [prompt + [{"role": "assistant", "content": a}] for a in (chosen, rejected)]
    key = next((k for k in ANSWER_FIELDS if k in rec), None)
    if key is not None:
        if not isinstance(rec[key], str):
            raise BadRecord("malformed", f"'{key}' must be a string")
        p = rec.get("prompt", rec.get("messages"))
        if p is None:
            raise BadRecord("malformed", f"'{key}' needs a 'prompt' (a string or role/content messages)")
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else parse_messages(p, "prompt")
        return "answer", [clean_prompt(prompt, Counter()) + [{"role": "assistant", "content": rec[key]}]]
    if "messages" in rec:
        msgs = parse_messages(rec["messages"], "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise BadRecord("malformed", "'messages' must end with the assistant answer to score")
        return "answer", [clean_prompt(msgs[:-1], Counter()) + msgs[-1:]]
    raise BadRecord("malformed", f"expected chosen/rejected (a pair), prompt + one of {'/'.join(ANSWER_FIELDS)}, "
                                 f"or messages ending with an assistant turn")


def _hash01(key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_prompt(pairs: list[PreferencePair], heldout_fraction: float,
                    seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): a prompt is held out when a seeded sha256 of its text falls below the fraction, so every
    pair of one prompt lands on the same side, and a pair's side does not depend on the rest of the file.
    With a fraction > 0 at least one prompt is held out."""
    if not 0 <= heldout_fraction < 1:
        raise LlamalabError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction}")
    if not heldout_fraction or not pairs:
        return list(pairs), []
    score = {k: _hash01(k, seed) for k in {prompt_key(p.prompt) for p in pairs}}
    held = {k for k, s in score.items() if s < heldout_fraction} or {min(score, key=score.get)}
    if len(held) == len(score):
        raise LlamalabError(f"--heldout-fraction {heldout_fraction} leaves no training prompts "
                            f"({len(score)} distinct prompts)")
    train = [p for p in pairs if prompt_key(p.prompt) not in held]
    return train, [p for p in pairs if prompt_key(p.prompt) in held]


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedPair:
    chosen: list[int]  # rendered prompt + answer (+ end of turn)
    rejected: list[int]
    prompt_len: int  # tokens of the shared prompt (answer tokens start here in both rows)
    margin: float
    chosen_mask: list[int] = field(default_factory=list)  # 1 on answer tokens (the ones that carry the loss)
    rejected_mask: list[int] = field(default_factory=list)
    where: str = ""


def _answer_ids(prompt: list[dict], answer: str, template: str, tok: Any) -> tuple[list[int], list[int], int]:
    """(ids, answer mask, start of the answer) of ``prompt + [assistant: answer]``."""
    ids, mask = render(prompt + [{"role": "assistant", "content": answer}], template, tok, add_generation_prompt=False)
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return ids, [0] * start + mask[start:end] + [0] * (len(mask) - end), start


def encode_pairs(pairs: Iterable[PreferencePair], tokenizer: Any, template: str, max_len: int,
                 ledger: PreferenceLedger) -> list[EncodedPair]:
    """Render each pair's two conversations (module docstring); drops counted in ``ledger``."""
    out: list[EncodedPair] = []
    for p in pairs:
        if not p.chosen.strip() or not p.rejected.strip():
            _drop(ledger, "empty_answer", p.where, "empty answer")
            continue
        if p.chosen.strip() == p.rejected.strip():
            _drop(ledger, "identical", p.where, "chosen and rejected are the same answer")
            continue
        c, cm, cs = _answer_ids(p.prompt, p.chosen, template, tokenizer)
        r, rm, rs = _answer_ids(p.prompt, p.rejected, template, tokenizer)
        start = min(cs, rs)
        if start >= max_len:  # not one answer token fits
            _drop(ledger, "prompt_too_long", p.where, f"prompt of {start} tokens leaves no room in max_len {max_len}")
            continue
        if not any(cm) or not any(rm):
            _drop(ledger, "empty_answer", p.where, "an answer renders to no tokens")
            continue
        if len(c) > max_len or len(r) > max_len:
            c, cm, r, rm = c[:max_len], cm[:max_len], r[:max_len], rm[:max_len]
            if not any(cm) or not any(rm):  # one prompt renders longer than the other's
                _drop(ledger, "prompt_too_long", p.where, f"no answer token of one side fits in max_len {max_len}")
                continue
            if c == r:
                _drop(ledger, "identical_after_truncation", p.where,
                      f"chosen and rejected agree on their first {max_len} tokens")
                continue
            ledger.fixes["truncated"] += 1
        out.append(EncodedPair(c, r, start, p.margin, cm, rm, p.where))
    ledger.encoded += len(out)
    ledger.tokens += sum(len(e.chosen) + len(e.rejected) for e in out)
    ledger.answer_tokens += sum(sum(e.chosen_mask) + sum(e.rejected_mask) for e in out)
    return out


def _drop(ledger: PreferenceLedger, reason: str, where: str, why: str) -> None:
    ledger.drop(reason, where or "(pair)", why)
    ledger.kept -= 1


@dataclass
class PairBatch:
    """N preference pairs as one (2N, T) batch: chosen rows first, then rejected (a ``UnitBatch``: units = N)."""

    tokens: torch.Tensor  # (2N, T) right-padded
    loss_mask: torch.Tensor  # (2N, T) bool: True where tokens[:, t+1] is an answer token
    last_index: torch.Tensor  # (2N,) index of the last real token of each row
    margin: torch.Tensor  # (N,)

    def to(self, device: Any) -> PairBatch:
        return PairBatch(self.tokens.to(device), self.loss_mask.to(device), self.last_index.to(device),
                         self.margin.to(device))

    def units(self) -> int:
        return self.margin.shape[0]

    def n_tokens(self) -> int:
        """Tokens of all 2N rows, padding left out."""
        return int((self.last_index + 1).sum())


def collate_pairs(batch: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """Right-pad the chosen then the rejected rows of ``batch`` to the longest."""
    rows = [e.chosen for e in batch] + [e.rejected for e in batch]
    masks = [e.chosen_mask or _tail_mask(e.chosen, e.prompt_len) for e in batch]
    masks += [e.rejected_mask or _tail_mask(e.rejected, e.prompt_len) for e in batch]
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        loss_mask[i, :len(r) - 1] = torch.tensor(m[1:], dtype=torch.bool)
    last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
    return PairBatch(tokens, loss_mask, last, torch.tensor([e.margin for e in batch], dtype=torch.float32))


def _tail_mask(ids: list[int], start: int) -> list[int]:
    return [0] * start + [1] * (len(ids) - start)


def answer_logprobs(model: torch.nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) summed log-probability of the answer tokens of each row (fp32). Only the answer positions'
    logits are computed (the model's ``keep``), not the (rows, T, vocabulary) tensor."""
    B, T = tokens.shape
    keep = loss_mask.clone()
    keep[:, -1] = False  # position t predicts tokens[:, t+1]
    logits = model(tokens, keep=keep).float()  # (N, V)
    targets = tokens.roll(-1, dims=1)[keep]  # (N,)
    lp = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = torch.arange(B, device=tokens.device)[:, None].expand(B, T)[keep]
    return torch.zeros(B, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
