"""Multi-turn adherence: rule checks on known texts, the judge's yes/no parsing, per-turn rates from a scripted
endpoint (answers and judge), and `llamalab gatt eval` end to end on a tiny local model."""

from __future__ import annotations

import json

import pytest

from llamalab.common import LlamalabError
from llamalab.eval.adherence import (
    AdherenceOptions,
    EvalDialogue,
    builtin_dialogues,
    check_rule,
    evaluate_adherence,
    format_table,
    parse_rule,
    parse_verdict,
    read_eval_dialogues,
)
from llamalab.synth.client import ChatClient, ClientConfig
from llamalab.synth.gatt import Constraint, Instruction
from tests.finetune.conftest import write_jsonl
from tests.inference.conftest import llama_tok_path, model_folder  # noqa: F401 (fixtures)
from tests.synth.conftest import fake_chat  # noqa: F401 (fixture)

FR = "Bonjour ! Je vous recommande de commencer par des recettes simples et de bien lire chaque étape."
EN = "Hello! I recommend starting with simple recipes and reading every step carefully before you begin."


@pytest.mark.parametrize("rule,text,ok", [
    ("language:fr", FR, True),
    ("language:fr", EN, False),
    ("language:en", EN, True),
    ("language:de", "Ich empfehle, mit einfachen Rezepten anzufangen und jeden Schritt genau zu lesen.", True),
    ("language:fr", "?!", False),
    ("emoji_end", "Have a nice day 😊", True),
    ("emoji_end", "Have a nice day ❤️  ", True),  # heart + variation selector, trailing spaces
    ("emoji_end", "Family time 👨‍👩‍👧", True),  # a ZWJ sequence
    ("emoji_end", "Have a nice day 😊.", False),
    ("emoji_end", "No emoji here", False),
    ("emoji_end", "", False),
    ("max_words:5", "one two three four five", True),
    ("max_words:5", "one two three four five six", False),
    ("lowercase", "all lowercase, even digits 42.", True),
    ("lowercase", "not Quite", False),
    ("lowercase", "déjà vu", True),
    ("lowercase", "DÉJÀ", False),
    ("include:banana", "I love a Banana split.", True),
    ("include:banana", "bananas are not the word", False),
    ("include:banana", "no fruit", False),
    ("exclude:banana", "no fruit", True),
])
def test_rules_on_known_texts(rule, text, ok):
    assert check_rule(rule, text)[0] is ok


def test_rule_specs_are_validated():
    assert parse_rule("max_words:20") == ("max_words", "20")
    for bad, msg in [("shout", "unknown rule"), ("max_words:x", "positive integer"), ("language:French", "ISO"),
                     ("include:", "needs a word"), ("lowercase:yes", "no argument")]:
        with pytest.raises(LlamalabError, match=msg):
            parse_rule(bad)


@pytest.mark.parametrize("text,verdict", [
    ("yes", True), ("Yes.", True), ("[[YES]]", True), ("No", False), ("no, it answers in English", False),
    ("The answer is yes", True), ("maybe", None), ("", None), ("Yes and no.", None), ("Nope", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


def _reply(text: str) -> tuple:
    return 200, {}, {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]}, 0.0


def test_per_turn_rates_with_rules_and_judge(fake_chat, tmp_path):  # noqa: F811
    """Scripted model: French for two turns then English; scripted judge: yes / no / unparseable."""
    def model(body, k):
        n_user = sum(m["role"] == "user" for m in body["messages"])
        return _reply(FR if n_user <= 2 else EN)

    def judge(body, k):
        prompt = body["messages"][-1]["content"]
        assert "[Instruction]\nAct as a pirate." in prompt and "[Reply]\n" in prompt
        turn = prompt.split("[User]\n", 1)[1].split("\n", 1)[0]
        return _reply({"q1": "Yes.", "q2": "No, it does not.", "q3": "I cannot tell"}[turn])

    m, j = fake_chat(model), fake_chat(judge)
    dialogues = [EvalDialogue("fr", ["q1", "q2", "q3"], Instruction([Constraint("Answer in French.", rule="language:fr",
                                                                                  kind="language")])),
                 EvalDialogue("pirate", ["q1", "q2", "q3"], Instruction([Constraint("Act as a pirate.",
                                                                                    kind="figure")]))]
    client = ChatClient(ClientConfig(base_url=m.url, cache="off"))
    jclient = ChatClient(ClientConfig(base_url=j.url, cache="off"))
    res = evaluate_adherence(dialogues, [], client.chat_many, jclient.chat_many, AdherenceOptions(turns=3))
    # the instruction is in the first user turn only, and the history is the model's own answers
    first = m.bodies[0]["messages"]
    assert first == [{"role": "user", "content": "Answer in French.\n\nq1"}] or \
        first == [{"role": "user", "content": "Act as a pirate.\n\nq1"}]
    last = [b for b in m.bodies if len(b["messages"]) == 5]
    assert all(b["messages"][2]["content"] == "q2" and b["messages"][1]["content"] == FR for b in last)
    assert j.count == 3 and all(b["temperature"] == 0.0 for b in j.bodies)
    by = {(r["dialogue"], r["turn"]): r for r in res.rows}
    assert [by[("fr", t)]["followed"] for t in (1, 2, 3)] == [True, True, False]
    assert [by[("pirate", t)]["followed"] for t in (1, 2, 3)] == [True, False, None]
    assert by[("pirate", 3)]["judge"]["reply"] == "I cannot tell" and by[("fr", 1)]["method"] == "rule"
    t = {x["turn"]: x for x in res.table}
    assert (t[1]["judged"], t[1]["followed"], t[1]["rate"]) == (2, 2, 1.0)
    assert (t[2]["judged"], t[2]["followed"], t[2]["rate"]) == (2, 1, 0.5)
    assert (t[3]["judged"], t[3]["followed"], t[3]["unjudged"], t[3]["rate"]) == (1, 0, 1, 0.0)
    assert t[2]["by_kind"] == {"figure": {"followed": 0, "judged": 1, "rate": 0.0},
                               "language": {"followed": 1, "judged": 1, "rate": 1.0}}
    assert "| 2 | 2 | 2 | 1 | 50% |" in format_table(res.table)


def test_failed_answers_are_counted_not_judged(fake_chat):  # noqa: F811
    f = fake_chat(lambda body, k: (500, {}, "down", 0.0) if len(body["messages"]) > 1 else _reply("all lowercase"))
    inst = Instruction([Constraint("Write in lowercase.", rule="lowercase", kind="case")])
    res = evaluate_adherence([EvalDialogue("d", ["a", "b", "c"], inst)], [],
                             ChatClient(ClientConfig(base_url=f.url, retries=0, cache="off")).chat_many, None,
                             AdherenceOptions(turns=3))
    assert [r["followed"] for r in res.rows] == [True, None, None]
    assert "HTTP 500" in res.rows[1]["error"] and [t["unanswered"] for t in res.table] == [0, 1, 1]
    assert res.table[1]["rate"] is None


def test_eval_dialogue_files(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "turns": ["1", "2", "3"], "instruction": {"text": "Say banana.", "rule": "include:banana"}},
        {"id": "b", "turns": ["1"]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                           {"from": "human", "value": "z"}, {"from": "gpt", "value": "w"}]}])
    ds, skipped = read_eval_dialogues(p, turns=2)
    assert [d.id for d in ds] == ["a", "3"] and skipped == {"too_few_turns": 1}
    assert ds[0].turns == ["1", "2"] and ds[0].instruction.rules == ["include:banana"] and ds[1].turns == ["x", "z"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"turns": ["1", 2]}])
    with pytest.raises(LlamalabError, match=r"bad.jsonl:1: field 'turns'"):
        read_eval_dialogues(bad, turns=1)
    assert len(builtin_dialogues()) == 10 and all(len(d.turns) == 4 for d in builtin_dialogues())


def test_cli_on_a_local_model(model_folder, tmp_path):  # noqa: F811
    """`llamalab gatt eval --base-url local:MODEL`: in-process engine, rule checks, table, report, resumable."""
    from llamalab.cli import main

    out = tmp_path / "adh"
    argv = ["gatt", "eval", "--base-url", f"local:{model_folder}", "--turns", "2", "--limit", "3",
            "--max-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "adherence.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["turn"] for r in rows} == {1, 2}
    for r in rows:
        if r["answer"] is not None:
            assert r["method"] == "rule" and r["followed"] == all(c["ok"] for c in r["rule_checks"])
            assert [c["ok"] for c in r["rule_checks"]] == [check_rule(c["rule"], r["answer"])[0]
                                                           for c in r["rule_checks"]]
    table = json.loads((out / "adherence.json").read_text())["table"]
    assert [t["turn"] for t in table] == [1, 2] and sum(t["answers"] + t["unanswered"] for t in table) == 6
    meta = json.loads((out / "meta.json").read_text())
    assert meta["client"]["kind"] == "local" and meta["judge"] is None
    answered = [sum(r["answer"] is not None for r in rows if r["dialogue"] == d) for d in {r["dialogue"] for r in rows}]
    assert meta["client"]["retries"] == 4 and meta["requests"]["sent"] == sum(min(2, a + 1) for a in answered)
    assert "Adherence per turn" in (out / "report.html").read_text()
    assert main(argv) == 0  # a rerun sends nothing: every answer is in the cache
    assert json.loads((out / "meta.json").read_text())["requests"]["sent"] == 0
    # instructions no rule can check need a judge
    assert main(argv + ["--judged"]) == 2


def test_system_placement_sends_the_instruction_as_system_message(fake_chat):  # noqa: F811
    f = fake_chat(lambda body, k: _reply("tout va bien, merci beaucoup pour votre question"))
    inst = Instruction([Constraint("Always answer in French.", rule="language:fr", kind="language")])
    res = evaluate_adherence([EvalDialogue("d", ["a", "b"], inst)], [],
                             ChatClient(ClientConfig(base_url=f.url, cache="off")).chat_many, None,
                             AdherenceOptions(turns=2, placement="system"))
    assert f.bodies[0]["messages"] == [{"role": "system", "content": "Always answer in French."},
                                       {"role": "user", "content": "a"}]
    assert [m["content"] for m in f.bodies[1]["messages"] if m["role"] == "user"] == ["a", "b"]
    assert [t["rate"] for t in res.table] == [1.0, 1.0]
