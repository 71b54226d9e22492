"""Record readers: one raw JSON record of a benchmark file -> the fields a task's templates use.

Each reader knows one public file format (the original release, or the Hugging Face datasets
export) and returns a plain dict. Multiple-choice readers always return ``question``, ``choices``
(list of strings) and ``gold`` (an index); the task then adds ``letter``/``choices_block``.
A missing field or an answer out of range raises :class:`FieldError`, which the loader turns into
a ``file:line`` message.
"""

from __future__ import annotations

import re
from typing import Any, Callable

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class FieldError(ValueError):
    """A problem with one record; the loader adds the file and line."""


def need(rec: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``rec`` (alternative spellings of one field)."""
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    raise FieldError(f"missing field {names[0]!r}"
                     + (f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""))


def _str_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise FieldError(f"field {field!r} must be a non-empty list of strings")
    return value


def gold_index(answer: Any, n_choices: int, field: str, labels: list[str] | None = None) -> int:
    """An answer given as an index (0-based int or digit string), a letter, or one of ``labels``."""
    labels = labels or list(LETTERS[:n_choices])
    if isinstance(answer, bool):
        raise FieldError(f"field {field!r}: expected an index or a letter, got {answer!r}")
    if isinstance(answer, str) and answer.strip() in labels:
        return labels.index(answer.strip())
    try:
        idx = int(answer)
    except (TypeError, ValueError):
        raise FieldError(f"field {field!r}: {answer!r} is neither an index nor one of {labels}") from None
    if not 0 <= idx < n_choices:
        raise FieldError(f"field {field!r}: answer index {idx} out of range for {n_choices} choices")
    return idx


def mc(question: str, choices: list[str], gold: int, **extra: Any) -> dict[str, Any]:
    return {"question": question, "choices": choices, "gold": gold, **extra}


# ----------------------------------------------------------------------------- multiple choice


def read_generic_mc(rec: dict[str, Any]) -> dict[str, Any]:
    """``{question, choices, answer}`` (answer: index or letter); also ``gold``/``label``."""
    choices = _str_list(need(rec, "choices", "options", "endings"), "choices")
    gold = gold_index(need(rec, "answer", "gold", "label", "expected_index"), len(choices), "answer")
    return mc(str(need(rec, "question", "query", "ctx")), choices, gold)


def read_arc(rec: dict[str, Any]) -> dict[str, Any]:
    """AI2 ARC JSONL: ``{question: {stem, choices: [{text, label}]}, answerKey}`` (labels A-E or 1-5)."""
    q = need(rec, "question")
    if isinstance(q, dict):  # original release
        stem = need(q, "stem")
        raw = need(q, "choices")
        if not isinstance(raw, list) or not raw:
            raise FieldError("field 'question.choices' must be a non-empty list")
        texts = [str(need(c, "text")) for c in raw]
        labels = [str(need(c, "label")) for c in raw]
    else:  # HF export: question, choices: {text: [...], label: [...]}
        stem = q
        ch = need(rec, "choices")
        texts, labels = _str_list(need(ch, "text"), "choices.text"), [str(x) for x in need(ch, "label")]
    key = str(need(rec, "answerKey")).strip()
    if key not in labels:
        raise FieldError(f"field 'answerKey': {key!r} is not one of the choice labels {labels}")
    return mc(str(stem), texts, labels.index(key))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: drop WikiHow ``[title]``/``[header]`` markers."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(rec: dict[str, Any]) -> dict[str, Any]:
    """HellaSwag: ``{activity_label, ctx | ctx_a+ctx_b, endings, label | expected_index}``."""
    if "ctx_a" in rec:
        ctx = str(rec["ctx_a"]) + " " + str(rec.get("ctx_b", "")).capitalize()
    else:
        ctx = str(need(rec, "ctx"))
    endings = _str_list(need(rec, "endings"), "endings")
    gold = gold_index(need(rec, "label", "expected_index"), len(endings), "label")
    query = _hellaswag_clean(str(need(rec, "activity_label")) + ": " + ctx)
    return mc(query, [_hellaswag_clean(e) for e in endings], gold)


def read_mmlu(rec: dict[str, Any]) -> dict[str, Any]:
    """MMLU: ``{subject, question, choices[4], answer}`` (answer: 0-3 or A-D)."""
    choices = _str_list(need(rec, "choices"), "choices")
    gold = gold_index(need(rec, "answer"), len(choices), "answer")
    subject = str(rec.get("subject", "general"))
    return mc(str(need(rec, "question")).strip(), choices, gold, subject=subject,
              subject_title=subject.replace("_", " "))


def read_truthfulqa_mc1(rec: dict[str, Any]) -> dict[str, Any]:
    """TruthfulQA MC1: ``{question, choices, expected_index}`` or HF ``mc1_targets: {choices, labels}``."""
    if "mc1_targets" in rec:
        t = rec["mc1_targets"]
        choices = _str_list(need(t, "choices"), "mc1_targets.choices")
        labels = need(t, "labels")
        if 1 not in labels:
            raise FieldError("field 'mc1_targets.labels' has no correct answer (no 1)")
        gold = labels.index(1)
    else:
        choices = _str_list(need(rec, "choices"), "choices")
        gold = gold_index(need(rec, "expected_index", "label", "answer"), len(choices), "expected_index")
    return mc(str(need(rec, "question")), choices, gold)


def read_piqa(rec: dict[str, Any]) -> dict[str, Any]:
    """PIQA: ``{goal, sol1, sol2, label}``."""
    choices = [str(need(rec, "sol1")), str(need(rec, "sol2"))]
    return mc(str(need(rec, "goal")), choices, gold_index(need(rec, "label"), 2, "label"))


def read_boolq(rec: dict[str, Any]) -> dict[str, Any]:
    """BoolQ: ``{passage, question, answer: bool}`` (or ``label`` 0/1); choices are no / yes."""
    ans = need(rec, "answer", "label")
    gold = int(ans) if isinstance(ans, bool) else gold_index(ans, 2, "answer")
    return mc(str(need(rec, "question")), ["no", "yes"], gold, passage=str(need(rec, "passage")))


def read_winogrande(rec: dict[str, Any]) -> dict[str, Any]:
    """WinoGrande: ``{sentence with _, option1, option2, answer: "1"|"2"}``, scored by partial evaluation:
    each option fills the blank in the context and the shared rest of the sentence is what is scored."""
    sentence = str(need(rec, "sentence"))
    if "_" not in sentence:
        raise FieldError("field 'sentence' has no '_' blank")
    idx = sentence.index("_")
    opts = [str(need(rec, "option1")), str(need(rec, "option2"))]
    gold = gold_index(need(rec, "answer"), 2, "answer", labels=["1", "2"])
    cont = " " + sentence[idx + 1:].strip()
    return mc(sentence, opts, gold, contexts=[sentence[:idx] + o for o in opts], continuation=cont)


# ----------------------------------------------------------------------------- text, generation


def read_text_record(rec: dict[str, Any]) -> dict[str, Any]:
    text = need(rec, "text")
    if not isinstance(text, str):
        raise FieldError("field 'text' must be a string")
    return {"text": text}


def gsm8k_final(answer: str) -> str:
    """The number after ``####`` in a GSM8K reference solution."""
    if "####" not in answer:
        raise FieldError("field 'answer' has no '#### <number>' final line")
    return answer.split("####")[-1].strip().replace(",", "")


def read_gsm8k(rec: dict[str, Any]) -> dict[str, Any]:
    """GSM8K: ``{question, answer: "...#### n"}`` or ``{prompt, expected, upstream_answer}``."""
    if "question" in rec:
        sol = str(need(rec, "answer"))
        return {"question": str(rec["question"]), "solution": sol, "target": gsm8k_final(sol)}
    expected = str(need(rec, "expected", "answer")).replace(",", "").strip()
    sol = str(rec.get("upstream_answer") or f"#### {expected}")
    return {"question": str(need(rec, "prompt")), "solution": sol, "target": expected}


def read_qa(rec: dict[str, Any]) -> dict[str, Any]:
    """Closed-book QA: NaturalQuestions-open ``{question, answer: [..]}``, TriviaQA
    ``{question, answer: {value, aliases}}`` or ``{question, answers: [..]}``."""
    ans = need(rec, "answer", "answers")
    if isinstance(ans, dict):
        aliases = [ans.get("value", "")] + list(ans.get("aliases", [])) + list(ans.get("normalized_aliases", []))
    elif isinstance(ans, str):
        aliases = [ans]
    else:
        aliases = list(ans)
    aliases = [str(a) for a in aliases if str(a).strip()]
    if not aliases:
        raise FieldError("field 'answer' has no non-empty answer")
    return {"question": str(need(rec, "question")).rstrip("?"), "answers": aliases}


def read_humaneval(rec: dict[str, Any]) -> dict[str, Any]:
    """HumanEval: ``{task_id, prompt, test, entry_point[, canonical_solution]}``."""
    return {"task_id": str(need(rec, "task_id")), "prompt": str(need(rec, "prompt")), "test": str(need(rec, "test")),
            "entry_point": str(need(rec, "entry_point")), "canonical_solution": rec.get("canonical_solution")}


READERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mc": read_generic_mc, "arc": read_arc, "hellaswag": read_hellaswag, "mmlu": read_mmlu,
    "truthfulqa_mc1": read_truthfulqa_mc1, "piqa": read_piqa, "boolq": read_boolq, "winogrande": read_winogrande,
    "text": read_text_record, "gsm8k": read_gsm8k, "qa": read_qa, "humaneval": read_humaneval,
}
