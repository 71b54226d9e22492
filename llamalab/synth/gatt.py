"""Ghost Attention (GAtt) data: Llama 2's recipe for an instruction that holds over many turns.

Touvron et al. 2023b (Llama 2), section 3.3: take multi-turn dialogues ``[u1, a1, ..., un, an]`` and an
instruction ``inst`` that should be respected throughout ("act as Napoleon", "speak in French", "you
enjoy tennis"...); concatenate ``inst`` to *every* user message and sample the assistant answers again
with the model, turn by turn, each answer conditioned on the regenerated history; then keep the
instruction only in the first turn (or as the system message) and train on the result with the loss set
to 0 "for all the tokens from the previous turns, including assistant messages", so only the last
answer is a target while the earlier ones (which saw the instruction in every turn) are mere context.

What this module does:

- **instructions** (:class:`Constraint`, :class:`Instruction`): a small default list in Llama 2's spirit
  (public figures, languages, hobbies, and rule-checkable styles: end with an emoji, at most N words, all
  lowercase, include a word), combined at random (two constraints of different kinds with probability
  ``combine``); Llama 2 also rewrote the training instruction "half of the time to be less verbose"
  (``short_fraction``: "Figure: Napoleon."). A file replaces the list: JSONL ``{"text", "short"?, "kind"?,
  "rule"?}`` or plain text, one constraint per line. Rules are :mod:`llamalab.eval.adherence` checks.
- **dialogues**: ShareGPT / OpenAI-messages records, read and normalised as ``llamalab sft --format
  sharegpt`` reads them (:func:`llamalab.finetune.data.sharegpt_messages`); only the user turns are used.
- **rollout** (:func:`rollout`): turn by turn, every live dialogue's next request goes out in one
  :meth:`~llamalab.synth.client.ChatClient.chat_many` call (concurrent, cached: a rerun sends nothing
  it already has an answer to). A failed reply ends that dialogue at the last good turn.
- **output**: ShareGPT records that ``llamalab sft --format sharegpt`` trains on directly: every assistant
  turn but the last has ``"weight": 0`` (:mod:`llamalab.finetune.data`). ``every_turn`` writes one
  record per turn instead (the prefix ending at turn k, only answer k trained), so no answer is wasted.
  ``check_rules`` drops answers that break a rule-checkable instruction (rejection sampling on the rule):
  the dialogue is cut before the first failing turn.

Every dialogue dropped or cut is counted with its reason in the ledger (``dropped.jsonl`` names each one).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError

KINDS = ("figure", "language", "hobby", "emoji", "length", "case", "word")
PLACEMENTS = ("user", "system")
GATT_FILE = "gatt.jsonl"  # the training dialogues (ShareGPT with per-turn weights)
DROPPED_FILE = "dropped.jsonl"  # one line per dialogue dropped or cut, with its reason
SAMPLES_FILE = "rollouts.jsonl"  # every regenerated dialogue as sampled (instruction in every user turn)


@dataclass(frozen=True)
class Constraint:
    """One part of an instruction. ``rule`` is an :mod:`llamalab.eval.adherence` rule ('' = judged by a model)."""

    text: str
    short: str = ""
    kind: str = "custom"
    rule: str = ""


@dataclass
class Instruction:
    """One or more constraints given together (Llama 2 "randomly combine the above constraints")."""

    parts: list[Constraint]

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.parts)

    @property
    def short(self) -> str:
        return " ".join(p.short or p.text for p in self.parts)

    @property
    def rules(self) -> list[str]:
        return [p.rule for p in self.parts if p.rule]

    @property
    def judged(self) -> list[Constraint]:
        """The parts no rule can check (a judge model decides them)."""
        return [p for p in self.parts if not p.rule]

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.parts]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "parts": [asdict(p) for p in self.parts]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Instruction":
        return cls([Constraint(**p) for p in d["parts"]])


FIGURES = ["Napoleon", "Sherlock Holmes", "Marie Curie", "William Shakespeare", "a pirate captain",
           "Albert Einstein", "Cleopatra", "a medieval knight"]
LANGUAGES = {"French": "fr", "Spanish": "es", "German": "de", "Italian": "it", "Portuguese": "pt"}
HOBBIES = ["tennis", "gardening", "chess", "astronomy", "baking", "hiking", "painting", "birdwatching"]
STYLES = [  # (text, short, kind, rule)
    ("Always end your answer with an emoji.", "End: emoji.", "emoji", "emoji_end"),
    ("Answer in at most 20 words.", "Length: at most 20 words.", "length", "max_words:20"),
    ("Write only in lowercase letters.", "Case: lowercase only.", "case", "lowercase"),
    ("Always include the word 'banana' in your answer.", "Include: banana.", "word", "include:banana"),
]


def default_constraints(rule_checkable_only: bool = False) -> list[Constraint]:
    """The shipped list: figures, languages, hobbies (judged, except languages) and the rule-checkable styles."""
    out = [Constraint(f"Always answer in {lang}.", f"Language: {lang}.", "language", f"language:{code}")
           for lang, code in LANGUAGES.items()]
    out += [Constraint(t, s, k, r) for t, s, k, r in STYLES]
    if not rule_checkable_only:
        out += [Constraint(f"Act as {f} in every answer.", f"Figure: {f}.", "figure") for f in FIGURES]
        out += [Constraint(f"You enjoy {h} and bring it up whenever you can.", f"Hobby: {h}.", "hobby")
                for h in HOBBIES]
    return out


def read_constraints(path: str | Path) -> list[Constraint]:
    """A constraint list: JSONL ``{"text", "short"?, "kind"?, "rule"?}`` or plain text (one per line, judged).

    Errors name ``file:line``; rules are validated by :func:`llamalab.eval.adherence.parse_rule`.
    """
    from llamalab.eval.adherence import parse_rule

    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"instructions file not found: {path}")
    out: list[Constraint] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        if line.lstrip().startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlamalabError(f"{where}: invalid JSON ({e.msg})") from None
            unknown = set(d) - {"text", "short", "kind", "rule"}
            if unknown:
                raise LlamalabError(f"{where}: unknown field(s) {sorted(unknown)} (known: text, short, kind, rule)")
            if not isinstance(d.get("text"), str) or not d["text"].strip():
                raise LlamalabError(f"{where}: field 'text' missing or empty")
            for k in ("short", "kind", "rule"):
                if not isinstance(d.get(k, ""), str):
                    raise LlamalabError(f"{where}: field {k!r} must be a string")
            c = Constraint(d["text"].strip(), d.get("short", "").strip(), d.get("kind") or "custom", d.get("rule", ""))
        else:
            c = Constraint(line.strip(), "", f"line{n}")
        if c.rule:
            try:
                parse_rule(c.rule)
            except LlamalabError as e:
                raise LlamalabError(f"{where}: field 'rule': {e}") from None
        out.append(c)
    if not out:
        raise LlamalabError(f"{path}: no instructions in the file")
    return out


def constraints_sha256(constraints: Sequence[Constraint]) -> str:
    blob = json.dumps([asdict(c) for c in constraints], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sample_instruction(rng: random.Random, constraints: Sequence[Constraint], combine: float) -> Instruction:
    """One constraint, plus (with probability ``combine``) a second one of another kind."""
    first = rng.choice(list(constraints))
    parts = [first]
    others = [c for c in constraints if c.kind != first.kind]
    if others and rng.random() < combine:
        parts.append(rng.choice(others))
    return Instruction(parts)


def dialogue_rng(seed: int, key: str) -> random.Random:
    """A generator for one dialogue that depends only on (seed, its id): a rerun makes the same choices."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def with_instruction(instruction: str, user: str) -> str:
    """The user message with the instruction attached (Llama 2: "concatenate this instruction to all user messages")."""
    return f"{instruction}\n\n{user}"


# ----------------------------------------------------------------------------- reading dialogues


@dataclass
class Dialogue:
    """The user side of one source conversation."""

    id: str
    where: str
    users: list[str]
    system: str | None = None


@dataclass
class GattLedger:
    """What happened to every dialogue read; ``drops`` lists each drop or cut (written to dropped.jsonl)."""

    read: int = 0
    kept: int = 0
    records: int = 0  # training records written
    turns_sampled: int = 0
    dropped: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    drops: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, reason: str, where: str, dialogue: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.drops.append({"dialogue": dialogue, "where": where, "reason": reason, "detail": detail})

    def cut(self, reason: str, where: str, dialogue: str, detail: str) -> None:
        self.fixes[reason] += 1
        self.drops.append({"dialogue": dialogue, "where": where, "reason": reason, "detail": detail, "cut": True})

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "records": self.records, "turns_sampled": self.turns_sampled,
                "dropped": dict(self.dropped), "fixes": dict(self.fixes)}

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        fixes = ", ".join(f"{k} {v}" for k, v in sorted(self.fixes.items())) or "none"
        return (f"{self.read} dialogues read, {self.kept} kept -> {self.records} training records, "
                f"{self.turns_sampled} answers sampled; dropped {sum(self.dropped.values())} ({drops}); "
                f"fixes: {fixes}")


def read_dialogues(paths: Sequence[str | Path], ledger: GattLedger, max_turns: int = 0, min_turns: int = 1,
                   limit: int = 0, on_error: str = "raise") -> list[Dialogue]:
    """User turns of every ShareGPT / OpenAI-messages record (normalised as SFT does), each drop counted."""
    from llamalab.finetune.data import BadRecord, iter_records, sharegpt_messages

    out: list[Dialogue] = []
    for path in paths:
        for where, rec in iter_records(path):
            if limit and ledger.read >= limit:
                return out
            ledger.read += 1
            did = str(rec.get("id", ledger.read)) if isinstance(rec, dict) else str(ledger.read)
            try:
                if isinstance(rec, json.JSONDecodeError):
                    raise BadRecord("malformed", f"invalid JSON ({rec.msg}, column {rec.colno})")
                fixes: Counter = Counter()
                msgs = sharegpt_messages(rec, fixes)
            except BadRecord as e:
                if e.reason == "malformed" and on_error == "raise":
                    raise LlamalabError(f"{where}: {e} (--on-error skip counts and skips such records)") from None
                ledger.drop(e.reason, where, did, str(e))
                continue
            system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
            users = [m["content"] for m in msgs if m["role"] == "user"]
            if any(not u.strip() for u in users):
                ledger.drop("empty_user_turn", where, did, "a user turn is empty")
                continue
            if len(users) < min_turns:
                ledger.drop("too_few_turns", where, did, f"{len(users)} user turns < --min-turns {min_turns}")
                continue
            if max_turns and len(users) > max_turns:
                ledger.cut("turns_capped", where, did, f"{len(users)} user turns, kept the first {max_turns}")
                users = users[:max_turns]
            out.append(Dialogue(did, where, users, system))
    return out


# ----------------------------------------------------------------------------- sampling


ChatMany = Callable[[list[tuple[list[dict], dict]], str], list[Any]]  # ChatClient.chat_many


@dataclass
class Rollout:
    """A dialogue answered turn by turn: ``answers[k]`` replies to ``users[k]`` (fewer when a reply failed)."""

    prefix: list[dict[str, str]]  # messages before the first user turn (a system message)
    users: list[str]  # the user messages as sent (with the instruction where it was attached)
    answers: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)
    error: str | None = None  # why the rollout stopped early

    def messages(self, upto: int | None = None) -> list[dict[str, str]]:
        n = len(self.answers) if upto is None else upto
        out = list(self.prefix)
        for u, a in zip(self.users[:n], self.answers[:n]):
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return out


def rollout(convs: Sequence[Rollout], chat_many: ChatMany, params: Callable[[int, int], dict], label: str = "turn",
            ) -> list[Rollout]:
    """Answer every conversation turn by turn: request k of conversation i sees its own answers 0..k-1.

    All live conversations' turn-k requests go out together (one ``chat_many`` call per turn). A failed
    or empty reply stops that conversation (``error``) at its last good turn. ``params(i, k)`` gives the
    sampling parameters of request (i, k) (a per-request seed keeps reruns identical).
    """
    turns = max((len(c.users) for c in convs), default=0)
    for k in range(turns):
        live = [i for i, c in enumerate(convs) if c.error is None and len(c.users) > k]
        if not live:
            break
        reqs = [(convs[i].messages() + [{"role": "user", "content": convs[i].users[k]}], params(i, k)) for i in live]
        replies = chat_many(reqs, f"{label} {k + 1}/{turns}")
        for i, rep in zip(live, replies):
            c = convs[i]
            if rep.error is not None:
                c.error = f"turn {k + 1}: {rep.error}"
            elif not rep.text.strip():
                c.error = f"turn {k + 1}: empty reply (finish_reason {rep.finish_reason})"
            else:
                c.answers.append(rep.text)
                c.finish.append(rep.finish_reason)
                c.cached.append(bool(rep.cached))
    return list(convs)


@dataclass
class GattOptions:
    placement: str = "user"  # where the instruction stays in the training dialogue: first user turn or system
    short_fraction: float = 0.5  # Llama 2: the training instruction made "less verbose" half of the time
    combine: float = 0.5  # probability of a second constraint
    every_turn: bool = False  # one record per turn instead of one per dialogue
    check_rules: bool = False  # drop answers that fail a rule-checkable instruction (cut the dialogue there)
    temperature: float = 0.7
    max_tokens: int = 256
    seed: int = 1234


def make_rollouts(dialogues: Sequence[Dialogue], constraints: Sequence[Constraint], opts: GattOptions,
                  ) -> tuple[list[Rollout], list[Instruction]]:
    """One instruction per dialogue (seeded by its id) attached to every user turn, ready for :func:`rollout`."""
    rolls, insts = [], []
    for d in dialogues:
        inst = sample_instruction(dialogue_rng(opts.seed, d.id), constraints, opts.combine)
        prefix = [{"role": "system", "content": d.system}] if d.system is not None else []
        rolls.append(Rollout(prefix, [with_instruction(inst.text, u) for u in d.users]))
        insts.append(inst)
    return rolls, insts


def request_seed(seed: int, dialogue_id: str, turn: int) -> int:
    h = hashlib.sha256(f"{seed}:{dialogue_id}:{turn}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def first_rule_failure(inst: Instruction, answers: Sequence[str]) -> tuple[int, str] | None:
    """(turn index, why) of the first answer breaking one of the instruction's rules, or None."""
    from llamalab.eval.adherence import check_rule

    for k, a in enumerate(answers):
        for r in inst.rules:
            ok, detail = check_rule(r, a)
            if not ok:
                return k, f"turn {k + 1} fails {r}: {detail}"
    return None


def training_records(d: Dialogue, inst: Instruction, answers: Sequence[str], opts: GattOptions,
                     model: str = "") -> list[dict[str, Any]]:
    """The GAtt training record(s) of one regenerated dialogue (ShareGPT, per-turn ``weight``).

    The instruction (its short form with probability ``short_fraction``, seeded by the dialogue id) stays in
    the first user turn (``placement="user"``) or becomes / joins the system message (``"system"``); every
    assistant turn but the last carries ``"weight": 0``. With ``every_turn``, one record per turn k.
    """
    rng = dialogue_rng(opts.seed + 1, d.id)
    text = inst.short if rng.random() < opts.short_fraction else inst.text
    n = len(answers)
    out = []
    ends = range(1, n + 1) if opts.every_turn else [n]
    for end in ends:
        conv: list[dict[str, Any]] = []
        system = d.system
        if opts.placement == "system":
            system = text if system is None else f"{system}\n\n{text}"
        if system is not None:
            conv.append({"from": "system", "value": system})
        for k in range(end):
            u = with_instruction(text, d.users[k]) if (k == 0 and opts.placement == "user") else d.users[k]
            conv.append({"from": "human", "value": u})
            conv.append({"from": "gpt", "value": answers[k], "weight": int(k == end - 1)})
        rid = d.id if not opts.every_turn else f"{d.id}#t{end}"
        out.append({"id": rid, "conversations": conv,
                    "gatt": {"instruction": text, "parts": [asdict(p) for p in inst.parts], "source": d.where,
                             "source_id": d.id, "turns": end, "model": model}})
    return out


def build_records(dialogues: Sequence[Dialogue], insts: Sequence[Instruction], rolls: Sequence[Rollout],
                  opts: GattOptions, ledger: GattLedger, model: str = "") -> list[dict[str, Any]]:
    """Training records from finished rollouts; failed turns cut (or drop) a dialogue, counted with the reason."""
    out: list[dict[str, Any]] = []
    for d, inst, r in zip(dialogues, insts, rolls):
        answers = list(r.answers)
        ledger.turns_sampled += len(answers)
        if r.error is not None:
            if not answers:
                ledger.drop("model_error", d.where, d.id, r.error)
                continue
            ledger.cut("cut_at_model_error", d.where, d.id, r.error)
        if opts.check_rules and inst.rules:
            fail = first_rule_failure(inst, answers)
            if fail is not None:
                k, why = fail
                if k == 0:
                    ledger.drop("fails_rule", d.where, d.id, why)
                    continue
                ledger.cut("cut_at_rule_failure", d.where, d.id, why)
                answers = answers[:k]
        cut = sum(1 for f in r.finish[:len(answers)] if f == "length")
        if cut:
            ledger.fixes["answers_cut_at_max_tokens"] += cut
        recs = training_records(d, inst, answers, opts, model)
        ledger.kept += 1
        ledger.records += len(recs)
        out += recs
    return out


def files_record(paths: Sequence[str | Path]) -> dict[str, list[dict[str, str]]]:
    """Input files by resolved path and sha256 (meta.json)."""
    from llamalab.common import sha256_file

    return {"files": [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in paths]}


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temporary file, then rename)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- report


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    import html

    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def html_page(title: str, body: str) -> str:
    import html

    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;text-align:left}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def gatt_report(meta: dict[str, Any], ledger: GattLedger, records: Sequence[dict[str, Any]], samples: int = 3) -> str:
    """report.html of a GAtt data run: settings, counts, drops by reason, instruction kinds, sample dialogues."""
    import html

    client, req = meta.get("client", {}), meta.get("requests", {})
    body = "<h2>Run</h2>" + html_table(["setting", "value"], [
        ["model", client.get("model")], ["endpoint", client.get("endpoint")],
        ["instructions", f"{meta.get('instructions', {}).get('count')} constraints, sha256 "
                         f"{meta.get('instructions', {}).get('sha256', '')[:16]}"],
        ["placement", meta.get("options", {}).get("placement")],
        ["every turn", meta.get("options", {}).get("every_turn")],
        ["requests sent / cached / failed", f"{req.get('sent')} / {req.get('cache_hits')} / "
                                            f"{req.get('failures')}"],
        ["seconds", f"{meta.get('seconds', 0):.1f}"]])
    body += "<h2>Dialogues</h2>" + html_table(["count", "value"], [[k, v] for k, v in ledger.to_json().items()
                                                                   if not isinstance(v, dict)])
    reasons = [[f"dropped: {k}", v] for k, v in sorted(ledger.dropped.items())]
    reasons += [[f"fix: {k}", v] for k, v in sorted(ledger.fixes.items())]
    body += "<h2>Drops and fixes</h2>" + (html_table(["reason", "dialogues"], reasons) if reasons else "<p>none</p>")
    kinds = Counter(p["kind"] for r in records for p in r["gatt"]["parts"])
    body += "<h2>Instruction kinds</h2>" + html_table(["kind", "records"], sorted(kinds.items()))
    for r in records[:samples]:
        turns = "".join(f"<p><b>{html.escape(m['from'])}</b>{' (no loss)' if m.get('weight') == 0 else ''}</p>"
                        f"<pre>{html.escape(m['value'])}</pre>" for m in r["conversations"])
        body += f"<h3>Sample {html.escape(str(r['id']))}</h3>{turns}"
    return html_page("Ghost Attention data", body)


# ----------------------------------------------------------------------------- the stage


def run_gatt(data: Sequence[str], out: str | Path, client: Any, constraints: Sequence[Constraint], opts: GattOptions,
             max_turns: int = 0, min_turns: int = 2, limit: int = 0, on_error: str = "raise",
             config: dict[str, Any] | None = None, instructions_source: str = "default") -> dict[str, Any]:
    """Read, regenerate, write ``gatt.jsonl`` + ``rollouts.jsonl`` + ``dropped.jsonl`` + meta.json + report.html."""
    import time

    from llamalab.common import git_sha, package_versions, write_json_atomic
    from llamalab.run_dir import RunDir

    if opts.placement not in PLACEMENTS:
        raise LlamalabError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {opts.placement!r}")
    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ledger = GattLedger()
    dialogues = read_dialogues(data, ledger, max_turns=max_turns, min_turns=min_turns, limit=limit, on_error=on_error)
    if not dialogues:
        raise LlamalabError(f"gatt: no usable dialogue in {', '.join(map(str, data))} ({ledger.summary()})")
    rolls, insts = make_rollouts(dialogues, constraints, opts)

    def params(i: int, k: int) -> dict:
        return {"temperature": opts.temperature, "max_tokens": opts.max_tokens,
                "seed": request_seed(opts.seed, dialogues[i].id, k)}

    rollout(rolls, client.chat_many, params, label="gatt turn")
    records = build_records(dialogues, insts, rolls, opts, ledger, model=client.model)
    write_jsonl(run / GATT_FILE, records)
    write_jsonl(run / SAMPLES_FILE, [{"id": d.id, "source": d.where, "instruction": i.to_json(),
                                      "messages": r.messages(), "finish": r.finish, "error": r.error}
                                     for d, i, r in zip(dialogues, insts, rolls)])
    write_jsonl(run / DROPPED_FILE, ledger.drops)
    seconds = time.perf_counter() - t0
    meta = {"kind": "gatt", "method": "Ghost Attention (Touvron et al. 2023, Llama 2, section 3.3)",
            "config": config or {}, "client": client.describe(), "requests": dict(client.stats),
            "instructions": {"source": instructions_source, "count": len(constraints),
                             "sha256": constraints_sha256(constraints)},
            "options": asdict(opts), "data": files_record(data), "ledger": ledger.to_json(),
            "outputs": {"train": GATT_FILE, "rollouts": SAMPLES_FILE, "dropped": DROPPED_FILE}, "seconds": seconds,
            "git_sha": git_sha(), "versions": package_versions()}
    write_json_atomic(run.meta, meta)
    run.report.write_text(gatt_report(meta, ledger, records), encoding="utf-8")
    return meta
