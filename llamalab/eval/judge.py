"""LLM-as-a-judge evaluation, Vicuna-80 / MT-bench style: answers, judgments, ratings.

The method is Zheng et al. 2023 (MT-bench and Chatbot Arena) after Chiang et al. 2023 (Vicuna's GPT-4
evaluation). Three steps, each resumable, each writing into one output folder::

    OUT/answers/<model>.jsonl   one line per question: {question_id, model, turns: [...], finish_reasons, settings}
    OUT/judgments.jsonl         every judge request and reply (messages, reply, parsed rating or verdict)
    OUT/results.json            the tables below; OUT/meta.json (judge, prompts sha256, inputs sha256); report.html

1. **Answers.** Each model answers every question, turn by turn (MT-bench's second turn is asked after
   the model's own first answer). A model path (anything :func:`llamalab.model.folder.load` reads) is
   decoded in-process by :class:`llamalab.inference.engine.Engine`, batched, with the model's chat
   template (the server's rendering: our templates or the imported model's own Jinja); an
   ``http(s)://`` endpoint is asked through :class:`llamalab.synth.client.ChatClient`. Questions already
   in the answer file are skipped; a file made with other settings is refused rather than mixed.
2. **Judging** through the client: single-answer grading (``Rating: [[7]]``, 1-10) and pairwise
   comparison asked in BOTH orders (A/B and B/A). A pair's result for a question is a win only when both
   orders name the same model; when they disagree it is a tie (position bias cancels); when either reply
   has no verdict the game is counted as unparsable and left out. For the categories that need one
   (math, reasoning, coding) the reference answer goes into the prompt. Done judgments are skipped on a
   rerun (by a key over the exact request), and the client's cache answers repeated requests.
   With ``verdict="likelihood"`` a local judge model writes nothing: its reply is opened with a verdict
   prefix and the verdicts are ranked by log-likelihood in-process (:class:`LikelihoodJudge`; pairwise:
   argmax of A/B/C; grades: G-Eval's probability-weighted mean), the probabilities recorded.
3. **Results.** Per-model and per-category grades; win/tie/loss per model pair overall and by category,
   with the two orders' agreement rate and the first position's win rate (position bias); a
   Bradley-Terry rating on the Elo scale fitted to the pairwise games, with percentile bootstrap
   confidence intervals over games (seeded).
"""

from __future__ import annotations

import gc
import hashlib
import html
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from llamalab.common import LlamalabError, Progress, print0, sha256_file, write_json_atomic
from llamalab.eval import judge_prompts as prompts
from llamalab.run_dir import RunDir

if TYPE_CHECKING:
    from llamalab.inference.engine import Engine

# the judge folder's own files (meta.json and report.html come from RunDir)
ANSWERS_DIR = "answers"
JUDGMENTS = "judgments.jsonl"
RESULTS = "results.json"
CACHE_DIR = "cache"

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # MT-bench's categories judged against a reference
MODEL_OPTIONS = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int, "quantize": str,
                 "model": str, "template": str}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ELO_SCALE = 400.0 / math.log(10.0)  # natural-log strength -> Elo points
ELO_BASE = 1000.0


# ----------------------------------------------------------------------------- questions


@dataclass
class Question:
    question_id: Any
    category: str
    turns: list[str]
    reference: list[str] | None = None


def _read_jsonl(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) of each line; a torn LAST line (an interrupted append) is skipped, others raise."""
    if not path.exists():
        raise LlamalabError(f"{what} not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if n == len(lines) and not path.read_text(encoding="utf-8").endswith("\n"):
                print0(f"judge: {path}:{n}: an unfinished last line (interrupted write) is ignored")
                continue
            raise LlamalabError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


def load_questions(path: str | Path, limit: int = 0) -> list[Question]:
    """Vicuna (``{question_id, text, category}``) or MT-bench (``{question_id, category, turns, reference?}``)."""
    path = Path(path)
    out: list[Question] = []
    seen: set = set()
    for n, row in _read_jsonl(path, "question file"):
        if not isinstance(row, dict):
            raise LlamalabError(f"{path}:{n}: a question must be a JSON object")
        qid = row.get("question_id")
        if qid is None or isinstance(qid, (dict, list)):
            raise LlamalabError(f"{path}:{n}: field 'question_id' is missing or not a number/string")
        if qid in seen:
            raise LlamalabError(f"{path}:{n}: question_id {qid!r} appears twice")
        seen.add(qid)
        turns = row.get("turns", [row["text"]] if "text" in row else None)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise LlamalabError(f"{path}:{n}: needs 'turns' (a list of non-empty strings) or 'text'")
        ref = row.get("reference")
        if ref is not None and not (isinstance(ref, list) and all(isinstance(r, str) for r in ref)):
            raise LlamalabError(f"{path}:{n}: field 'reference' must be a list of strings, one per turn")
        out.append(Question(qid, str(row.get("category", "general")), turns, ref or None))
        if limit and len(out) >= limit:
            break
    if not out:
        raise LlamalabError(f"{path}: no questions")
    return out


def load_references(path: str | Path) -> dict[Any, list[str]]:
    """Reference answers by question id: FastChat's ``{question_id, choices: [{turns}]}``, or ``{question_id,
    turns}``."""
    path = Path(path)
    refs: dict[Any, list[str]] = {}
    for n, row in _read_jsonl(path, "reference file"):
        turns = None
        if isinstance(row, dict):
            turns = row.get("turns")
            if turns is None and isinstance(row.get("choices"), list) and row["choices"]:
                turns = row["choices"][0].get("turns") if isinstance(row["choices"][0], dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns) or "question_id" not in row:
            raise LlamalabError(f"{path}:{n}: needs 'question_id' and 'turns' (or 'choices[0].turns'), strings")
        refs[row["question_id"]] = turns
    return refs


def attach_references(questions: list[Question], refs: dict[Any, list[str]],
                      categories: Sequence[str] = REFERENCE_CATEGORIES) -> dict[str, int]:
    """Give each question of ``categories`` its reference (the file's wins over the question's own field);
    questions of other categories are judged without one. Returns counts for meta.json."""
    counts = {"with_reference": 0, "needs_reference_but_none": 0}
    cats = set(categories)
    for q in questions:
        if q.category not in cats:
            q.reference = None
            continue
        q.reference = refs.get(q.question_id, q.reference)
        counts["with_reference" if q.reference else "needs_reference_but_none"] += 1
    return counts


# ----------------------------------------------------------------------------- answers


@dataclass
class ModelSpec:
    """``[NAME=]SOURCE[@key=value...]``: SOURCE is a model path (folder, run, HF folder, .gguf) or an
    ``http(s)://.../v1`` endpoint; options: temperature, top_p, max_tokens, seed, quantize, template
    (chat template override) and model (the endpoint's model name)."""
    name: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_endpoint(self) -> bool:
        return self.source.startswith(("http://", "https://"))


def parse_model_spec(spec: str) -> ModelSpec:
    head, *opts = spec.split("@")
    name, src = "", head
    if "=" in head and _NAME_RE.match(head.split("=", 1)[0]):  # NAME=SOURCE (a path with '=' stays whole)
        name, src = head.split("=", 1)
    src = src[len("local:"):] if src.startswith("local:") else src  # the client's spelling of a model path
    if not src:
        raise LlamalabError(f"--models {spec!r}: no model path or URL")
    options: dict[str, Any] = {}
    for o in opts:
        if "=" not in o:
            raise LlamalabError(f"--models {spec!r}: option {o!r} is not key=value")
        k, v = o.split("=", 1)
        if k not in MODEL_OPTIONS:
            raise LlamalabError(f"--models {spec!r}: unknown option {k!r}; choose from {', '.join(MODEL_OPTIONS)}")
        try:
            options[k] = MODEL_OPTIONS[k](v)
        except ValueError:
            raise LlamalabError(f"--models {spec!r}: option {k}={v!r} is not a {MODEL_OPTIONS[k].__name__}") from None
    if not name:
        if src.startswith(("http://", "https://")):
            name = options.get("model") or re.sub(r"[^A-Za-z0-9._-]+", "_", src.split("://", 1)[1]).strip("_")
        else:
            p = Path(src.rstrip("/"))
            name = p.stem if p.suffix == ".gguf" else p.name
    if not _NAME_RE.match(name):
        raise LlamalabError(f"--models {spec!r}: model name {name!r} must be letters, digits and . _ + - "
                            f"(give one: NAME=PATH)")
    return ModelSpec(name, src, options)


@dataclass
class AnswerSettings:
    """Defaults for every model's answers (a model's @options override them)."""
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    slots: int = 8
    quantize: str = "none"
    max_seq_len: int = 0  # model paths: cap the context and KV cache (0 = the model's own)
    chunk: int = 16  # questions answered (and written) per batch


def answers_path(out: str | Path, name: str) -> Path:
    return Path(out) / ANSWERS_DIR / f"{name}.jsonl"


def read_answers(path: str | Path, name: str | None = None) -> tuple[str, dict[Any, dict]]:
    """(model name, rows by question id) of an answer file: ours or FastChat's ``{question_id, model_id,
    choices: [{turns}]}``."""
    path = Path(path)
    rows: dict[Any, dict] = {}
    found_name = None
    for n, row in _read_jsonl(path, "answer file"):
        if not isinstance(row, dict) or "question_id" not in row:
            raise LlamalabError(f"{path}:{n}: an answer needs 'question_id'")
        turns = row.get("turns")
        if turns is None and isinstance(row.get("choices"), list) and row["choices"]:
            turns = row["choices"][0].get("turns") if isinstance(row["choices"][0], dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise LlamalabError(f"{path}:{n}: needs 'turns' (or 'choices[0].turns'): a list of strings")
        found_name = found_name or row.get("model") or row.get("model_id")
        rows[row["question_id"]] = {**row, "turns": turns}
    name = name or found_name or path.stem
    if not _NAME_RE.match(str(name)):
        raise LlamalabError(f"{path}: model name {name!r} must be letters, digits and . _ + - "
                            f"(give one: --answers NAME=FILE)")
    return str(name), rows


def _append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        text = path.read_text(encoding="utf-8")  # drop a torn last line before appending after it
        path.write_text(text[:text.rfind("\n") + 1], encoding="utf-8")
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _settings_of(spec: ModelSpec, s: AnswerSettings) -> dict[str, Any]:
    o = spec.options
    out = {"source": spec.source, "max_tokens": o.get("max_tokens", s.max_tokens),
           "temperature": o.get("temperature", s.temperature), "top_p": o.get("top_p", s.top_p),
           "seed": o.get("seed", s.seed)}
    if spec.is_endpoint:
        out["model"] = o.get("model", "")
    else:
        out["quantize"] = o.get("quantize", s.quantize)
        out["template"] = o.get("template", "")
        out["max_seq_len"] = s.max_seq_len
    return out


def _seed(base: int, qid: Any, turn: int) -> int:
    h = hashlib.sha256(f"{qid}".encode()).digest()
    return (base + int.from_bytes(h[:4], "little") * 7 + turn) % (2**31)


class EngineAnswerer:
    """A model path answering chat turns in-process: the model's chat template, batched through the Engine."""

    def __init__(self, spec: ModelSpec, settings: dict[str, Any], slots: int) -> None:
        from llamalab.inference.engine import Engine
        from llamalab.tokenizer.jinja_template import chat_template_for

        self.engine: Engine = Engine.from_folder(spec.source, slots=slots, quantize=settings["quantize"],
                                                 max_seq_len=settings["max_seq_len"] or None)
        self.template = chat_template_for(self.engine.meta, settings["template"] or None)
        self.s = settings

    def describe(self) -> dict[str, Any]:
        return {"kind": "engine", "source": self.s["source"], "template": str(self.template)[:200],
                "max_seq_len": self.engine.max_seq_len}

    def _render(self, messages: list[dict]) -> tuple[list[int], list[str], list[int]]:
        from llamalab.tokenizer.jinja_template import SourceTemplate
        from llamalab.tokenizer.templates import render, stop_strings, stop_token_ids

        tok = self.engine.tokenizer
        if isinstance(self.template, SourceTemplate):
            return (self.template.render(messages, tok, add_generation_prompt=True), self.template.stop_strings(),
                    self.template.stop_token_ids(tok))
        return (render(messages, self.template, tok, add_generation_prompt=True)[0], stop_strings(self.template),
                stop_token_ids(self.template, tok))

    def answer(self, conversations: list[list[dict]], seeds: list[int]) -> list[tuple[str, str, str | None]]:
        """(text, finish_reason, error) of the next assistant turn of each conversation."""
        from llamalab.inference.sampling import SamplingParams

        results: list[tuple[str, str, str | None] | None] = [None] * len(conversations)
        ids, params, where = [], [], []
        for i, (msgs, seed) in enumerate(zip(conversations, seeds)):
            prompt, stops, stop_ids = self._render(msgs)
            room = self.engine.max_seq_len - len(prompt)
            if room < 2:
                results[i] = ("", "prompt_too_long", None)  # an answer that cannot start: kept, and counted
                continue
            ids.append(prompt)
            params.append(SamplingParams(max_tokens=min(self.s["max_tokens"], room - 1),
                                         temperature=self.s["temperature"], top_p=self.s["top_p"], seed=seed,
                                         stop=stops, stop_token_ids=stop_ids))
            where.append(i)
        if ids:
            for i, o in zip(where, self.engine.generate(ids, params)):
                results[i] = (o.text.strip(), o.finish_reason, None if o.finish_reason != "error" else "engine error")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        del self.engine
        gc.collect()


class ClientAnswerer:
    """An OpenAI-compatible endpoint answering chat turns through the shared client (retries, cache)."""

    def __init__(self, spec: ModelSpec, settings: dict[str, Any], base: Any, cache_dir: Path) -> None:
        from dataclasses import replace

        from llamalab.synth.client import ChatClient

        # the judge's key is not sent to another endpoint: an answering endpoint's key comes from the environment
        cfg = replace(base, base_url=spec.source, model=settings.get("model", ""), api_key="")
        self.client = ChatClient(cfg, cache_dir=cache_dir)
        self.s = settings

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", **self.client.describe()}

    def answer(self, conversations: list[list[dict]], seeds: list[int]) -> list[tuple[str, str, str | None]]:
        reqs = [(m, {"max_tokens": self.s["max_tokens"], "temperature": self.s["temperature"], "top_p": self.s["top_p"],
                     "seed": seed}) for m, seed in zip(conversations, seeds)]
        return [(r.text.strip() if r.text else "", r.finish_reason or "", r.error)
                for r in self.client.chat_many(reqs)]

    def close(self) -> None:
        pass


def generate_answers(spec: ModelSpec, questions: list[Question], out: str | Path, settings: AnswerSettings,
                     client_base: Any = None) -> dict[str, Any]:
    """Answer every question not yet in ``OUT/answers/NAME.jsonl``; returns counts (and who answered)."""
    path = answers_path(out, spec.name)
    want = _settings_of(spec, settings)
    done: dict[Any, dict] = {}
    if path.exists():
        _, done = read_answers(path, spec.name)
        for qid, row in done.items():
            have = row.get("settings")
            if have is not None and have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise LlamalabError(f"{path}: question {qid} was answered with other settings ({', '.join(diff)}: "
                                    f"{[have.get(k) for k in diff]} here {[want.get(k) for k in diff]}); "
                                    f"use another --out, another model NAME, or delete the file")
    todo = [q for q in questions if q.question_id not in done]
    stats: dict[str, Any] = {"model": spec.name, "path": str(path), "already": len(questions) - len(todo),
                             "answered": 0, "failed": 0, "prompt_too_long": 0}
    if not todo:
        return stats
    answerer: Any
    if spec.is_endpoint:
        if client_base is None:
            raise LlamalabError(f"--models {spec.name}: an endpoint needs the client settings")
        answerer = ClientAnswerer(spec, want, client_base, Path(out) / CACHE_DIR)
    else:
        answerer = EngineAnswerer(spec, want, settings.slots)
    stats["answerer"] = answerer.describe()
    bar = Progress(len(todo), f"answers {spec.name}", "question")
    t0 = time.perf_counter()
    try:
        for b in range(0, len(todo), settings.chunk):
            chunk = todo[b:b + settings.chunk]
            convs: list[list[dict]] = [[] for _ in chunk]
            texts: list[list[str]] = [[] for _ in chunk]
            finish: list[list[str]] = [[] for _ in chunk]
            failed: list[str | None] = [None] * len(chunk)
            for t in range(max(len(q.turns) for q in chunk)):
                live = [i for i, q in enumerate(chunk) if t < len(q.turns) and failed[i] is None]
                for i in live:
                    convs[i].append({"role": "user", "content": chunk[i].turns[t]})
                res = answerer.answer([convs[i] for i in live], [_seed(want["seed"], chunk[i].question_id, t)
                                                                  for i in live])
                for i, (text, fin, err) in zip(live, res):
                    if err:
                        failed[i] = err
                        continue
                    convs[i].append({"role": "assistant", "content": text})
                    texts[i].append(text)
                    finish[i].append(fin)
                    stats["prompt_too_long"] += fin == "prompt_too_long"
            rows = []
            for i, q in enumerate(chunk):
                if failed[i] is not None:  # not written: the next run asks again
                    stats["failed"] += 1
                    stats.setdefault("first_error", f"question {q.question_id}: {failed[i]}")
                    continue
                rows.append({"question_id": q.question_id, "model": spec.name, "category": q.category,
                             "turns": texts[i], "finish_reasons": finish[i], "settings": want})
            _append_jsonl(path, rows)
            stats["answered"] += len(rows)
            bar.update(len(chunk))
    finally:
        bar.close()
        answerer.close()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    if stats["failed"]:
        print0(f"judge: {spec.name}: {stats['failed']} question(s) got no answer ({stats['first_error']}); "
               f"they are left out of judging and asked again on the next run")
    return stats


# ----------------------------------------------------------------------------- parsing the judge

_RATING_BRACKETS = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_RATING_LINE = re.compile(r"rating\s*[:=]\s*\[?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\]?", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str | None) -> float | None:
    """The grade in a judge's text: the last ``[[x]]`` (also ``[[x/10]]``), else the last ``Rating: x``;
    None when absent or outside 1..10 (counted as unparsable by the caller)."""
    if not text:
        return None
    found = _RATING_BRACKETS.findall(text) or _RATING_LINE.findall(text)
    if not found:
        return None
    v = float(found[-1])
    return v if 1.0 <= v <= 10.0 else None


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]`` / ``[[B]]`` / ``[[C]]`` of a judge's text; else None."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def combine_orders(first: str | None, second: str | None) -> str | None:
    """The pair result from the two orders, in terms of the pair's models (m1, m2).

    ``first``: the verdict with m1 shown as A; ``second``: with m2 shown as A. Returns ``"m1"``, ``"m2"``,
    ``"tie"`` (both said tie, or the orders disagree) or None (a verdict is missing)."""
    if first is None or second is None:
        return None
    w1 = {"A": "m1", "B": "m2", "tie": "tie"}[first]
    w2 = {"A": "m2", "B": "m1", "tie": "tie"}[second]
    return w1 if w1 == w2 else "tie"


# ----------------------------------------------------------------------------- judging


@dataclass
class Job:
    key: str
    kind: str  # "single" | "pair"
    question: Question
    turn: int  # 1-based
    models: tuple[str, ...]  # single: (model,); pair: (shown as A, shown as B)
    messages: list[dict]


@dataclass
class JudgeSettings:
    mode: str = "pairwise"  # single | pairwise | both
    max_tokens: int = 512
    temperature: float = 0.0
    chunk: int = 32
    baseline: str = ""  # pairwise: only pairs with this model


def model_pairs(models: Sequence[str], baseline: str = "") -> list[tuple[str, str]]:
    if baseline:
        if baseline not in models:
            raise LlamalabError(f"--baseline {baseline!r} is not one of the models ({', '.join(models)})")
        return [(baseline, m) for m in models if m != baseline]
    return [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]


def _key(kind: str, models: Sequence[str], turn: int, qid: Any, messages: list[dict], judge_id: dict) -> str:
    blob = json.dumps([kind, list(models), turn, qid, messages, judge_id], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def build_jobs(questions: list[Question], answers: dict[str, dict[Any, dict]], settings: JudgeSettings,
               judge_id: dict) -> tuple[list[Job], dict[str, int]]:
    """Every judge request of the run, and counts of what could not be judged (missing answers/turns)."""
    jobs: list[Job] = []
    skipped: dict[str, int] = {}
    models = list(answers)
    for q in questions:
        for t in range(1, len(q.turns) + 1):
            qs = q.turns[:t]
            ref = q.reference[:t] if q.reference and len(q.reference) >= t else None
            have: dict[str, list[str]] = {}
            for m in models:  # what each model said up to turn t (a gap is counted once, whatever the mode)
                row = answers[m].get(q.question_id)
                why = "no answer" if row is None else f"missing turn {t}" if len(row["turns"]) < t else ""
                if why:
                    skipped[f"{why}: {m}"] = skipped.get(f"{why}: {m}", 0) + 1
                else:
                    have[m] = row["turns"][:t]
            if settings.mode in ("single", "both"):
                for m in (m for m in models if m in have):
                    msgs = prompts.single_messages(qs, have[m], ref)
                    jobs.append(Job(_key("single", [m], t, q.question_id, msgs, judge_id), "single", q, t, (m,), msgs))
            if settings.mode in ("pairwise", "both"):
                for m1, m2 in model_pairs(models, settings.baseline):
                    if m1 not in have or m2 not in have:
                        continue
                    for x, y in ((m1, m2), (m2, m1)):
                        msgs = prompts.pair_messages(qs, have[x], have[y], ref)
                        jobs.append(Job(_key("pair", [x, y], t, q.question_id, msgs, judge_id), "pair", q, t, (x, y),
                                        msgs))
    return jobs, skipped


def read_judgments(path: Path) -> dict[str, dict]:
    """Judgments already made, by key (a reply that failed is not 'made': it is asked again)."""
    if not path.exists():
        return {}
    return {r["key"]: r for _, r in _read_jsonl(path, "judgments file")
            if isinstance(r, dict) and r.get("key") and not r.get("error")}


def run_judgments(jobs: list[Job], client: Any, out: str | Path, settings: JudgeSettings) -> tuple[dict[str, dict],
                                                                                                    dict[str, int]]:
    """Ask the judge every job not yet in judgments.jsonl (appended chunk by chunk); all records by key."""
    path = Path(out) / JUDGMENTS
    done = read_judgments(path)
    todo = [j for j in jobs if j.key not in done]
    counts = {"jobs": len(jobs), "already": len(jobs) - len(todo), "sent": 0, "cached": 0, "errors": 0}
    params = {"max_tokens": settings.max_tokens, "temperature": settings.temperature}
    bar = Progress(len(todo), "judge", "judgment")
    for b in range(0, len(todo), settings.chunk):
        chunk = todo[b:b + settings.chunk]
        replies = client.chat_many([(j.messages, dict(params)) for j in chunk])
        recs = []
        for j, r in zip(chunk, replies):
            who = {"model": j.models[0]} if j.kind == "single" else {"model_a": j.models[0], "model_b": j.models[1]}
            rec = {"key": j.key, "kind": j.kind, "question_id": j.question.question_id, "category": j.question.category,
                   "turn": j.turn, "reference": bool(j.question.reference), **who, "verdict_mode": "text",
                   "messages": j.messages, "reply": r.text, "finish_reason": r.finish_reason, "cached": r.cached,
                   "error": r.error}
            if j.kind == "single":
                rec["rating"] = parse_rating(r.text) if not r.error else None
            else:
                rec["verdict"] = parse_verdict(r.text) if not r.error else None
            counts["sent"] += 1
            counts["cached"] += bool(r.cached)
            counts["errors"] += bool(r.error)
            if not r.error:
                done[j.key] = rec
            recs.append(rec)
        _append_jsonl(path, recs)  # failed replies are kept too (what went wrong), and asked again next run
        st = getattr(client, "stats", {})
        bar.update(len(chunk), f"cached {counts['cached']} failed {counts['errors']} retries {st.get('retries', 0)}")
    bar.close()
    if counts["errors"]:
        first = next((r for r in _read_jsonl(path, "judgments file")[::-1] if r[1].get("error")), (0, {}))[1]
        print0(f"judge: {counts['errors']} judge request(s) failed (e.g. {first.get('error')}); they are left out "
               f"of the results and asked again on the next run")
    return {j.key: done[j.key] for j in jobs if j.key in done}, counts


# ----------------------------------------------------------------------------- likelihood verdicts

VERDICT_MODES = ("text", "likelihood")


@dataclass
class ChoiceScores:
    """Log-likelihoods of a judgment's verdict continuations after the prompt and the verdict prefix."""
    logliks: list[float] | None  # per choice; None when not scored (``why``)
    n_tokens: list[int]  # tokens of each choice's continuation
    context_tokens: int  # the rendered prompt + the prefix tokens all choices share
    why: str | None = None  # "prompt_too_long"


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs[1:]):
            return k
    return n


class LikelihoodJudge:
    """A local judge model that gives its verdict by likelihood instead of by text (``--verdict likelihood``).

    The judge prompt is rendered with the model's chat template exactly as ``llamalab serve`` and the client's
    ``local:`` backend render it (generation prompt on), the assistant prefix (``My verdict: [[`` /
    ``Rating: [[``) is appended, and every choice (``A]]``, ``B]]``, ``C]]`` or ``1]]`` .. ``10]]``) is scored:
    the sum of log p(token) over its tokens. Tokenization follows lm-eval: each ``prefix + choice`` is encoded
    as one string and the tokens all of them share are the context, so a prefix whose last token would merge
    with a choice is still scored correctly. The shared context is read once (one forward pass filling a KV
    cache) and each choice's few tokens are decoded on top of it: a pairwise judgment costs one prompt forward
    instead of three (a single grade one instead of ten), with the same numbers as scoring each (context,
    continuation) pair on its own (:func:`llamalab.eval.loglik.score_token_pairs`; tested)."""

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], source: str = "", name: str = "") -> None:
        self.source = source
        self.name = name or Path(source).name or "local"
        self.forwards = 0  # prompt forward passes (what the run costs)
        self.model: Any = None
        self.template: Any = None
        self.max_seq_len: int | None = None
        if model is not None:
            self._attach(model, tokenizer, meta)

    def _attach(self, model: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
        from llamalab.tokenizer.jinja_template import chat_template_for

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = chat_template_for(meta)
        self.max_seq_len = int(model.cfg.max_seq_len)

    @classmethod
    def load(cls, path: str | Path, name: str = "", lazy: bool = False) -> "LikelihoodJudge":
        """The judge at ``path`` (anything the one loader reads); ``lazy``: read the weights at the first
        :meth:`score`, so a resumed run with nothing left to judge never loads them."""
        if not Path(path).exists():
            raise LlamalabError(f"--base-url local:{path}: judge model not found (a model folder, run folder, HF "
                                f"folder or .gguf file)")
        judge = cls(None, None, {}, str(Path(path).resolve()), name)
        if not lazy:
            judge.ensure_loaded()
        return judge

    def ensure_loaded(self) -> None:
        if self.model is None:
            from llamalab.model.folder import load

            loaded = load(self.source)
            self._attach(loaded.model, loaded.tokenizer, loaded.meta)

    @property
    def endpoint(self) -> str:
        return f"local:{self.source}"

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "kind": "local-likelihood", "model": self.name,
                "template": None if self.template is None else str(self.template)[:200],
                "max_seq_len": self.max_seq_len, "forwards": self.forwards}

    def render(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids, as the server renders a chat request (generation prompt on)."""
        from llamalab.tokenizer.jinja_template import SourceTemplate
        from llamalab.tokenizer.templates import check_messages, render

        msgs = check_messages(messages)
        if isinstance(self.template, SourceTemplate):
            return list(self.template.render(msgs, self.tokenizer, add_generation_prompt=True))
        return list(render(msgs, self.template, self.tokenizer, add_generation_prompt=True)[0])

    def split(self, prefix: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """(the prefix tokens every ``prefix + choice`` shares, each choice's own tokens after them)."""
        full = [self.tokenizer.encode(prefix + c, bos=False) for c in choices]
        n = _common_prefix(full)
        tails = [f[n:] for f in full]
        if any(not t for t in tails):
            raise LlamalabError(f"verdict choices {list(choices)!r}: one choice's tokens are a prefix of another's")
        return full[0][:n], tails

    def score(self, messages: list[dict], prefix: str, choices: Sequence[str]) -> ChoiceScores:
        import torch
        import torch.nn.functional as F

        from llamalab.model.attention import KVCache

        self.ensure_loaded()
        shared, tails = self.split(prefix, choices)
        ctx = self.render(messages) + shared
        longest = max(len(t) for t in tails)
        if len(ctx) + longest - 1 > self.max_seq_len:
            return ChoiceScores(None, [len(t) for t in tails], len(ctx), "prompt_too_long")
        p = next(self.model.parameters())
        cache = KVCache(self.model.cfg, 1, len(ctx) + longest, dtype=p.dtype, device=p.device)
        lls: list[float] = []
        with torch.no_grad():
            h = self.model.hidden(torch.tensor([ctx], device=p.device), cache, 0)[:, -1]  # (1, dim)
            first = F.log_softmax(self.model.output(h).float()[0], dim=-1)
            self.forwards += 1
            for t in tails:
                ll = float(first[t[0]])
                if len(t) > 1:  # the choice's later tokens, on the cached context (overwriting the last choice's)
                    logits = self.model(torch.tensor([t[:-1]], device=p.device), kv_cache=cache, start_pos=len(ctx))
                    lp = F.log_softmax(logits[0].float(), dim=-1)
                    ll += float(lp.gather(-1, torch.tensor(t[1:], device=p.device)[:, None]).sum())
                lls.append(ll)
        return ChoiceScores(lls, [len(t) for t in tails], len(ctx))


def likelihood_verdict(kind: str, logliks: Sequence[float]) -> dict[str, Any]:
    """The verdict from the choices' log-likelihoods, renormalised over the choices (``probs``).

    ``verdict_mass`` is the probability the judge put on any valid verdict at all (before renormalising).
    Pairwise: the verdict is the most likely of A / B / C (tie). Single: ``rating`` is the probability-weighted
    mean grade over 1..10 (G-Eval's score, Liu et al. 2023), ``rating_argmax`` the most likely grade."""
    lp = np.asarray(logliks, dtype=np.float64)
    top = float(lp.max())
    w = np.exp(lp - top)
    probs = w / w.sum()
    mass = float(np.exp(top) * w.sum())
    best = int(np.argmax(probs))  # the first choice wins an exact tie
    if kind == "pair":
        labels = ("A", "B", "tie")
        return {"verdict": labels[best], "probs": {k: round(float(v), 6) for k, v in zip(labels, probs)},
                "verdict_mass": mass}
    grades = np.arange(1, len(probs) + 1, dtype=np.float64)
    return {"rating": round(float((probs * grades).sum()), 4), "rating_argmax": best + 1,
            "probs": {str(g): round(float(v), 6) for g, v in zip(range(1, len(probs) + 1), probs)},
            "verdict_mass": mass}


def likelihood_judge_id(judge: Any) -> dict[str, Any]:
    """What a likelihood judgment's key names besides its prompt: the judge, the mode, prefixes and choices."""
    return {"endpoint": judge.endpoint, "model": judge.name, "verdict": "likelihood",
            "pair": list(prompts.likelihood_choices("pair")), "single": list(prompts.likelihood_choices("single"))}


def run_likelihood_judgments(jobs: list[Job], judge: Any, out: str | Path, chunk: int = 8
                             ) -> tuple[dict[str, dict], dict[str, int]]:
    """Score every job not yet in judgments.jsonl with a :class:`LikelihoodJudge` (or anything with its
    ``score(messages, prefix, choices) -> ChoiceScores``); appended ``chunk`` at a time, so a rerun resumes."""
    path = Path(out) / JUDGMENTS
    done = read_judgments(path)
    todo = [j for j in jobs if j.key not in done]
    counts = {"jobs": len(jobs), "already": len(jobs) - len(todo), "sent": 0, "cached": 0, "errors": 0,
              "prompt_too_long": 0}
    bar = Progress(len(todo), "judge (likelihood)", "judgment")
    for b in range(0, len(todo), chunk):
        recs = []
        for j in todo[b:b + chunk]:
            prefix, choices = prompts.likelihood_choices(j.kind)
            sc = judge.score(j.messages, prefix, choices)
            who = {"model": j.models[0]} if j.kind == "single" else {"model_a": j.models[0], "model_b": j.models[1]}
            rec = {"key": j.key, "kind": j.kind, "question_id": j.question.question_id, "category": j.question.category,
                   "turn": j.turn, "reference": bool(j.question.reference), **who, "verdict_mode": "likelihood",
                   "messages": j.messages, "prefix": prefix, "choices": choices, "reply": None,
                   "finish_reason": sc.why or "scored", "cached": False, "error": None,
                   "logliks": [round(x, 6) for x in sc.logliks] if sc.logliks else None,
                   "choice_tokens": sc.n_tokens, "context_tokens": sc.context_tokens}
            if sc.logliks is None:  # kept and counted (unparsable): the same request would fail again
                rec["rating" if j.kind == "single" else "verdict"] = None
                counts["prompt_too_long"] += 1
            else:
                rec.update(likelihood_verdict(j.kind, sc.logliks))
            counts["sent"] += 1
            done[j.key] = rec
            recs.append(rec)
        _append_jsonl(path, recs)
        bar.update(len(recs))
    bar.close()
    if counts["prompt_too_long"]:
        print0(f"judge: {counts['prompt_too_long']} judgment(s) longer than the judge's context "
               f"({getattr(judge, 'max_seq_len', '?')} tokens): no verdict, counted as unparsable")
    return {j.key: done[j.key] for j in jobs if j.key in done}, counts


# ----------------------------------------------------------------------------- statistics


def bradley_terry(n_models: int, games: Sequence[tuple[int, int, float]], l2: float = 1e-3,
                  iters: int = 200) -> np.ndarray:
    """Bradley-Terry strengths (natural log, mean 0) by Newton's method on the penalised log-likelihood.

    ``games``: (i, j, s) with s = 1 if i won, 0 if j won, 0.5 for a tie (a tie is half a win each, as in
    Elo). ``l2``: a weak Gaussian prior that keeps a model that never wins (or never loses) finite."""
    theta = np.zeros(n_models)
    if not games:
        return theta
    g = np.asarray(games, dtype=np.float64)
    i, j, s = g[:, 0].astype(int), g[:, 1].astype(int), g[:, 2]
    eye = np.eye(n_models)
    diff = eye[i] - eye[j]  # (G, n)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[i] - theta[j])))
        grad = diff.T @ (s - p) - l2 * theta
        w = p * (1.0 - p)
        hess = (diff * w[:, None]).T @ diff + l2 * np.eye(n_models)
        step = np.linalg.solve(hess, grad)
        step = np.clip(step, -2.0, 2.0)
        theta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta - theta.mean()


def elo_scale(theta: np.ndarray) -> np.ndarray:
    return ELO_BASE + ELO_SCALE * np.asarray(theta)


def bootstrap_ratings(n_models: int, games: Sequence[tuple[int, int, float]], rounds: int = 500, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Elo-scale ratings with percentile bootstrap intervals: games resampled with replacement ``rounds`` times."""
    est = elo_scale(bradley_terry(n_models, games))
    if rounds < 1 or not games:
        return {"rating": est, "low": est.copy(), "high": est.copy(), "rounds": 0}
    rng = np.random.default_rng(seed)
    g = list(games)
    samples = np.empty((rounds, n_models))
    for b in range(rounds):
        idx = rng.integers(0, len(g), len(g))
        samples[b] = elo_scale(bradley_terry(n_models, [g[k] for k in idx]))
    lo, hi = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return {"rating": est, "low": lo, "high": hi, "rounds": rounds}


def _wtl() -> dict[str, int]:
    return {"win": 0, "tie": 0, "loss": 0, "unparsable": 0}


def summarize(records: dict[str, dict], jobs: list[Job], models: list[str], pairs: list[tuple[str, str]],
              bootstrap: int = 500, seed: int = 0) -> dict[str, Any]:
    """results.json: single-answer grades, pairwise win/tie/loss, position bias and Bradley-Terry ratings."""
    res: dict[str, Any] = {"models": models}
    singles = [(j, records[j.key]) for j in jobs if j.kind == "single" and j.key in records]
    if any(j.kind == "single" for j in jobs):
        by_model: dict[str, dict[str, Any]] = {}
        for m in models:
            rs = [(j, r) for j, r in singles if j.models[0] == m]
            ok = [(j, r["rating"]) for j, r in rs if r.get("rating") is not None]

            def mean(xs: list[float]) -> float | None:
                return round(float(np.mean(xs)), 3) if xs else None

            cats = sorted({j.question.category for j, _ in rs})
            turns = sorted({j.turn for j, _ in rs})
            by_model[m] = {"score": mean([v for _, v in ok]), "judged": len(rs), "unparsable": len(rs) - len(ok),
                           "by_turn": {str(t): mean([v for j, v in ok if j.turn == t]) for t in turns},
                           "by_category": {c: mean([v for j, v in ok if j.question.category == c]) for c in cats}}
            lik = [r for _, r in rs if r.get("rating_argmax") is not None]
            if lik:  # likelihood verdicts: the mean most-likely grade, and how sure the judge was of any grade
                by_model[m]["score_argmax"] = mean([r["rating_argmax"] for r in lik])
                by_model[m]["mean_verdict_mass"] = round(float(np.mean([r["verdict_mass"] for r in lik])), 6)
        res["single"] = by_model
    pair_jobs = [j for j in jobs if j.kind == "pair"]
    if pair_jobs:
        games: dict[tuple, dict[str, Any]] = {}
        for j in pair_jobs:
            m1, m2 = (j.models if (j.models in pairs) else j.models[::-1])
            g = games.setdefault((m1, m2, j.question.question_id, j.turn), {"category": j.question.category})
            r = records.get(j.key)
            g["first" if j.models[0] == m1 else "second"] = r.get("verdict") if r else None
            if r and r.get("probs"):
                g["probs_" + ("first" if j.models[0] == m1 else "second")] = r["probs"]
                g.setdefault("mass", []).append(r["verdict_mass"])
            g.setdefault("missing", 0)
            g["missing"] += r is None
        table: dict[str, Any] = {}
        idx = {m: k for k, m in enumerate(models)}
        bt_games: list[tuple[int, int, float]] = []
        position = {"first_wins": 0, "second_wins": 0, "ties": 0, "verdicts": 0}
        soft: list[list[float]] = []  # likelihood verdicts: P(shown first), P(shown second), P(tie) per order
        masses: list[float] = []
        for (m1, m2, qid, turn), g in games.items():
            if g["missing"]:
                continue  # a failed request: not judged yet (asked again next run)
            row = table.setdefault(f"{m1} vs {m2}", {"model_a": m1, "model_b": m2, **_wtl(), "agree": 0,
                                                     "disagree": 0, "by_category": {}})
            cat = row["by_category"].setdefault(g["category"], _wtl())
            for pr in (g.get("probs_first"), g.get("probs_second")):
                if pr:
                    soft.append([pr["A"], pr["B"], pr["tie"]])
            masses += g.get("mass", [])
            for v in (g.get("first"), g.get("second")):
                if v is not None:
                    position["verdicts"] += 1
                    position[{"A": "first_wins", "B": "second_wins", "tie": "ties"}[v]] += 1
            pf, ps = g.get("probs_first"), g.get("probs_second")
            if pf and ps:  # both orders' probabilities, averaged by model (position-balanced, Wang et al. 2023)
                row.setdefault("_soft", []).append([(pf["A"] + ps["B"]) / 2, (pf["B"] + ps["A"]) / 2,
                                                    (pf["tie"] + ps["tie"]) / 2])
            out = combine_orders(g.get("first"), g.get("second"))
            if out is None:
                row["unparsable"] += 1
                cat["unparsable"] += 1
                continue
            w1 = {"A": "m1", "B": "m2", "tie": "tie"}[g["first"]]
            w2 = {"A": "m2", "B": "m1", "tie": "tie"}[g["second"]]
            row["agree" if w1 == w2 else "disagree"] += 1
            k = {"m1": "win", "m2": "loss", "tie": "tie"}[out]
            row[k] += 1
            cat[k] += 1
            bt_games.append((idx[m1], idx[m2], {"m1": 1.0, "m2": 0.0, "tie": 0.5}[out]))
        for row in table.values():
            n = row["win"] + row["tie"] + row["loss"]
            row["win_rate"] = round((row["win"] + 0.5 * row["tie"]) / n, 4) if n else None
            row["agreement"] = round(row["agree"] / n, 4) if n else None
            sp = row.pop("_soft", None)
            if sp:  # likelihood verdicts: mean probabilities over both orders, and the win rate they imply
                m = np.mean(sp, axis=0)
                row["mean_prob"] = {k: round(float(v), 4) for k, v in zip(("model_a", "model_b", "tie"), m)}
                row["soft_win_rate"] = round(float(m[0] + m[2] / 2), 4)
        res["pairwise"] = table
        v = position["verdicts"]
        position["first_win_rate"] = round(position["first_wins"] / v, 4) if v else None
        if soft:
            mp = np.mean(soft, axis=0)
            position["mean_prob"] = {"first": round(float(mp[0]), 4), "second": round(float(mp[1]), 4),
                                     "tie": round(float(mp[2]), 4)}
            position["mean_verdict_mass"] = round(float(np.mean(masses)), 6)
        res["position"] = position
        if len(models) >= 2 and bt_games:
            bt = bootstrap_ratings(len(models), bt_games, bootstrap, seed)
            res["ratings"] = {"method": "Bradley-Terry (MLE, ties = half a win), Elo scale: 1000 + 400*log10(odds)",
                              "games": len(bt_games), "bootstrap_rounds": bt["rounds"], "seed": seed,
                              "models": {m: {"rating": round(float(bt["rating"][k]), 1),
                                             "ci95": [round(float(bt["low"][k]), 1), round(float(bt["high"][k]), 1)]}
                                         for k, m in enumerate(models)}}
    return res


# ----------------------------------------------------------------------------- report


def _shown_reply(r: dict) -> str:
    """A judgment's reply for the report; a likelihood judgment has none: the end of its prompt and the prefix."""
    if r.get("verdict_mode") == "likelihood":
        return f"... {r['messages'][-1]['content'][-600:]}\n[assistant] {r.get('prefix', '')} -> {r.get('choices')}"
    return (r.get("reply") or "")[:800]


def write_report(out: str | Path, results: dict[str, Any], meta: dict[str, Any],
                 examples: Sequence[dict] = ()) -> Path:
    """OUT/report.html: ratings (plot with intervals), win/tie/loss, per-category tables, grades, position bias."""
    from llamalab.report.html import CSS, _png, _table

    esc = html.escape
    parts = [f"<h1>Judge: {esc(', '.join(results['models']))}</h1>",
             f"<p class=sub>judge {esc(str(meta.get('judge', {}).get('model') or meta.get('judge')))} · "
             f"questions {esc(str(meta.get('questions', {}).get('path')))} "
             f"({meta.get('questions', {}).get('count')}) · mode {esc(str(meta.get('mode')))} · "
             f"verdicts {esc(str(meta.get('verdict', 'text')))} · "
             f"prompts sha256 {esc(str(meta.get('prompts_sha256', ''))[:12])}</p>"]
    if meta.get("verdict") == "likelihood":
        parts.append("<p>Likelihood verdicts: the judge wrote nothing; its reply was opened with the verdict prefix "
                     "and each verdict (A / B / C, or grades 1-10) was scored by the judge model's log-likelihood. "
                     "Pairwise: the most likely verdict; grades: the probability-weighted mean over 1-10 (G-Eval).</p>")
    rat = results.get("ratings")
    if rat:
        ms = sorted(rat["models"].items(), key=lambda kv: -kv[1]["rating"])
        parts += [f"<h2>Bradley-Terry rating (Elo scale, 95% bootstrap CI over {rat['bootstrap_rounds']} rounds, "
                  f"{rat['games']} games)</h2>",
                  _table(["model", "rating", "95% CI"], [[m, f"{v['rating']:.0f}",
                                                          f"{v['ci95'][0]:.0f} .. {v['ci95'][1]:.0f}"] for m, v in ms])]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.45 * len(ms)))
            ys = list(range(len(ms)))[::-1]
            r = [v["rating"] for _, v in ms]
            err = [[v["rating"] - v["ci95"][0] for _, v in ms], [v["ci95"][1] - v["rating"] for _, v in ms]]
            ax.errorbar(r, ys, xerr=err, fmt="o", capsize=4)
            ax.set_yticks(ys, [m for m, _ in ms])
            ax.set_xlabel("rating (Elo scale)")
            ax.grid(alpha=0.3)
            parts.append(f"<img src='{_png(fig)}' alt='ratings'>")
            plt.close(fig)
        except ImportError:
            parts.append("<p>(install matplotlib, the <code>report</code> extra, for the plot)</p>")
    pw = results.get("pairwise")
    if pw:
        parts += ["<h2>Pairwise: win / tie / loss (both orders; a win needs both to agree)</h2>",
                  _table(["model A", "model B", "A wins", "ties", "B wins", "unparsable", "A win rate",
                          "orders agree"],
                         [[r["model_a"], r["model_b"], r["win"], r["tie"], r["loss"], r["unparsable"],
                           r["win_rate"], r["agreement"]] for r in pw.values()])]
        soft_rows = [r for r in pw.values() if r.get("mean_prob")]
        if soft_rows:
            parts += ["<h3>Likelihood verdicts: probabilities averaged over both orders (position-balanced)</h3>",
                      _table(["model A", "model B", "P(A better)", "P(B better)", "P(tie)", "soft A win rate"],
                             [[r["model_a"], r["model_b"], r["mean_prob"]["model_a"], r["mean_prob"]["model_b"],
                               r["mean_prob"]["tie"], r["soft_win_rate"]] for r in soft_rows])]
        for name, r in pw.items():
            parts += [f"<h3>{esc(name)}, by category</h3>",
                      _table(["category", "A wins", "ties", "B wins", "unparsable"],
                             [[c, v["win"], v["tie"], v["loss"], v["unparsable"]]
                              for c, v in sorted(r["by_category"].items())])]
        pos = results.get("position", {})
        parts.append(f"<p>Position bias: of {pos.get('verdicts')} single-order verdicts, the answer shown first won "
                     f"{pos.get('first_wins')}, the second {pos.get('second_wins')}, ties {pos.get('ties')} "
                     f"(first-position win rate {pos.get('first_win_rate')}).</p>")
        if pos.get("mean_prob"):
            mp = pos["mean_prob"]
            parts.append(f"<p>Mean verdict probabilities: shown first {mp['first']}, shown second {mp['second']}, "
                         f"tie {mp['tie']}; mean probability on any valid verdict {pos.get('mean_verdict_mass')}.</p>")
    sg = results.get("single")
    if sg:
        cats = sorted({c for v in sg.values() for c in v["by_category"]})
        turns = sorted({t for v in sg.values() for t in v["by_turn"]})
        lik = any("score_argmax" in v for v in sg.values())  # likelihood: the weighted mean, then the argmax
        parts += ["<h2>Single-answer grades (1-10)</h2>",
                  _table(["model", "score", *(["most likely grade (mean)", "P(any grade)"] if lik else []),
                          *[f"turn {t}" for t in turns], "judged", "unparsable"],
                         [[m, v["score"], *([v.get("score_argmax"), v.get("mean_verdict_mass")] if lik else []),
                           *[v["by_turn"].get(t) for t in turns], v["judged"], v["unparsable"]]
                          for m, v in sg.items()]),
                  "<h3>By category</h3>",
                  _table(["category", *sg], [[c, *[sg[m]["by_category"].get(c) for m in sg]] for c in cats])]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(cats)), 3.4))
            width = 0.8 / max(1, len(sg))
            for k, (m, v) in enumerate(sg.items()):
                ax.bar([i + k * width for i in range(len(cats))], [v["by_category"].get(c) or 0 for c in cats],
                       width, label=m)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
            ax.set_ylim(0, 10)
            ax.set_ylabel("mean grade (1-10)")
            ax.legend()
            ax.grid(alpha=0.3, axis="y")
            parts.append(f"<img src='{_png(fig)}' alt='grades by category'>")
            plt.close(fig)
        except ImportError:
            pass
    if examples:
        parts.append("<h2>Some judgments (prompt and reply in judgments.jsonl)</h2>")
        for r in examples:
            who = r.get("model") or f"A = {r.get('model_a')}, B = {r.get('model_b')}"
            got = r.get("rating", r.get("verdict"))
            if r.get("probs"):
                got = f"{got} (probabilities {r['probs']})"
            parts.append(f"<p><b>question {esc(str(r['question_id']))} ({esc(r['category'])}), turn {r['turn']}, "
                         f"{esc(who)}: {esc(str(got))}</b></p><pre>{esc(_shown_reply(r))}</pre>")
    parts += ["<h2>Run</h2>", f"<pre>{esc(json.dumps(meta, indent=2, default=str)[:20000])}</pre>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>judge</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
    path = RunDir(out).report
    path.write_text(page, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the whole run


def local_judge_path(base_url: str) -> str:
    """The model path of ``--base-url local:PATH`` (or of LLAMALAB_BASE_URL / OPENAI_BASE_URL when the flag is not
    given): ``--verdict likelihood`` needs the judge's weights in this process."""
    url = base_url or os.environ.get("LLAMALAB_BASE_URL", "") or os.environ.get("OPENAI_BASE_URL", "")
    if not url.startswith("local:") or not url[len("local:"):]:
        from llamalab.synth.client import public_url

        raise LlamalabError(f"--verdict likelihood scores the verdict with the judge model's own probabilities, "
                            f"so it needs a local judge: --base-url local:PATH (a model folder or .gguf), got "
                            f"{public_url(url) if url else 'none'!r}")
    return url[len("local:"):]


def run_judge(cfg: Any) -> dict[str, Any]:
    """``llamalab judge``: answers for every --models entry, read --answers files, judge, summarize, report.

    ``cfg`` is the command's Config (a :class:`llamalab.synth.client.ClientConfig` with the fields below)."""
    from dataclasses import fields

    t0 = time.perf_counter()
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(cfg.questions, cfg.limit)
    refs = load_references(cfg.references) if cfg.references else {}
    ref_counts = attach_references(questions, refs, cfg.reference_categories)
    specs = [parse_model_spec(s) for s in cfg.models]
    answer_files = []
    for a in cfg.answers:
        name, p = a.split("=", 1) if "=" in a and _NAME_RE.match(a.split("=", 1)[0]) else ("", a)
        answer_files.append((name or None, p))
    from llamalab.synth.client import ClientConfig

    client_base = ClientConfig(**{f.name: getattr(cfg, f.name) for f in fields(ClientConfig)})
    aset = AnswerSettings(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                          slots=cfg.slots, quantize=cfg.quantize, max_seq_len=cfg.max_seq_len)
    answers: dict[str, dict[Any, dict]] = {}
    answer_stats = []
    for spec in specs:
        if spec.name in answers:
            raise LlamalabError(f"--models: two models are named {spec.name!r}; name them: NAME=PATH")
        answer_stats.append(generate_answers(spec, questions, out, aset, client_base))
        answers[spec.name] = read_answers(answers_path(out, spec.name), spec.name)[1]
    for name, p in answer_files:
        n, rows = read_answers(p, name)
        if n in answers:
            raise LlamalabError(f"--answers {p}: model name {n!r} is taken; name it: --answers NAME=FILE")
        answers[n] = rows
        answer_stats.append({"model": n, "path": str(p), "already": len(rows), "from_file": True})
    models = list(answers)
    meta: dict[str, Any] = {
        "command": "judge", "mode": cfg.mode, "prompts_sha256": prompts.prompts_sha256(),
        "questions": {"path": str(cfg.questions), "sha256": sha256_file(cfg.questions), "count": len(questions),
                      "limit": cfg.limit},
        "references": {"path": cfg.references or None,
                       "sha256": sha256_file(cfg.references) if cfg.references else None,
                       "categories": list(cfg.reference_categories), **ref_counts},
        "models": [{"name": s.name, "source": s.source, "options": s.options} for s in specs]
        + [{"name": n, "answers_file": str(p)} for n, p in answer_files],
        "answers": answer_stats}
    if cfg.answer_only:
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        write_json_atomic(RunDir(out).meta, meta)
        print0(f"judge: answers only: {len(questions)} question(s), {len(models)} model(s) -> {out / ANSWERS_DIR}")
        return {"meta": meta}
    if cfg.mode != "single" and len(models) < 2:
        raise LlamalabError(f"--mode {cfg.mode} compares models: give at least two (--models / --answers), "
                            f"or use --mode single")
    verdict = getattr(cfg, "verdict", "text")
    jset = JudgeSettings(mode=cfg.mode, max_tokens=cfg.judge_max_tokens, temperature=cfg.judge_temperature,
                         baseline=cfg.baseline, chunk=max(8, 4 * max(1, cfg.concurrency)))
    client: Any
    if verdict == "likelihood":  # the judge model in-process, verdicts scored instead of written
        client = LikelihoodJudge.load(local_judge_path(cfg.base_url), name=cfg.model, lazy=True)
        judge_id = likelihood_judge_id(client)
        judge_params: dict[str, Any] = {"verdict": "likelihood", "pair": list(prompts.likelihood_choices("pair")),
                                        "single": list(prompts.likelihood_choices("single"))}
    else:
        from llamalab.synth.client import ChatClient

        client = ChatClient(client_base, cache_dir=Path(cfg.cache) if cfg.cache else out / CACHE_DIR)
        # NOTE: no verdict field here, so text-mode keys (and runs made before --verdict existed) stay valid
        judge_id = {"endpoint": client.endpoint, "model": client.model, "max_tokens": jset.max_tokens,
                    "temperature": jset.temperature}
        judge_params = {"verdict": "text", "max_tokens": jset.max_tokens, "temperature": jset.temperature}
    jobs, skipped = build_jobs(questions, answers, jset, judge_id)
    if verdict == "likelihood":
        records, counts = run_likelihood_judgments(jobs, client, out)
    else:
        records, counts = run_judgments(jobs, client, out, jset)
    pairs = model_pairs(models, jset.baseline) if cfg.mode != "single" else []
    results = summarize(records, jobs, models, pairs, cfg.bootstrap, cfg.seed)
    results["verdict"] = verdict
    results["counts"] = {**counts, "not_judged": skipped,
                         "unparsable": sum(1 for r in records.values()
                                           if r.get("rating", 0) is None or r.get("verdict", 0) is None)}
    describe = client.describe()
    meta.update({"judge": describe, "verdict": verdict, "judge_params": judge_params,
                 "client_stats": getattr(client, "stats", {}), "counts": results["counts"],
                 "seconds": round(time.perf_counter() - t0, 2)})
    write_json_atomic(out / RESULTS, results)
    write_json_atomic(RunDir(out).meta, meta)
    write_report(out, results, meta, [records[j.key] for j in jobs if j.key in records][:6])
    c = results["counts"]
    print0(f"judge ({verdict} verdicts): {len(questions)} question(s), {len(models)} model(s), {c['jobs']} "
           f"judgment(s): {c['already']} done before, {c['sent']} asked ({c['cached']} from cache, {c['errors']} "
           f"failed), {c['unparsable']} unparsable, in {meta['seconds']:.1f}s -> {out}")
    for name, r in results.get("pairwise", {}).items():
        soft = f", soft win rate {r['soft_win_rate']}" if r.get("soft_win_rate") is not None else ""
        print0(f"  {name}: {r['win']} win / {r['tie']} tie / {r['loss']} loss ({r['unparsable']} unparsable{soft})")
    for m, v in (results.get("ratings") or {}).get("models", {}).items():
        print0(f"  {m}: rating {v['rating']:.0f} (95% CI {v['ci95'][0]:.0f} .. {v['ci95'][1]:.0f})")
    for m, v in (results.get("single") or {}).items():
        most = f", most likely grade {v['score_argmax']}" if v.get("score_argmax") is not None else ""
        print0(f"  {m}: score {v['score']}{most} ({v['unparsable']} unparsable of {v['judged']})")
    return {"results": results, "meta": meta}
