"""Multi-turn instruction adherence: does turn N still follow the instruction given in turn 1?

The evaluation behind Ghost Attention (Llama 2, section 3.3, Figures 9-10): a model gets an instruction
in the first user turn (or as the system message), then several more user turns without it, and every
answer is checked against that first-turn instruction. The result is the adherence rate per turn (the
per-turn view of Llama 2's figures): a model without GAtt typically forgets the instruction after a few
turns.

Each answer is judged

- by a **rule** where the instruction is rule-checkable (:func:`check_rule`): ``language:fr`` (py3langid,
  the ``data`` extra, says the answer is French), ``emoji_end`` (the last character is an emoji),
  ``max_words:N`` (at most N words), ``lowercase`` (no capital letter), ``include:WORD`` (the word appears,
  any case, as a whole word), ``exclude:WORD`` (it does not);
- by a **judge model** (through :class:`llamalab.synth.client.ChatClient`) for the parts no rule checks
  ("act as Napoleon"): the judge is asked for a one-word yes/no verdict (:data:`JUDGE_TEMPLATE`), parsed by
  :func:`parse_verdict`; a reply with neither word, or a failed request, gives no verdict and is counted
  (``unjudged``), never guessed.

An answer follows the instruction when every rule passes and the judge (if any part needs one) says yes.
Dialogues: a JSONL file of ``{"id"?, "turns": [user messages], "instruction"?: str | {"text", "rule"?...}}``,
ShareGPT / OpenAI-messages records (their user turns), or the built-in set of :data:`DIALOGUES` (10 topics x
4 turns); instructions are drawn per dialogue (seeded) from the rule-checkable defaults of
:mod:`llamalab.synth.gatt` unless the file or ``--instructions`` gives them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError

RULES = ("language", "emoji_end", "max_words", "lowercase", "include", "exclude")
RESULTS_FILE = "adherence.jsonl"  # one line per (dialogue, turn): answer, rule checks, judge reply, verdict
TABLE_FILE = "adherence.json"  # the per-turn table and the run's counts

JUDGE_SYSTEM = "You check whether an AI assistant's reply follows an instruction. You answer with one word."
JUDGE_TEMPLATE = ("At the start of a conversation the user gave the assistant this instruction, meant to hold "
                  "for the whole conversation:\n[Instruction]\n{instruction}\n[End of instruction]\n\n"
                  "Later the user wrote:\n[User]\n{user}\n[End of user]\n\nThe assistant replied:\n"
                  "[Reply]\n{answer}\n[End of reply]\n\nDoes the reply follow the instruction? "
                  "Answer with exactly one word: yes or no.")


# ----------------------------------------------------------------------------- rules


def parse_rule(spec: str) -> tuple[str, str]:
    """``"max_words:20"`` -> ("max_words", "20"); unknown names or bad arguments raise naming the rule."""
    name, _, arg = spec.partition(":")
    name, arg = name.strip(), arg.strip()
    if name not in RULES:
        raise LlamalabError(f"unknown rule {spec!r} (rules: language:CODE, emoji_end, max_words:N, lowercase, "
                            f"include:WORD, exclude:WORD)")
    if name in ("emoji_end", "lowercase") and arg:
        raise LlamalabError(f"rule {spec!r}: {name} takes no argument")
    if name == "max_words" and not (arg.isdigit() and int(arg) > 0):
        raise LlamalabError(f"rule {spec!r}: max_words needs a positive integer, e.g. max_words:20")
    if name == "language" and not re.fullmatch(r"[a-z]{2,3}", arg):
        raise LlamalabError(f"rule {spec!r}: language needs an ISO 639-1 code, e.g. language:fr")
    if name in ("include", "exclude") and not arg:
        raise LlamalabError(f"rule {spec!r}: {name} needs a word, e.g. {name}:banana")
    return name, arg


_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x2300, 0x23FF), (0x2190, 0x21FF),
                 (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3299))
_EMOJI_TAIL = {0xFE0F, 0xFE0E, 0x200D, 0x20E3} | set(range(0xE0020, 0xE0080))  # selectors, joiner, keycap, tags


def is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return any(a <= cp <= b for a, b in _EMOJI_RANGES) or (unicodedata.category(ch) == "So" and cp > 0x2000)


def ends_with_emoji(text: str) -> bool:
    """The last visible character is an emoji (variation selectors, ZWJ, keycaps and tags skipped)."""
    t = text.rstrip()
    while t and ord(t[-1]) in _EMOJI_TAIL:
        t = t[:-1]
    return bool(t) and is_emoji(t[-1])


def detect_language(text: str) -> str:
    """ISO 639-1 code of the text by py3langid (the ``data`` extra)."""
    import py3langid

    return py3langid.classify(text)[0]


def check_rule(spec: str, text: str) -> tuple[bool, str]:
    """(passes, what was seen) for one rule on one answer."""
    name, arg = parse_rule(spec)
    if name == "language":
        letters = sum(ch.isalpha() for ch in text)
        if letters < 3:
            return False, "no text to identify"
        lang = detect_language(text)
        return lang == arg, f"language {lang}"
    if name == "emoji_end":
        t = text.rstrip()
        return ends_with_emoji(t), f"ends with {t[-1:]!r}" if t else "empty"
    if name == "max_words":
        n = len(text.split())
        return n <= int(arg), f"{n} words"
    if name == "lowercase":
        upper = [ch for ch in text if ch.isupper()]
        return not upper, f"{len(upper)} capital letters" if upper else "no capital letter"
    found = re.search(rf"(?<!\w){re.escape(arg)}(?!\w)", text, flags=re.IGNORECASE) is not None
    if name == "include":
        return found, f"{arg!r} {'found' if found else 'absent'}"
    return not found, f"{arg!r} {'found' if found else 'absent'}"  # exclude


# ----------------------------------------------------------------------------- judge


def judge_messages(instruction: str, user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(instruction=instruction, user=user, answer=answer)}]


def parse_verdict(text: str) -> bool | None:
    """The judge's yes/no: the first standalone "yes" or "no" (any case, brackets and punctuation allowed);
    None when there is neither, or both appear in the first sentence ("yes and no")."""
    words = re.findall(r"[a-z]+", text.lower())
    first = next((w for w in words if w in ("yes", "no")), None)
    if first is None:
        return None
    head = re.split(r"[.!?\n]", text.strip().lower(), maxsplit=1)[0]
    hw = re.findall(r"[a-z]+", head)
    if "yes" in hw and "no" in hw:
        return None
    return first == "yes"


# ----------------------------------------------------------------------------- dialogues

# Ten everyday topics, four user turns each (written for llamalab; no instruction in them).
DIALOGUES: list[list[str]] = [
    ["What is a good way to start learning to cook?", "Which three dishes should I learn first?",
     "How do I know when pasta is done?", "Any tips for cleaning up quickly afterwards?"],
    ["Can you explain what a black hole is?", "How do scientists find them if light cannot escape?",
     "What would happen if I fell into one?", "Is there one close to Earth?"],
    ["I want to start running. How should I begin?", "How often should I run each week?",
     "What shoes do I need?", "How do I avoid getting injured?"],
    ["Why do leaves change colour in autumn?", "Why do some trees keep their leaves all year?",
     "What is photosynthesis, briefly?", "Can plants grow without sunlight?"],
    ["How does a bicycle stay upright?", "Why is it harder to balance when going slowly?",
     "How do gears on a bike work?", "Should I buy a road bike or a mountain bike?"],
    ["What is the difference between weather and climate?", "How are weather forecasts made?",
     "Why are forecasts less accurate a week ahead?", "What causes thunderstorms?"],
    ["Give me advice for a job interview.", "How should I answer a question about my weaknesses?",
     "What questions should I ask the interviewer?", "How soon should I follow up afterwards?"],
    ["How do vaccines work?", "Why do some vaccines need boosters?",
     "What is herd immunity?", "How long does it take to develop a new vaccine?"],
    ["What is a good houseplant for a beginner?", "How often should I water it?",
     "Its leaves are turning yellow. What is wrong?", "Can I keep it in a room without windows?"],
    ["How do I save money on groceries?", "Is it worth buying in bulk?",
     "How can I plan meals for a week?", "What should I always keep in the pantry?"],
]


@dataclass
class EvalDialogue:
    id: str
    turns: list[str]
    instruction: Any = None  # an Instruction fixed by the file, else drawn per dialogue


def builtin_dialogues() -> list[EvalDialogue]:
    return [EvalDialogue(f"builtin-{i + 1}", list(t)) for i, t in enumerate(DIALOGUES)]


def _instruction_field(value: Any, where: str) -> Any:
    from llamalab.synth.gatt import Constraint, Instruction

    items = value if isinstance(value, list) else [value]
    parts = []
    for it in items:
        if isinstance(it, str) and it.strip():
            parts.append(Constraint(it.strip(), kind="custom"))
        elif isinstance(it, dict) and isinstance(it.get("text"), str) and it["text"].strip():
            rule = it.get("rule", "")
            if rule:
                try:
                    parse_rule(rule)
                except LlamalabError as e:
                    raise LlamalabError(f"{where}: field 'instruction.rule': {e}") from None
            parts.append(Constraint(it["text"].strip(), it.get("short", ""), it.get("kind") or "custom", rule))
        else:
            raise LlamalabError(f"{where}: field 'instruction' must be a non-empty string, an object "
                                f"{{text, rule?}} or a list of them")
    return Instruction(parts)


def read_eval_dialogues(path: str | Path, turns: int, limit: int = 0) -> tuple[list[EvalDialogue], dict[str, int]]:
    """Dialogues from a JSONL/JSON file (``{"turns": [...]}`` or ShareGPT / messages records); records with
    fewer than ``turns`` user turns are skipped and counted; longer ones keep their first ``turns``."""
    from llamalab.finetune.data import BadRecord, iter_records, sharegpt_messages

    out: list[EvalDialogue] = []
    skipped: dict[str, int] = defaultdict(int)
    for n, (where, rec) in enumerate(iter_records(path), 1):
        if limit and len(out) >= limit:
            break
        if isinstance(rec, json.JSONDecodeError):
            raise LlamalabError(f"{where}: invalid JSON ({rec.msg})")
        if not isinstance(rec, dict):
            raise LlamalabError(f"{where}: expected an object with 'turns' or 'conversations'")
        did = str(rec.get("id", n))
        if "turns" in rec:
            users = rec["turns"]
            if not isinstance(users, list) or not all(isinstance(u, str) and u.strip() for u in users):
                raise LlamalabError(f"{where}: field 'turns' must be a list of non-empty strings")
        else:
            try:
                users = [m["content"] for m in sharegpt_messages(rec, defaultdict(int)) if m["role"] == "user"]
            except BadRecord as e:
                skipped[e.reason] += 1
                continue
        if len(users) < turns:
            skipped["too_few_turns"] += 1
            continue
        inst = _instruction_field(rec["instruction"], where) if rec.get("instruction") else None
        out.append(EvalDialogue(did, list(users[:turns]), inst))
    return out, dict(skipped)


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class AdherenceOptions:
    turns: int = 4
    placement: str = "user"  # the instruction in the first user turn, or as the system message
    temperature: float = 0.0
    max_tokens: int = 128
    seed: int = 1234


def first_messages(instruction: str, placement: str) -> tuple[list[dict[str, str]], str]:
    """(prefix messages, text to put before the first user turn) for the instruction's placement."""
    if placement == "system":
        return [{"role": "system", "content": instruction}], ""
    return [], instruction


def verdict_rows(dialogues: Sequence[EvalDialogue], insts: Sequence[Any], rolls: Sequence[Any],
                 judge_many: Any = None) -> list[dict[str, Any]]:
    """One row per answered (dialogue, turn): rule checks, the judge's reply (parts no rule checks), verdict."""
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, list[dict[str, str]]]] = []
    for d, inst, r in zip(dialogues, insts, rolls):
        for k in range(len(d.turns)):
            row: dict[str, Any] = {"dialogue": d.id, "turn": k + 1, "instruction": inst.text, "kinds": inst.kinds,
                                   "rules": inst.rules, "user": d.turns[k]}
            if k >= len(r.answers):
                row.update(answer=None, error=r.error or "not answered", followed=None, method="none")
                rows.append(row)
                continue
            a = r.answers[k]
            checks = [dict(zip(("rule", "ok", "detail"), (rule, *check_rule(rule, a)))) for rule in inst.rules]
            row.update(answer=a, finish_reason=r.finish[k], rule_checks=checks, error=None)
            judged = inst.judged
            row["method"] = "+".join(m for m, on in (("rule", bool(checks)), ("judge", bool(judged))) if on)
            rule_ok = all(c["ok"] for c in checks)
            if judged:
                if judge_many is None:
                    row.update(followed=None, judge={"error": "no judge (give --judge.base-url)"})
                else:
                    text = " ".join(p.text for p in judged)
                    pending.append((len(rows), judge_messages(text, d.turns[k], a)))
                    row["followed"] = rule_ok  # combined with the verdict below
            else:
                row["followed"] = rule_ok
            rows.append(row)
    if pending:
        replies = judge_many([(m, {"temperature": 0.0, "max_tokens": 8}) for _, m in pending], "judge")
        for (i, msgs), rep in zip(pending, replies):
            verdict = None if rep.error else parse_verdict(rep.text)
            rows[i]["judge"] = {"prompt": msgs[-1]["content"], "reply": rep.text, "error": rep.error,
                                "verdict": verdict, "cached": rep.cached}
            rows[i]["followed"] = None if verdict is None else (rows[i]["followed"] and verdict)
    return rows


def per_turn_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per turn: answers, judged (a verdict reached), followed, rate = followed / judged; also per kind."""
    by: dict[int, dict[str, Any]] = {}
    for r in rows:
        t = by.setdefault(r["turn"], {"turn": r["turn"], "answers": 0, "judged": 0, "followed": 0, "unjudged": 0,
                                      "unanswered": 0, "by_kind": defaultdict(lambda: [0, 0])})
        if r.get("answer") is None:
            t["unanswered"] += 1
            continue
        t["answers"] += 1
        if r["followed"] is None:
            t["unjudged"] += 1
            continue
        t["judged"] += 1
        t["followed"] += int(r["followed"])
        for kind in set(r["kinds"]):
            t["by_kind"][kind][0] += int(r["followed"])
            t["by_kind"][kind][1] += 1
    out = []
    for k in sorted(by):
        t = by[k]
        t["rate"] = t["followed"] / t["judged"] if t["judged"] else None
        t["by_kind"] = {kind: {"followed": f, "judged": n, "rate": f / n}
                        for kind, (f, n) in sorted(t["by_kind"].items())}
        out.append(t)
    return out


def format_table(table: Sequence[dict[str, Any]]) -> str:
    """The per-turn table as Markdown (the same rows the report shows)."""
    kinds = sorted({k for t in table for k in t["by_kind"]})
    head = "| turn | answers | judged | followed | adherence |" + "".join(f" {k} |" for k in kinds)
    sep = "|---" * (5 + len(kinds)) + "|"
    lines = [head, sep]
    for t in table:
        rate = "-" if t["rate"] is None else f"{t['rate']:.0%}"
        cells = []
        for k in kinds:
            c = t["by_kind"].get(k)
            cells.append(f" {c['followed']}/{c['judged']} |" if c else " - |")
        lines.append(f"| {t['turn']} | {t['answers']} | {t['judged']} | {t['followed']} | {rate} |" + "".join(cells))
    return "\n".join(lines)


@dataclass
class AdherenceResult:
    rows: list[dict[str, Any]]
    table: list[dict[str, Any]]
    skipped: dict[str, int] = field(default_factory=dict)


def evaluate_adherence(dialogues: Sequence[EvalDialogue], constraints: Sequence[Any], chat_many: Any,
                       judge_many: Any, opts: AdherenceOptions, combine: float = 0.0) -> AdherenceResult:
    """Answer every dialogue turn by turn (the instruction in the first turn only), then judge each answer."""
    from llamalab.synth.gatt import Rollout, dialogue_rng, request_seed, rollout, sample_instruction, with_instruction

    insts, rolls = [], []
    for d in dialogues:
        inst = d.instruction or sample_instruction(dialogue_rng(opts.seed, d.id), constraints, combine)
        prefix, lead = first_messages(inst.text, opts.placement)
        users = [with_instruction(lead, d.turns[0]) if lead else d.turns[0]] + list(d.turns[1:])
        insts.append(inst)
        rolls.append(Rollout(prefix, users))

    def params(i: int, k: int) -> dict:
        return {"temperature": opts.temperature, "max_tokens": opts.max_tokens,
                "seed": request_seed(opts.seed, dialogues[i].id, k)}

    rollout(rolls, chat_many, params, label="answers, turn")
    rows = verdict_rows(dialogues, insts, rolls, judge_many)
    return AdherenceResult(rows, per_turn_table(rows))


# ----------------------------------------------------------------------------- report


def adherence_plot(table: Sequence[dict[str, Any]], label: str) -> str | None:
    """Adherence rate per turn, overall and per instruction kind, as a PNG data URI (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import base64
    import io

    fig, ax = plt.subplots(figsize=(6, 3.6))
    turns = [t["turn"] for t in table]
    ax.plot(turns, [100 * (t["rate"] or 0) for t in table], "o-", lw=2.5, color="black", label=f"{label} (all)")
    for kind in sorted({k for t in table for k in t["by_kind"]}):
        pts = [(t["turn"], 100 * t["by_kind"][kind]["rate"]) for t in table if kind in t["by_kind"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", lw=1, alpha=0.8, label=kind)
    ax.set_xlabel("dialogue turn")
    ax.set_ylabel("answers following the turn-1 instruction (%)")
    ax.set_ylim(-5, 105)
    ax.set_xticks(turns)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def adherence_report(meta: dict[str, Any], result: AdherenceResult, samples: int = 2) -> str:
    """report.html of an adherence run: settings, the per-turn table and plot, sample dialogues with verdicts."""
    import html

    from llamalab.synth.gatt import html_page, html_table

    client = meta.get("client", {})
    judge = meta.get("judge") or {}
    label = client.get("model") or "model"
    body = "<h2>Run</h2>" + html_table(["setting", "value"], [
        ["model", label], ["endpoint", client.get("endpoint")],
        ["judge", f"{judge.get('model')} at {judge.get('endpoint')}" if judge else "none (rules only)"],
        ["dialogues", meta.get("dialogues")], ["turns", meta.get("options", {}).get("turns")],
        ["placement", meta.get("options", {}).get("placement")],
        ["skipped dialogues", json.dumps(result.skipped) if result.skipped else "none"]])
    kinds = sorted({k for t in result.table for k in t["by_kind"]})
    rows = [[t["turn"], t["answers"], t["judged"], t["followed"], "-" if t["rate"] is None else f"{t['rate']:.0%}",
             t["unjudged"], t["unanswered"]] + [(f"{t['by_kind'][k]['followed']}/{t['by_kind'][k]['judged']}"
                                               if k in t["by_kind"] else "-") for k in kinds] for t in result.table]
    body += "<h2>Adherence per turn</h2>" + html_table(
        ["turn", "answers", "judged", "followed", "adherence", "no verdict", "not answered"] + kinds, rows)
    img = adherence_plot(result.table, label)
    body += f"<img src='{img}' alt='adherence per turn'>" if img else "<p>(plot needs matplotlib: the report extra)</p>"
    shown: list[str] = []
    for r in result.rows:
        if r["dialogue"] not in shown:
            if len(shown) >= samples:
                break
            shown.append(r["dialogue"])
            body += f"<h3>Dialogue {html.escape(r['dialogue'])}: {html.escape(r['instruction'])}</h3>"
        verdict = {True: "follows", False: "does not follow", None: "no verdict"}[r["followed"]]
        checks = "; ".join(f"{c['rule']}: {'ok' if c['ok'] else 'FAIL'} ({c['detail']})"
                           for c in r.get("rule_checks", []))
        body += (f"<p><b>turn {r['turn']}</b> user: {html.escape(r['user'])}</p><pre>{html.escape(r['answer'] or '')}"
                 f"</pre><p>{verdict} {html.escape(checks)}</p>")
    return html_page("Multi-turn instruction adherence", body)


# ----------------------------------------------------------------------------- the stage


def run_adherence(out: str | Path, client: Any, judge: Any, dialogues: Sequence[EvalDialogue],
                  constraints: Sequence[Any], opts: AdherenceOptions, combine: float = 0.0,
                  skipped: dict[str, int] | None = None, config: dict[str, Any] | None = None,
                  instructions_source: str = "default") -> tuple[AdherenceResult, dict[str, Any]]:
    """Evaluate, then write ``adherence.jsonl`` (every answer and verdict), ``adherence.json`` (the table),
    meta.json and report.html under ``out``."""
    import time

    from llamalab.common import git_sha, package_versions, write_json_atomic
    from llamalab.run_dir import RunDir
    from llamalab.synth.gatt import constraints_sha256, write_jsonl

    if opts.placement not in ("user", "system"):
        raise LlamalabError(f"placement: must be user or system, got {opts.placement!r}")
    if opts.turns < 1:
        raise LlamalabError(f"turns: must be >= 1, got {opts.turns}")
    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = evaluate_adherence(dialogues, constraints, client.chat_many, judge.chat_many if judge else None, opts,
                                combine)
    result.skipped = dict(skipped or {})
    write_jsonl(run / RESULTS_FILE, result.rows)
    meta = {"kind": "adherence", "config": config or {}, "client": client.describe(), "requests": dict(client.stats),
            "judge": judge.describe() if judge else None, "judge_requests": dict(judge.stats) if judge else None,
            "judge_prompt_sha256": _sha256(JUDGE_SYSTEM + JUDGE_TEMPLATE),
            "instructions": {"source": instructions_source, "count": len(constraints),
                             "sha256": constraints_sha256(constraints)},
            "options": {**opts.__dict__, "combine": combine}, "dialogues": len(dialogues),
            "skipped": result.skipped, "seconds": time.perf_counter() - t0, "git_sha": git_sha(),
            "versions": package_versions()}
    write_json_atomic(run / TABLE_FILE, {"table": result.table, "markdown": format_table(result.table)})
    write_json_atomic(run.meta, meta)
    run.report.write_text(adherence_report(meta, result), encoding="utf-8")
    return result, meta


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()
