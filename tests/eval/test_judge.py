"""The judge: verdict and rating parsing, both-order pairwise logic against a scripted endpoint, the
Bradley-Terry fit and its bootstrap, question/answer files and prompts."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from llamalab.common import LlamalabError
from llamalab.eval import judge as J
from llamalab.eval import judge_prompts as P
from tests.conftest import shared_path
from tests.synth.conftest import FakeChat

# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,want", [
    ("The answer is fine.\nRating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("[[ 9 ]]", 9.0),
    ("I give it [[6/10]].", 6.0),
    ("Rating: 4", 4.0),
    ("rating = 3/10", 3.0),
    ("The example says Rating: [[5]], but mine is Rating: [[2]]", 2.0),  # the last one counts
    ("Rating: [[10]]", 10.0),
    ("Rating: [[1]]", 1.0),
])
def test_parse_rating_good(text, want):
    assert J.parse_rating(text) == want


@pytest.mark.parametrize("text", [None, "", "no grade here", "Rating: [[eleven]]", "[[0]]", "[[11]]", "[[A]]",
                                  "Rating: [[-3]]", "Rating: [[]]", "score 7"])
def test_parse_rating_malformed_is_none(text):
    assert J.parse_rating(text) is None


@pytest.mark.parametrize("text,want", [
    ("A is more accurate. [[A]]", "A"), ("[[ B ]]", "B"), ("Equally good: [[C]]", "tie"),
    ("Output [[A]] if A is better, [[B]] if B... My verdict: [[B]]", "B"),  # the last verdict counts
    ("no verdict", None), ("[A]", None), ("[[D]]", None), ("", None), (None, None),
])
def test_parse_verdict(text, want):
    assert J.parse_verdict(text) == want


@pytest.mark.parametrize("first,second,want", [
    ("A", "B", "m1"),  # m1 shown first wins, and m1 shown second wins: m1
    ("B", "A", "m2"),
    ("tie", "tie", "tie"),
    ("A", "A", "tie"),  # the first position always wins: the orders disagree -> tie
    ("B", "B", "tie"),
    ("A", "tie", "tie"),
    ("A", None, None), (None, "B", None),
])
def test_combine_orders(first, second, want):
    assert J.combine_orders(first, second) == want


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_two_models_matches_closed_form():
    # two models: the MLE of the strength difference is log((wins + ties/2) / (losses + ties/2))
    games = [(0, 1, 1.0)] * 30 + [(0, 1, 0.0)] * 10 + [(1, 0, 0.5)] * 20
    theta = J.bradley_terry(2, games, l2=1e-9)
    assert theta[0] - theta[1] == pytest.approx(math.log(40 / 20), abs=1e-6)
    elo = J.elo_scale(theta)
    assert elo[0] - elo[1] == pytest.approx(400 * math.log10(2), abs=1e-3)


def test_bradley_terry_recovers_order_from_synthetic_games():
    rng = np.random.default_rng(0)
    true = np.array([1.2, 0.4, -0.3, -1.3])
    games = []
    for _ in range(4000):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + math.exp(-(true[i] - true[j])))
        u = rng.random()
        games.append((i, j, 1.0 if u < p * 0.9 else 0.5 if u < p * 0.9 + 0.1 else 0.0))  # 10% ties
    theta = J.bradley_terry(4, games)
    assert list(np.argsort(-theta)) == [0, 1, 2, 3]
    assert np.allclose(theta, true - true.mean(), atol=0.2)


def test_bradley_terry_never_winning_model_stays_finite():
    theta = J.bradley_terry(3, [(0, 1, 1.0)] * 10 + [(1, 2, 1.0)] * 10 + [(0, 2, 1.0)] * 10)
    assert np.all(np.isfinite(theta)) and theta[0] > theta[1] > theta[2]


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    games = [(int(i), int(j), float(rng.random() < 0.7)) for i, j in rng.integers(0, 3, (300, 2)) if i != j]
    a = J.bootstrap_ratings(3, games, rounds=200, seed=5)
    b = J.bootstrap_ratings(3, games, rounds=200, seed=5)
    c = J.bootstrap_ratings(3, games, rounds=200, seed=6)
    assert np.all(a["low"] <= a["rating"]) and np.all(a["rating"] <= a["high"])
    assert np.all(a["high"] - a["low"] > 1.0)  # real uncertainty, not a point
    assert np.array_equal(a["low"], b["low"]) and not np.array_equal(a["low"], c["low"])
    assert a["rating"].mean() == pytest.approx(J.ELO_BASE)


# ----------------------------------------------------------------------------- files, specs, prompts


def test_questions_vicuna_and_mt_bench_with_references():
    v = J.load_questions(shared_path("judge/vicuna80_question.jsonl"))
    assert len(v) == 80 and all(len(q.turns) == 1 for q in v)
    mt = J.load_questions(shared_path("judge/mt_bench_question.jsonl"))
    assert len(mt) == 80 and all(len(q.turns) == 2 for q in mt)
    refs = J.load_references(shared_path("judge/mt_bench_reference_answer_gpt-4.jsonl"))
    counts = J.attach_references(mt, refs)
    assert counts == {"with_reference": 30, "needs_reference_but_none": 0}
    by_id = {q.question_id: q for q in mt}
    assert by_id[101].reference == refs[101] and by_id[81].reference is None  # writing: no reference
    assert J.load_questions(shared_path("judge/vicuna80_question.jsonl"), limit=5)[-1].question_id == 5


def test_bad_question_file_names_line(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 2}\n')
    with pytest.raises(LlamalabError, match=r"q.jsonl:2: needs 'turns'"):
        J.load_questions(p)
    p.write_text('{"question_id": 1, "text": "hi"}\n{"question_id": 1, "text": "again"}\n')
    with pytest.raises(LlamalabError, match=r"q.jsonl:2: question_id 1 appears twice"):
        J.load_questions(p)
    p.write_text('{"question_id": 1, "text": "hi"}\nnot json\n{"question_id": 3, "text": "x"}\n')
    with pytest.raises(LlamalabError, match=r"q.jsonl:2: not valid JSON"):
        J.load_questions(p)


def test_model_spec():
    s = J.parse_model_spec("hot=/m/smol.gguf@temperature=1.0@quantize=int8")
    assert (s.name, s.source, s.options) == ("hot", "/m/smol.gguf", {"temperature": 1.0, "quantize": "int8"})
    assert J.parse_model_spec("/m/SmolLM2-135M.Q4_1.gguf").name == "SmolLM2-135M.Q4_1"
    assert J.parse_model_spec("runs/tiny/").name == "tiny"
    assert J.parse_model_spec("local:runs/tiny").source == "runs/tiny"
    e = J.parse_model_spec("http://host:8000/v1@model=gpt-x")
    assert e.is_endpoint and e.name == "gpt-x" and e.source == "http://host:8000/v1"
    with pytest.raises(LlamalabError, match="unknown option 'temp'"):
        J.parse_model_spec("a=/x@temp=1")
    with pytest.raises(LlamalabError, match="not a float"):
        J.parse_model_spec("a=/x@temperature=hot")
    with pytest.raises(LlamalabError, match="model name 'my model'"):
        J.parse_model_spec("/m/my model.gguf")
    assert J.parse_model_spec("/data/x=1/m.gguf").source == "/data/x=1/m.gguf"  # not NAME=: a path with '='
    assert J.parse_model_spec("m=/data/x=1/m.gguf").name == "m"


def test_fastchat_answer_file_is_read(tmp_path):
    p = tmp_path / "gpt.jsonl"
    p.write_text(json.dumps({"question_id": 7, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["x", "y"]}]})
                 + "\n")
    name, rows = J.read_answers(p)
    assert name == "gpt-4" and rows[7]["turns"] == ["x", "y"]


def test_prompts_reference_and_second_turn():
    one = P.single_messages(["What is 2+2?"], ["5"], ["4"])[1]["content"]
    assert "[Reference answer]\n4\n" in one and "What is 2+2?" in one and "Rating: [[5]]" in one
    assert "[Reference answer]" not in P.single_messages(["q"], ["a"])[1]["content"]
    two = P.pair_messages(["Q1", "Q2"], ["a1", "a2"], ["b1", "b2"], ["r1", "r2"])[1]["content"]
    for s in ("Q1", "Q2", "a1", "a2", "b1", "b2", "Turn 1: r1", "Turn 2: r2", "SECOND question"):
        assert s in two
    assert two.index("a2") < two.index("b1")  # conversation A, then conversation B
    assert re.fullmatch(r"[0-9a-f]{64}", P.prompts_sha256())


# ----------------------------------------------------------------------------- both orders, scripted judge


def _answer_block(text: str, name: str) -> str:
    """The text the judge prompt shows for assistant ``name`` (single- or multi-turn layout)."""
    m = re.search(rf"\[Answer of assistant {name}\]\n(.*?)\n\[End of answer of assistant {name}\]", text, re.S)
    if m is None:
        m = re.search(rf"\[Conversation with assistant {name}\]\n(.*?)\n\[End of conversation", text, re.S)
    return m.group(1)


def scripted_judge(body: dict, k: int):
    """A deterministic judge: prefers the answer that says GOOD; when both or neither do it always says [[A]]
    (pure position bias); grades 9 for GOOD and 3 otherwise; 'MUMBLE' gets a reply with no verdict or grade."""
    text = body["messages"][-1]["content"]
    if "[Answer of assistant A]" in text or "[Conversation with assistant A]" in text:
        a, b = _answer_block(text, "A"), _answer_block(text, "B")
        if "MUMBLE" in a + b:
            out = "I cannot decide."
        elif ("GOOD" in a) != ("GOOD" in b):
            out = "A is better. [[A]]" if "GOOD" in a else "B is better. [[B]]"
        else:
            out = "The first one. [[A]]"
    elif "MUMBLE" in text:
        out = "Hmm, hard to say."
    else:
        out = "Fine.\nRating: [[9]]" if "GOOD" in text else "Poor.\nRating: [[3]]"
    return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                  "finish_reason": "stop"}], "usage": {}}, 0.0


def _write_answers(path, model, texts):
    with open(path, "w") as f:
        for qid, t in texts.items():
            f.write(json.dumps({"question_id": qid, "model": model, "turns": t}) + "\n")


def _questions(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"Q{i} first", f"Q{i} second"]})
                         + "\n" for i, c in [(1, "writing"), (2, "math"), (3, "writing")]))
    return q


def _config(tmp_path, fake, out, answers, **kw):
    from llamalab.commands.judge import Config

    cfg = Config(base_url=fake.url, model="judge", retries=0, questions=str(_questions(tmp_path)), answers=answers,
                 out=str(out), bootstrap=50, **kw)
    cfg.validate()
    return cfg


def test_pairwise_flips_when_answers_swap_and_disagreement_is_a_tie(tmp_path):
    from llamalab.commands.judge import main

    fake = FakeChat(scripted_judge)
    try:
        good = {i: [f"GOOD {i}a", f"GOOD {i}b"] for i in (1, 2, 3)}
        bad = {i: [f"meh {i}a", f"meh {i}b"] for i in (1, 2, 3)}
        _write_answers(tmp_path / "x.jsonl", "x", good)
        _write_answers(tmp_path / "y.jsonl", "y", bad)
        r1 = main(_config(tmp_path, fake, tmp_path / "o1", [str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")]))
        row = r1["results"]["pairwise"]["x vs y"]
        assert (row["win"], row["tie"], row["loss"], row["unparsable"]) == (6, 0, 0, 0)  # 3 questions x 2 turns
        assert row["agreement"] == 1.0
        assert fake.count == 12  # both orders of every game were asked

        # swap the answers: the result flips
        _write_answers(tmp_path / "x.jsonl", "x", bad)
        _write_answers(tmp_path / "y.jsonl", "y", good)
        r2 = main(_config(tmp_path, fake, tmp_path / "o2", [str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")]))
        row = r2["results"]["pairwise"]["x vs y"]
        assert (row["win"], row["tie"], row["loss"]) == (0, 0, 6)
        rat = r2["results"]["ratings"]["models"]
        assert rat["y"]["rating"] > rat["x"]["rating"]

        # equally good answers: the judge always picks the first position -> the orders disagree -> tie
        _write_answers(tmp_path / "x.jsonl", "x", good)
        r3 = main(_config(tmp_path, fake, tmp_path / "o3", [str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")]))
        row = r3["results"]["pairwise"]["x vs y"]
        assert (row["win"], row["tie"], row["loss"], row["disagree"]) == (0, 6, 0, 6)
        assert r3["results"]["position"]["first_win_rate"] == 1.0
        assert row["by_category"]["math"] == {"win": 0, "tie": 2, "loss": 0, "unparsable": 0}
    finally:
        fake.close()


def test_unparsable_counted_single_grades_and_resume_sends_nothing(tmp_path):
    from llamalab.commands.judge import main

    fake = FakeChat(scripted_judge)
    try:
        _write_answers(tmp_path / "x.jsonl", "x", {1: ["GOOD", "GOOD"], 2: ["MUMBLE", "GOOD"], 3: ["GOOD", "x"]})
        _write_answers(tmp_path / "y.jsonl", "y", {1: ["no", "no"], 2: ["no", "no"]})  # question 3 missing
        ans = [str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")]
        out = tmp_path / "o"
        r = main(_config(tmp_path, fake, out, ans, mode="both"))["results"]
        row = r["pairwise"]["x vs y"]
        # q2 turn 1 and turn 2 (turn 2 shows the whole conversation, MUMBLE included) have no verdict
        assert (row["win"], row["tie"], row["loss"], row["unparsable"]) == (2, 0, 0, 2)
        assert r["counts"]["not_judged"] == {"no answer: y": 2}  # q3, 2 turns
        assert r["single"]["x"]["by_turn"] == {"1": 9.0, "2": 9.0}  # q2's MUMBLE: no grade, not a low grade
        assert (r["single"]["x"]["judged"], r["single"]["x"]["unparsable"]) == (6, 2)
        assert r["counts"]["unparsable"] == 2 * 2 + 2  # two pair games in both orders, two grades
        assert r["single"]["y"]["score"] == 3.0 and r["single"]["y"]["judged"] == 4
        sent = fake.count
        recs = [json.loads(x) for x in (out / J.JUDGMENTS).read_text().splitlines()]
        assert len(recs) == sent and all(x["reply"] and x["messages"] for x in recs)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["prompts_sha256"] == P.prompts_sha256() and meta["judge"]["model"] == "judge"
        assert "api_key" not in json.dumps(meta).replace("api_key_set", "")
        assert (out / "report.html").read_text().count("<table>") >= 4

        r2 = main(_config(tmp_path, fake, out, ans, mode="both"))["results"]
        assert fake.count == sent  # nothing asked again
        assert r2["counts"]["already"] == r2["counts"]["jobs"] and r2["pairwise"] == r["pairwise"]
    finally:
        fake.close()


def test_failed_judge_requests_are_reported_then_retried(tmp_path):
    from llamalab.commands.judge import main

    state = {"down": True}

    def flaky(body, k):
        if state["down"] and "Q2" in body["messages"][-1]["content"]:
            return 503, {}, {"error": {"message": "overloaded"}}, 0.0
        return scripted_judge(body, k)

    fake = FakeChat(flaky)
    try:
        _write_answers(tmp_path / "x.jsonl", "x", {i: ["GOOD", "GOOD"] for i in (1, 2, 3)})
        _write_answers(tmp_path / "y.jsonl", "y", {i: ["no", "no"] for i in (1, 2, 3)})
        ans = [str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")]
        r = main(_config(tmp_path, fake, tmp_path / "o", ans))["results"]
        assert r["counts"]["errors"] == 4  # q2: 2 turns x 2 orders, never crashed
        assert r["pairwise"]["x vs y"]["win"] == 4
        state["down"] = False
        r = main(_config(tmp_path, fake, tmp_path / "o", ans))["results"]
        assert r["counts"]["sent"] == 4 and r["counts"]["errors"] == 0
        assert r["pairwise"]["x vs y"]["win"] == 6
    finally:
        fake.close()


def test_config_errors(tmp_path):
    from llamalab.commands.judge import Config, main

    with pytest.raises(LlamalabError, match="--questions"):
        Config(out="o", models=["a"]).validate()
    with pytest.raises(LlamalabError, match="--models"):
        Config(questions="q", out="o").validate()
    (tmp_path / "x.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n")
    cfg = Config(base_url="http://127.0.0.1:9/v1", questions=str(_questions(tmp_path)), out=str(tmp_path / "o"),
                 answers=[str(tmp_path / "x.jsonl")])
    with pytest.raises(LlamalabError, match="at least two"):
        main(cfg)


def test_endpoint_models_answer_both_turns_and_failed_answers_are_asked_again(tmp_path):
    """Two models behind an OpenAI-compatible endpoint answer (turn 2 sees their own turn-1 answer); a
    question whose answer request fails is not written, and the next run asks for it again."""
    from llamalab.commands.judge import Config, main

    state = {"down": True}

    def script(body, k):
        last = body["messages"][-1]["content"]
        if "[User question]" in last or "[Conversation" in last:
            return scripted_judge(body, k)
        if state["down"] and body["model"] == "bad" and last == "Q3 first":
            return 503, {}, {"error": {"message": "busy"}}, 0.0
        text = ("GOOD " if body["model"] == "good" else "so-so ") + f"reply to {last}"
        return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}]}, 0.0

    fake = FakeChat(script)
    try:
        def cfg():
            c = Config(base_url=fake.url, model="judge", retries=0, questions=str(_questions(tmp_path)),
                       models=[f"g={fake.url}@model=good", f"b={fake.url}@model=bad@temperature=0"],
                       out=str(tmp_path / "o"), bootstrap=10)
            c.validate()
            return c

        r = main(cfg())
        stats = {a["model"]: a for a in r["meta"]["answers"]}
        assert (stats["g"]["answered"], stats["b"]["answered"], stats["b"]["failed"]) == (3, 2, 1)
        turn2 = [b for b in fake.bodies if b.get("model") == "good" and b["messages"][-1]["content"] == "Q1 second"]
        assert [m["role"] for m in turn2[0]["messages"]] == ["user", "assistant", "user"]
        assert turn2[0]["messages"][1]["content"] == "GOOD reply to Q1 first"
        assert r["results"]["counts"]["not_judged"] == {"no answer: b": 2}
        assert r["results"]["pairwise"]["g vs b"]["win"] == 4
        assert all(b.get("temperature") == 0 for b in fake.bodies if b.get("model") == "bad")

        state["down"] = False
        r = main(cfg())
        assert {a["model"]: a["answered"] for a in r["meta"]["answers"]} == {"g": 0, "b": 1}
        assert r["results"]["pairwise"]["g vs b"]["win"] == 6 and r["results"]["counts"]["sent"] == 4
    finally:
        fake.close()


def test_cli_flags_parse():
    from llamalab.commands.judge import Config
    from llamalab.config import parse_config

    cfg, _ = parse_config(Config, ["--questions", "q.jsonl", "--models", "a=m.gguf", "b=m.gguf@temperature=0",
                                   "--answers", "gpt4=x.jsonl", "--mode", "both", "--base-url", "http://h:1/v1",
                                   "--model", "j", "--out", "o", "--reference-categories", "math,coding"])
    assert cfg.models == ["a=m.gguf", "b=m.gguf@temperature=0"] and cfg.answers == ["gpt4=x.jsonl"]
    assert (cfg.mode, cfg.model, cfg.reference_categories) == ("both", "j", ["math", "coding"])
