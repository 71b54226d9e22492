"""Tasks as data: a task is a small dict (reader, prompt templates, few-shot rule, stop strings)
applied to a local file the user points at. ``TASKS`` holds the built-in definitions; a user task
is a JSON file with the same keys (``llamalab eval run MODEL --task-file my_task.json --path data.jsonl``).

Keys of a task definition:
- ``name``; ``kind``: ``multiple_choice`` | ``perplexity`` | ``qa`` | ``gsm8k`` | ``humaneval``;
- ``reader``: a record format from :mod:`llamalab.eval.tasks.readers` (``mc`` is the generic
  ``{question, choices, answer}``);
- ``prompt``: a ``str.format`` template over the record's fields (plus ``choices_block``: the
  choices as ``A. ...`` lines); ``choice``: the continuation template for each choice
  (``{choice}``, ``{letter}``); ``target``: the answer as written in few-shot examples;
- ``description``: text before everything (may use fields, e.g. MMLU's ``{subject_title}``);
- ``num_fewshot``, ``fewshot_sep`` and ``fewshot_group`` (examples only from records with the
  same value of that field, e.g. MMLU's subject); examples are the first ``k`` records of
  ``--fewshot-path`` (or of the evaluated file itself, never the item being scored);
- ``until`` and ``max_new_tokens`` for generation; ``doc``: where the format comes from.

Exact prompt formats (what the model reads, ``|`` marks where the scored continuation starts):
- ``arc_easy``/``arc_challenge``: ``Question: {question}\\nAnswer:| {choice}`` (lm-eval ``arc_*``).
- ``hellaswag``: ``{activity_label}: {ctx}| {ending}``, WikiHow markers removed (lm-eval).
- ``mmlu``/``mmlu_5shot``: ``The following are multiple choice questions (with answers) about
  {subject}.\\n\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:| {letter}``, shots separated by a
  blank line (MMLU paper / lm-eval ``mmlu``).
- ``truthfulqa_mc1``: the 6-question QA primer of the TruthfulQA paper, then ``Q: {question}\\nA:| {choice}``.
- ``piqa``: ``Question: {goal}\\nAnswer:| {sol}``; ``boolq``: ``{passage}\\nQuestion: {question}?\\nAnswer:| no|yes``;
  ``winogrande``: the sentence up to the blank with each option filled in, scoring the shared rest.
- ``gsm8k``: ``Question: {question}\\nAnswer:`` with 5 solved examples (``Answer: <solution> #### n``),
  stop at ``Question:``; ``nq_open``: ``Q: {question}?\\nA:`` and ``triviaqa``: ``Question: {question}?\\nAnswer:``,
  stop at a newline, period or comma; ``humaneval``: the function prompt as is, Codex stop strings.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, iter_jsonl, read_json
from llamalab.eval.tasks.readers import LETTERS, READERS, FieldError

KINDS = ("multiple_choice", "perplexity", "qa", "gsm8k", "humaneval")

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
)

MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject_title}.\n\n"
MMLU_PROMPT = "{question}\n{choices_block}\nAnswer:"
QA_UNTIL = ["\n", ".", ","]
CODEX_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

TASKS: dict[str, dict[str, Any]] = {
    "arc_easy": {"kind": "multiple_choice", "reader": "arc", "prompt": "Question: {question}\nAnswer:",
                 "choice": " {choice}", "doc": "ARC-Easy (Clark et al. 2018), lm-eval arc_easy format"},
    "arc_challenge": {"kind": "multiple_choice", "reader": "arc", "prompt": "Question: {question}\nAnswer:",
                      "choice": " {choice}", "doc": "ARC-Challenge, lm-eval arc_challenge format"},
    "hellaswag": {"kind": "multiple_choice", "reader": "hellaswag", "prompt": "{question}", "choice": " {choice}",
                  "doc": "HellaSwag (Zellers et al. 2019), lm-eval preprocessing"},
    "mmlu": {"kind": "multiple_choice", "reader": "mmlu", "prompt": MMLU_PROMPT, "choice": " {letter}",
             "description": MMLU_DESCRIPTION, "fewshot_group": "subject", "num_fewshot": 0,
             "doc": "MMLU (Hendrycks et al. 2021) zero-shot, lm-eval mmlu format"},
    "mmlu_5shot": {"kind": "multiple_choice", "reader": "mmlu", "prompt": MMLU_PROMPT, "choice": " {letter}",
                   "description": MMLU_DESCRIPTION, "fewshot_group": "subject", "num_fewshot": 5,
                   "doc": "MMLU 5-shot (examples of the same subject; pass the dev split as --fewshot-path)"},
    "truthfulqa_mc1": {"kind": "multiple_choice", "reader": "truthfulqa_mc1", "prompt": "Q: {question}\nA:",
                       "choice": " {choice}", "description": TRUTHFULQA_PRIMER, "shuffle_choices": True,
                       "doc": "TruthfulQA MC1 (Lin et al. 2022) with the paper's QA primer"},
    "piqa": {"kind": "multiple_choice", "reader": "piqa", "prompt": "Question: {question}\nAnswer:",
             "choice": " {choice}", "doc": "PIQA (Bisk et al. 2020), lm-eval format"},
    "boolq": {"kind": "multiple_choice", "reader": "boolq", "prompt": "{passage}\nQuestion: {question}?\nAnswer:",
              "choice": " {choice}", "doc": "BoolQ (Clark et al. 2019), lm-eval format"},
    "winogrande": {"kind": "multiple_choice", "reader": "winogrande", "prompt": "", "choice": "",
                   "doc": "WinoGrande (Sakaguchi et al. 2020), partial evaluation as lm-eval"},
    "mc": {"kind": "multiple_choice", "reader": "mc", "prompt": "Question: {question}\nAnswer:", "choice": " {choice}",
           "doc": "generic multiple choice {question, choices, answer}"},
    "perplexity": {"kind": "perplexity", "reader": "text",
                   "doc": "held-out text: JSONL with a 'text' field, or plain text files (one document each)"},
    "gsm8k": {"kind": "gsm8k", "reader": "gsm8k", "prompt": "Question: {question}\nAnswer:", "target": " {solution}",
              "num_fewshot": 5, "until": ["Question:", "</s>", "<|im_end|>", "\n\n\n"], "max_new_tokens": 256,
              "doc": "GSM8K (Cobbe et al. 2021), lm-eval gsm8k format; strict '#### n' and flexible last-number match"},
    "nq_open": {"kind": "qa", "reader": "qa", "prompt": "Q: {question}?\nA:", "target": " {answer}", "until": QA_UNTIL,
                "max_new_tokens": 32, "doc": "NaturalQuestions-open, lm-eval nq_open format, SQuAD normalisation"},
    "triviaqa": {"kind": "qa", "reader": "qa", "prompt": "Question: {question}?\nAnswer:", "target": " {answer}",
                 "until": QA_UNTIL, "max_new_tokens": 32, "doc": "TriviaQA (closed book), lm-eval triviaqa format"},
    "humaneval": {"kind": "humaneval", "reader": "humaneval", "prompt": "{prompt}", "until": CODEX_UNTIL,
                  "max_new_tokens": 384, "doc": "HumanEval (Chen et al. 2021): Codex stop strings, sandboxed tests"},
}


@dataclass
class Task:
    name: str
    kind: str
    reader: str
    prompt: str = ""
    choice: str = " {choice}"
    target: str = ""
    description: str = ""
    num_fewshot: int = 0
    fewshot_sep: str = "\n\n"
    fewshot_group: str = ""
    shuffle_choices: bool = False
    until: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    doc: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def task_from_dict(d: dict[str, Any], where: str) -> Task:
    if not isinstance(d, dict):
        raise LlamalabError(f"{where}: a task definition must be a JSON object")
    known = set(Task.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise LlamalabError(f"{where}: unknown task field(s) {sorted(unknown)}; known: {sorted(known)}")
    for req in ("name", "kind", "reader"):
        if req not in d:
            raise LlamalabError(f"{where}: task definition is missing field {req!r}")
    if d["kind"] not in KINDS:
        raise LlamalabError(f"{where}: field 'kind' is {d['kind']!r}; expected one of {', '.join(KINDS)}")
    if d["reader"] not in READERS:
        raise LlamalabError(f"{where}: field 'reader' is {d['reader']!r}; expected one of {', '.join(READERS)}")
    return Task(**d)


def get_task(name: str, num_fewshot: int = -1) -> Task:
    """A built-in task by name, or a task JSON file when ``name`` ends in ``.json``."""
    if name.endswith(".json"):
        task = task_from_dict(read_json(name, what="task file"), name)
    elif name in TASKS:
        task = task_from_dict({"name": name, **TASKS[name]}, f"built-in task {name}")
    else:
        raise LlamalabError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)} (or a task .json file)")
    if num_fewshot >= 0:
        task.num_fewshot = num_fewshot
    return task


# ----------------------------------------------------------------------------- items


@dataclass
class Item:
    """One evaluated record: its source line, an id, and the reader's fields."""

    line: int
    id: str
    fields: dict[str, Any]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8-sig")


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file (``.gz`` read transparently)."""
    if not path.exists():
        raise LlamalabError(f"task file not found: {path}")
    out = []
    try:
        with _open_text(path) as f:
            for n, rec in iter_jsonl(f, path):
                if not isinstance(rec, dict):
                    raise LlamalabError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                out.append((n, rec))
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise LlamalabError(f"{path}: cannot read ({e})") from None
    return out


def _shuffled(fields: dict[str, Any], key: str) -> dict[str, Any]:
    """Choices in a fixed pseudo-random order per item (seeded by the item id), gold remapped."""
    rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
    perm = list(range(len(fields["choices"])))
    rng.shuffle(perm)
    return {**fields, "choices": [fields["choices"][p] for p in perm], "gold": perm.index(fields["gold"])}


def load_items(task: Task, path: str | Path, limit: int = 0) -> list[Item]:
    """Read and check every record of ``path`` for ``task``; errors name ``file:line`` and the field."""
    path = Path(path)
    if task.kind == "perplexity" and path.suffix not in (".jsonl", ".json", ".gz"):
        text = path.read_text(encoding="utf-8-sig") if path.exists() else None
        if text is None:
            raise LlamalabError(f"task file not found: {path}")
        if not text.strip():
            raise LlamalabError(f"{path}: empty task (no text)")
        return [Item(1, path.name, {"text": text})]
    reader = READERS[task.reader]
    items = []
    for n, rec in read_records(path):
        try:
            fields = reader(rec)
        except FieldError as e:
            raise LlamalabError(f"{path}:{n}: {e} (task {task.name}, reader {task.reader})") from None
        item_id = str(rec.get("id", rec.get("task_id", f"{path.name}:{n}")))
        if task.shuffle_choices and "choices" in fields:
            fields = _shuffled(fields, item_id)
        items.append(Item(n, item_id, fields))
        if limit and len(items) >= limit:
            break
    if not items:
        raise LlamalabError(f"{path}: empty task (no records for {task.name})")
    return items


# ----------------------------------------------------------------------------- prompts


def template_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Record fields plus derived ones: ``choices_block``, ``answer`` (first answer) for templates."""
    out = dict(fields)
    if "choices" in fields:
        out["choices_block"] = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(fields["choices"]))
    if "answers" in fields:
        out["answer"] = fields["answers"][0]
    return out


def fill(template: str, fields: dict[str, Any], where: str) -> str:
    try:
        return template.format(**template_fields(fields))
    except KeyError as e:
        raise LlamalabError(f"{where}: template {template!r} uses field {e} which the record does not have") from None
    except (IndexError, ValueError) as e:
        raise LlamalabError(f"{where}: bad template {template!r} ({e})") from None


def gold_target(task: Task, fields: dict[str, Any], where: str) -> str:
    """The answer as written after a few-shot example's prompt."""
    if task.kind == "multiple_choice":
        g = fields["gold"]
        return fill(task.choice, {**fields, "choice": fields["choices"][g], "letter": LETTERS[g]}, where)
    return fill(task.target, fields, where)


def fewshot_examples(task: Task, item: Item, pool: list[Item]) -> list[Item]:
    """The first ``num_fewshot`` pool records (same group if the task has one), never ``item`` itself."""
    if task.num_fewshot <= 0:
        return []
    g = task.fewshot_group
    out = []
    for ex in pool:
        if ex is item or (ex.id == item.id and ex.fields == item.fields):
            continue
        if g and ex.fields.get(g) != item.fields.get(g):
            continue
        out.append(ex)
        if len(out) == task.num_fewshot:
            break
    return out


def build_context(task: Task, item: Item, pool: list[Item], where: str) -> str:
    """description + solved examples + this item's prompt (the text before the scored/generated part)."""
    parts = [fill(task.prompt, ex.fields, where) + gold_target(task, ex.fields, where)
             for ex in fewshot_examples(task, item, pool)]
    parts.append(fill(task.prompt, item.fields, where))
    return fill(task.description, item.fields, where) + task.fewshot_sep.join(parts)


def choice_pairs(task: Task, item: Item, pool: list[Item], where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(context, continuation) per choice and the continuation strings used for acc_norm."""
    f = item.fields
    if "contexts" in f:  # partial evaluation (WinoGrande): per-choice context, shared continuation
        prefix = (build_context(task, Item(item.line, item.id, {**f, "question": ""}), pool, where)
                  if task.prompt else "")
        return [(prefix + c, f["continuation"]) for c in f["contexts"]], [f["continuation"]] * len(f["contexts"])
    ctx = build_context(task, item, pool, where)
    conts = [fill(task.choice, {**f, "choice": c, "letter": LETTERS[i]}, where) for i, c in enumerate(f["choices"])]
    return [(ctx, c) for c in conts], conts
