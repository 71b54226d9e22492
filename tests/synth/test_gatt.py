"""Ghost Attention data: the loss covers exactly the last answer; regeneration is turn by turn on the
regenerated history, with the instruction in every sampled user turn and only the first trained one;
failures are cut or dropped with a reason; a rerun is served by the cache; a real `llamalab serve` end to end."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llamalab.common import LlamalabError
from llamalab.finetune.data import load_sft_data
from llamalab.finetune.packing import targets_of
from llamalab.synth.client import ChatClient, ClientConfig
from llamalab.synth.gatt import (
    Constraint,
    Dialogue,
    GattLedger,
    GattOptions,
    Instruction,
    default_constraints,
    read_constraints,
    read_dialogues,
    run_gatt,
    training_records,
)
from llamalab.tokenizer.templates import render
from llamalab.train.step import IGNORE_INDEX
from tests.conftest import shared_path
from tests.finetune.conftest import write_jsonl

USERS = ["Where do you teach?", "Do you like the town?", "Why do you stay?"]
ANSWERS = ["I teach mathematics at the middle school.", "Not at all; the students are rude.",
           "Because I promised Kiyo I would."]
FRENCH = Instruction([Constraint("Always answer in French.", "Language: French.", "language", "language:fr")])


def _messages(rec: dict) -> list[dict]:
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"role": role[m["from"]], "content": m["value"]} for m in rec["conversations"]]


def _expected_mask(msgs: list[dict], template: str, tok) -> tuple[list[int], list[int]]:
    """Independent of the weight code: loss positions are those after the rendered prompt of the last turn."""
    ids, mask = render(msgs, template, tok, add_generation_prompt=False)
    prompt = render(msgs[:-1], template, tok, add_generation_prompt=True)[0]
    assert ids[:len(prompt)] == prompt, "the prompt of the last turn is a token prefix of the whole dialogue"
    return ids, [0] * len(prompt) + mask[len(prompt):]


@pytest.mark.parametrize("template", ["llama2", "chatml", "vicuna", "llama3"])
@pytest.mark.parametrize("placement", ["user", "system"])
def test_gatt_masks_exactly_the_earlier_turns(tmp_path, botchan_tokenizer, template, placement):
    d = Dialogue("d1", "src:1", USERS)
    opts = GattOptions(placement=placement, short_fraction=0.0)
    rec = training_records(d, FRENCH, ANSWERS, opts)[0]
    msgs = _messages(rec)
    # the instruction is in the first turn (or the system message) only
    with_inst = [m for m in msgs if "Always answer in French." in m["content"]]
    assert len(with_inst) == 1 and with_inst[0]["role"] == ("user" if placement == "user" else "system")
    assert [m["weight"] for m in rec["conversations"] if m["from"] == "gpt"] == [0, 0, 1]

    path = write_jsonl(tmp_path / "gatt.jsonl", [rec])
    exs, ledger = load_sft_data([path], "sharegpt", template, botchan_tokenizer, max_len=4096)
    assert ledger.kept == 1 and not ledger.dropped and len(exs) == 1
    ids, want = _expected_mask(msgs, template, botchan_tokenizer)
    assert exs[0].ids == ids
    assert exs[0].mask == want
    # the labels: IGNORE_INDEX everywhere but the last answer's tokens (and its closing token)
    targets = targets_of(exs[0])
    trained = [t for t, y in enumerate(targets) if y != IGNORE_INDEX]
    assert trained == [t - 1 for t, m in enumerate(want) if m]
    text = botchan_tokenizer.decode([ids[t + 1] for t in trained])
    assert ANSWERS[-1] in text and ANSWERS[0] not in text and ANSWERS[1] not in text
    # without the weights every answer would be trained: the mask really changed
    full = render(msgs, template, botchan_tokenizer, add_generation_prompt=False)[1]
    assert sum(full) > sum(want) > 0


def test_every_turn_trains_each_answer_once(tmp_path, botchan_tokenizer):
    d = Dialogue("d1", "src:1", USERS)
    recs = training_records(d, FRENCH, ANSWERS, GattOptions(every_turn=True, short_fraction=0.0))
    assert [r["id"] for r in recs] == ["d1#t1", "d1#t2", "d1#t3"]
    path = write_jsonl(tmp_path / "g.jsonl", recs)
    exs, _ = load_sft_data([path], "sharegpt", "llama2", botchan_tokenizer, max_len=4096)
    for k, ex in enumerate(exs):
        msgs = _messages(recs[k])
        assert ex.mask == _expected_mask(msgs, "llama2", botchan_tokenizer)[1]
        spans = botchan_tokenizer.decode([i for i, m in zip(ex.ids, ex.mask) if m])
        assert ANSWERS[k] in spans and all(a not in spans for a in ANSWERS[:k])


def test_weight_field_errors_and_all_zero_drop(tmp_path, botchan_tokenizer):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello", "weight": 0}]
    bad = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello", "weight": 0.5}]
    path = write_jsonl(tmp_path / "w.jsonl", [{"conversations": conv}, {"conversations": bad}])
    with pytest.raises(LlamalabError, match=r"w.jsonl:2: turn 1: 'weight' must be 0 or 1"):
        load_sft_data([path], "sharegpt", "llama2", botchan_tokenizer, max_len=512)
    exs, ledger = load_sft_data([path], "sharegpt", "llama2", botchan_tokenizer, max_len=512, on_error="skip")
    assert not exs and ledger.dropped == Counter({"no_loss_turn": 1, "malformed": 1})
    # split chunks holding only weight-0 turns are left out and counted; the trained turn survives
    long = [{"from": "human", "value": "tell me " * 5}, {"from": "gpt", "value": "word " * 30, "weight": 0},
            {"from": "human", "value": "and then?"}, {"from": "gpt", "value": "The end.", "weight": 1}]
    exs, ledger = load_sft_data([write_jsonl(tmp_path / "l.jsonl", [{"conversations": long}])], "sharegpt",
                                "llama2", botchan_tokenizer, max_len=40)
    assert len(exs) == 1 and ledger.fixes["chunk_dropped_no_loss"] == 1
    assert "The end." in botchan_tokenizer.decode([i for i, m in zip(exs[0].ids, exs[0].mask) if m])


def test_instruction_file_and_errors(tmp_path):
    good = tmp_path / "inst.jsonl"
    good.write_text('{"text": "Answer in German.", "short": "Language: German.", "kind": "language", '
                    '"rule": "language:de"}\n# a comment\n{"text": "Act as a cat."}\n', encoding="utf-8")
    cs = read_constraints(good)
    assert cs[0].rule == "language:de" and cs[1].rule == "" and cs[1].kind == "custom"
    txt = tmp_path / "inst.txt"
    txt.write_text("Speak like a sailor.\n\nRhyme every answer.\n", encoding="utf-8")
    assert [c.text for c in read_constraints(txt)] == ["Speak like a sailor.", "Rhyme every answer."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "x", "rule": "max_words:lots"}\n', encoding="utf-8")
    with pytest.raises(LlamalabError, match=r"bad.jsonl:2: field 'rule'.*positive integer"):
        read_constraints(bad)
    bad.write_text('{"txt": "x"}\n', encoding="utf-8")
    with pytest.raises(LlamalabError, match=r"bad.jsonl:1: unknown field"):
        read_constraints(bad)
    assert {c.kind for c in default_constraints()} >= {"figure", "language", "hobby", "emoji", "length"}
    assert all(c.rule for c in default_constraints(rule_checkable_only=True))


def test_read_dialogues_from_the_sharegpt_sample_counts_every_drop():
    path = shared_path("sft/sharegpt_sample.jsonl.gz")
    ledger = GattLedger()
    ds = read_dialogues([path], ledger, max_turns=3, min_turns=2, limit=200, on_error="skip")
    assert ledger.read == 200
    assert len(ds) + sum(ledger.dropped.values()) == 200
    assert ledger.dropped["too_few_turns"] > 0 and all(2 <= len(d.users) <= 3 for d in ds)
    assert ledger.fixes["turns_capped"] == sum(1 for x in ledger.drops if x.get("cut"))


def _dialogues_file(tmp_path, n: int = 3) -> str:
    recs = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"Question {i} one"}, {"from": "gpt", "value": "old answer 1"},
        {"from": "human", "value": f"Question {i} two"}, {"from": "gpt", "value": "old answer 2"},
        {"from": "human", "value": f"Question {i} three"}, {"from": "gpt", "value": "old answer 3"}]}
        for i in range(n)]
    recs.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    return str(write_jsonl(tmp_path / "dialogues.jsonl", recs))


def test_regeneration_is_turn_by_turn_on_the_new_history(fake_chat, tmp_path, botchan_tokenizer):
    f = fake_chat()  # replies with the last user message reversed
    data = _dialogues_file(tmp_path)
    consts = [FRENCH.parts[0]]
    out = tmp_path / "out"
    client = ChatClient(ClientConfig(base_url=f.url, model="m"), cache_dir=out / "cache")
    meta = run_gatt([data], out, client, consts, GattOptions(short_fraction=0.0, seed=3))
    assert f.count == 9  # 3 dialogues x 3 turns; the 1-turn dialogue was dropped
    for body in f.bodies:
        users = [m["content"] for m in body["messages"] if m["role"] == "user"]
        assert all(u.startswith("Always answer in French.\n\n") for u in users)  # instruction in every turn
        answers = [m["content"] for m in body["messages"] if m["role"] == "assistant"]
        assert answers == [u[::-1] for u in users[:-1]]  # conditioned on the regenerated answers, not the old
        assert body["temperature"] == 0.7 and "seed" in body
    recs = [json.loads(x) for x in (out / "gatt.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["c0", "c1", "c2"]
    conv = recs[0]["conversations"]
    assert conv[0]["value"] == "Always answer in French.\n\nQuestion 0 one"
    assert [m["value"] for m in conv if m["from"] == "human"][1:] == ["Question 0 two", "Question 0 three"]
    assert conv[-1]["value"] == "Always answer in French.\n\nQuestion 0 three"[::-1]
    assert meta["ledger"]["dropped"] == {"too_few_turns": 1}
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert dropped == [{"dialogue": "short", "where": f"{data}:4", "reason": "too_few_turns",
                        "detail": "1 user turns < --min-turns 2"}]
    assert len(meta["instructions"]["sha256"]) == 64 and meta["client"]["model"] == "m"
    assert "api_key" not in json.dumps(meta["config"])
    assert "Ghost Attention" in (out / "report.html").read_text()
    # `llamalab sft` reads the output: one example per dialogue, loss on the last answer only
    exs, ledger = load_sft_data([out / "gatt.jsonl"], "sharegpt", "llama2", botchan_tokenizer, max_len=4096)
    assert ledger.kept == 3 and all(botchan_tokenizer.decode([i for i, m in zip(e.ids, e.mask) if m]).strip()
                                    == recs[k]["conversations"][-1]["value"] for k, e in enumerate(exs))
    # a rerun is served from the cache: no request sent, the same output
    before = (out / "gatt.jsonl").read_text()
    client2 = ChatClient(ClientConfig(base_url=f.url, model="m"), cache_dir=out / "cache")
    meta2 = run_gatt([data], out, client2, consts, GattOptions(short_fraction=0.0, seed=3))
    assert f.count == 9 and meta2["requests"]["cache_hits"] == 9 and meta2["requests"]["sent"] == 0
    assert (out / "gatt.jsonl").read_text() == before


def test_failures_cut_or_drop_with_reasons(fake_chat, tmp_path):
    def script(body, k):
        u = body["messages"][-1]["content"]
        if "Question 1 two" in u:
            return 500, {}, {"error": {"message": "boom"}}, 0.0
        if "Question 2 one" in u:
            return 503, {}, "down", 0.0
        text = "Bonjour, je suis ravi de vous aider." if "0 three" not in u else "Hello, this is plain English."
        return 200, {}, {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]}, 0.0

    f = fake_chat(script)
    out = tmp_path / "out"
    client = ChatClient(ClientConfig(base_url=f.url, retries=0, cache="off"))
    meta = run_gatt([_dialogues_file(tmp_path)], out, client, [FRENCH.parts[0]],
                    GattOptions(short_fraction=0.0, check_rules=True))
    led = meta["ledger"]
    assert led["dropped"] == {"too_few_turns": 1, "model_error": 1}
    assert led["fixes"] == {"cut_at_model_error": 1, "cut_at_rule_failure": 1}
    recs = {r["id"]: r for r in map(json.loads, (out / "gatt.jsonl").read_text().splitlines())}
    assert sorted(recs) == ["c0", "c1"]
    assert recs["c0"]["gatt"]["turns"] == 2  # turn 3 answered in English: cut by the rule check
    assert recs["c1"]["gatt"]["turns"] == 1  # turn 2 failed with HTTP 500
    reasons = {d["dialogue"]: d for d in map(json.loads, (out / "dropped.jsonl").read_text().splitlines())}
    assert "HTTP 500" in reasons["c1"]["detail"] and "HTTP 503" in reasons["c2"]["detail"]
    assert "language:fr" in reasons["c0"]["detail"]


def test_cli_against_real_llamalab_serve(live, tmp_path, botchan_tokenizer):  # noqa: F811
    """`llamalab gatt` end to end against a live server around a tiny random model (greedy, short answers)."""
    from llamalab.cli import main

    recs = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "a"},
                                              {"from": "human", "value": "And?"}, {"from": "gpt", "value": "b"}]}
            for i in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    inst = tmp_path / "inst.jsonl"
    inst.write_text('{"text": "Be brief.", "short": "Brief."}\n', encoding="utf-8")
    out = tmp_path / "out"
    argv = ["gatt", "--data", str(data), "--out", str(out), "--base-url", live.url + "/v1", "--model", "tiny-chat",
            "--instructions", str(inst), "--temperature", "0", "--max-tokens", "6", "--every-turn"]
    assert main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    led = meta["ledger"]
    assert led["read"] == 3 and led["kept"] + sum(led["dropped"].values()) == 3
    rolls = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    n_answers = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rolls]
    assert meta["requests"]["sent"] == sum(min(2, a + 1) for a in n_answers)  # a failed turn ends its dialogue
    for r in rolls:
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert all(u.startswith("Be brief.\n\n") for u in users)
    recs_out = [json.loads(x) for x in (out / "gatt.jsonl").read_text().splitlines()]
    assert len(recs_out) == sum(n_answers) > 0
    by_id = {r["id"]: r for r in rolls}
    for rec in recs_out:
        src = by_id[rec["gatt"]["source_id"]]
        answers = [m["content"] for m in src["messages"] if m["role"] == "assistant"]
        assert [m["value"] for m in rec["conversations"] if m["from"] == "gpt"] == answers[:rec["gatt"]["turns"]]
    assert main(argv) == 0  # resumed: everything from the cache
    assert json.loads((out / "meta.json").read_text())["requests"]["sent"] == 0


def test_placement_keeps_a_source_system_message_and_short_forms_are_seeded():
    d = Dialogue("d9", "src:9", USERS[:2], system="You are Botchan.")
    rec = training_records(d, FRENCH, ANSWERS[:2], GattOptions(placement="system", short_fraction=0.0))[0]
    assert rec["conversations"][0] == {"from": "system", "value": "You are Botchan.\n\nAlways answer in French."}
    assert rec["conversations"][1]["value"] == USERS[0]
    rec = training_records(d, FRENCH, ANSWERS[:2], GattOptions(placement="user", short_fraction=1.0))[0]
    assert rec["conversations"][0] == {"from": "system", "value": "You are Botchan."}
    assert rec["conversations"][1]["value"] == "Language: French.\n\n" + USERS[0]
    shorts = [training_records(Dialogue(f"x{i}", "s", USERS[:1]), FRENCH, ANSWERS[:1], GattOptions())[0]
              ["gatt"]["instruction"] for i in range(200)]
    assert 60 < shorts.count("Language: French.") < 140  # about half, as in Llama 2
    assert shorts == [training_records(Dialogue(f"x{i}", "s", USERS[:1]), FRENCH, ANSWERS[:1], GattOptions())[0]
                      ["gatt"]["instruction"] for i in range(200)]  # the same on a rerun


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_the_two_ways_of_finding_assistant_turns_agree(botchan_tokenizer, template):
    """The fast path (one run of loss tokens per answer) and the fallback (render prefixes) find the same turns."""
    from llamalab.finetune.data import _mask_runs, _turn_spans

    msgs = [{"role": "system", "content": "Be kind."}]
    for u, a in zip(USERS, ANSWERS):
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    ids, mask = render(msgs, template, botchan_tokenizer, add_generation_prompt=False)
    runs, spans = _mask_runs(mask), _turn_spans(msgs, template, botchan_tokenizer, len(ids))
    assert len(runs) == len(spans) == 3
    assert all(a <= r0 and r1 <= b for (r0, r1), (a, b) in zip(runs, spans))
