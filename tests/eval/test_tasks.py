"""Task files: real formats read correctly; bad input fails naming file and line; prompt formats."""

from __future__ import annotations

import json

import pytest

from llamalab.common import LlamalabError
from llamalab.eval.tasks import TASKS, build_context, choice_pairs, get_task, load_items
from tests.conftest import shared_path

REAL = {
    "arc_easy": "eval/arc/ARC-Easy-Dev.jsonl",
    "arc_challenge": "eval/arc/ARC-Challenge-Dev.jsonl",
    "hellaswag": "eval/hellaswag_100.jsonl",
    "mmlu": "eval/mmlu.jsonl.gz",
    "truthfulqa_mc1": "eval/truthfulqa_mc1_100.jsonl",
    "gsm8k": "eval/gsm8k_test.jsonl.gz",
    "humaneval": "eval/HumanEval.jsonl.gz",
}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", list(REAL))
def test_real_files_load(name):
    items = load_items(get_task(name), shared_path(REAL[name]), limit=50)
    assert len(items) == 50
    for it in items:
        if "choices" in it.fields:
            assert 0 <= it.fields["gold"] < len(it.fields["choices"])


def test_arc_prompt_format():
    task = get_task("arc_easy")
    [it] = load_items(task, shared_path(REAL["arc_easy"]), limit=1)
    pairs, conts = choice_pairs(task, it, [it], "t")
    assert pairs[0] == ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone")
    assert conts == [" cellular telephone", " television", " refrigerator", " airplane"] and it.fields["gold"] == 0


def test_mmlu_five_shot_uses_same_subject_and_never_the_item():
    task = get_task("mmlu_5shot")
    items = load_items(task, shared_path(REAL["mmlu"]), limit=400)
    it = items[10]
    ctx = build_context(task, it, items, "t")
    subject = it.fields["subject"]
    same = [x for x in items if x.fields["subject"] == subject and x is not it][:5]
    assert ctx.startswith("The following are multiple choice questions (with answers) "
                          f"about {subject.replace('_', ' ')}.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith(f"{it.fields['question']}\n" + "\n".join(
        f"{L}. {c}" for L, c in zip("ABCD", it.fields["choices"])) + "\nAnswer:")
    for ex in same:
        assert ex.fields["question"] in ctx
    assert ctx.count(it.fields["question"]) == 1
    pairs, _ = choice_pairs(task, it, items, "t")
    assert [c for _, c in pairs] == [" A", " B", " C", " D"]


def test_truthfulqa_choices_are_shuffled_deterministically():
    task = get_task("truthfulqa_mc1")
    a = load_items(task, shared_path(REAL["truthfulqa_mc1"]))
    b = load_items(task, shared_path(REAL["truthfulqa_mc1"]))
    assert [x.fields for x in a] == [x.fields for x in b]
    golds = [x.fields["gold"] for x in a]
    assert len(set(golds)) > 1  # the file always says 0; the gold answer now moves around
    raw = [json.loads(line) for line in shared_path(REAL["truthfulqa_mc1"]).read_text().splitlines()]
    assert all(x.fields["choices"][x.fields["gold"]] == r["choices"][0] for x, r in zip(a, raw))


def test_winogrande_partial_evaluation(tmp_path):
    p = write_jsonl(tmp_path / "w.jsonl", [{"sentence": "The trophy didn't fit in the suitcase "
                                                        "because the _ was too big.",
                                            "option1": "trophy", "option2": "suitcase", "answer": "1"}])
    task = get_task("winogrande")
    [it] = load_items(task, p)
    pairs, _ = choice_pairs(task, it, [it], "t")
    assert pairs == [("The trophy didn't fit in the suitcase because the trophy", " was too big."),
                     ("The trophy didn't fit in the suitcase because the suitcase", " was too big.")]
    assert it.fields["gold"] == 0


def test_missing_field_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q1", "choices": ["a", "b"], "answer": 0},
                                             {"question": "q2", "answer": 1}])
    with pytest.raises(LlamalabError, match=r"bad\.jsonl:2: missing field 'choices'"):
        load_items(get_task("mc"), p)


def test_answer_index_out_of_range_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", ["", {"question": "q", "choices": ["a", "b", "c"], "answer": 3}])
    with pytest.raises(LlamalabError, match=r"bad\.jsonl:2: .*answer index 3 out of range for 3 choices"):
        load_items(get_task("mc"), p)


def test_arc_answer_key_not_a_label(tmp_path):
    rec = {"question": {"stem": "s", "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]},
           "answerKey": "E"}
    p = write_jsonl(tmp_path / "arc.jsonl", [rec, rec])
    p2 = write_jsonl(tmp_path / "arc2.jsonl", [rec | {"answerKey": "B"}, rec])
    with pytest.raises(LlamalabError, match=r"arc2\.jsonl:2: field 'answerKey': 'E'"):
        load_items(get_task("arc_easy"), p2)
    with pytest.raises(LlamalabError, match=r"arc\.jsonl:1:"):
        load_items(get_task("arc_easy"), p)


def test_invalid_json_and_empty_task(tmp_path):
    p = write_jsonl(tmp_path / "broken.jsonl", [{"question": "q", "choices": ["a"], "answer": 0}, "{not json"])
    with pytest.raises(LlamalabError, match=r"broken\.jsonl:2: not valid JSON"):
        load_items(get_task("mc"), p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LlamalabError, match=r"empty\.jsonl: empty task"):
        load_items(get_task("mc"), empty)
    with pytest.raises(LlamalabError, match="task file not found"):
        load_items(get_task("mc"), tmp_path / "nope.jsonl")


def test_user_task_file(tmp_path):
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"name": "colors", "kind": "multiple_choice", "reader": "mc",
                                "prompt": "Q: {question}\nA:", "choice": " {choice}"}))
    task = get_task(str(spec))
    assert task.name == "colors" and task.prompt == "Q: {question}\nA:"
    spec.write_text(json.dumps({"name": "x", "kind": "multiple_choice"}))
    with pytest.raises(LlamalabError, match=r"mine\.json: task definition is missing field 'reader'"):
        get_task(str(spec))
    spec.write_text(json.dumps({"name": "x", "kind": "mc", "reader": "mc"}))
    with pytest.raises(LlamalabError, match="field 'kind'"):
        get_task(str(spec))
    with pytest.raises(LlamalabError, match="unknown task 'nope'"):
        get_task("nope")


def test_template_with_unknown_field(tmp_path):
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"name": "x", "kind": "multiple_choice", "reader": "mc", "prompt": "{stem}"}))
    p = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 1}])
    task = get_task(str(spec))
    [it] = load_items(task, p)
    with pytest.raises(LlamalabError, match=r"d\.jsonl:1: template '\{stem\}' uses field 'stem'"):
        choice_pairs(task, it, [it], f"{p}:1")


def test_every_builtin_task_is_valid():
    for name in TASKS:
        assert get_task(name).name == name
