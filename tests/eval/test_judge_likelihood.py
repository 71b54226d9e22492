"""Likelihood verdicts (``llamalab judge --verdict likelihood``): the judge model's probabilities of the verdict
continuations instead of a parsed reply. Checked against a full forward pass by hand and against
``eval.loglik.score_token_pairs`` on a tiny random model; the both-orders rule with a scripted position-biased
scorer; the G-Eval weighted grade; resume, keys, errors and the whole command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamalab.common import LlamalabError
from llamalab.eval import judge as J
from llamalab.eval import judge_prompts as P
from tests.conftest import shared_path
from tests.inference.conftest import llama_tok_path  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def judge_folders(tmp_path_factory, llama_tok_path):  # noqa: F811
    from llamalab.model.folder import save_model
    from tests.inference.conftest import small_model

    root = tmp_path_factory.mktemp("lik_judge")
    for name, ctx in (("judge", 1024), ("short", 64)):
        save_model(root / name, small_model(seed=7, max_seq_len=ctx), tokenizer_path=llama_tok_path,
                   extra={"chat_template": "llama2"})
    return root


@pytest.fixture(scope="module")
def tiny_judge(judge_folders):
    return J.LikelihoodJudge.load(judge_folders / "judge")


# ----------------------------------------------------------------------------- the scores


@pytest.mark.parametrize("kind", ["pair", "single"])
def test_choice_logliks_equal_a_full_forward_by_hand_and_loglik_scoring(tiny_judge, kind):
    from llamalab.eval.loglik import model_logits_fn, score_token_pairs
    from llamalab.tokenizer.templates import render

    jd = tiny_judge
    msgs = (P.pair_messages(["What is 2+2?"], ["It is 4."], ["Bananas."]) if kind == "pair"
            else P.single_messages(["What is 2+2?"], ["It is 4."]))
    prefix, choices = P.likelihood_choices(kind)
    got = jd.score(msgs, prefix, choices)
    assert got.why is None and len(got.logliks) == len(choices)

    # by hand: the prompt as the llama2 template renders it, the prefix tokens, then each choice's tokens after
    # them (the way lm-eval splits a pair), one full forward without a KV cache, log_softmax summed
    tok, model = jd.tokenizer, jd.model
    prompt = render(msgs, "llama2", tok, add_generation_prompt=True)[0]
    pre = tok.encode(prefix, bos=False)
    pairs = []
    for c, ll in zip(choices, got.logliks):
        full = tok.encode(prefix + c, bos=False)
        assert full[:len(pre)] == pre  # this tokenizer does not merge the prefix into the choice
        ctx, cont = prompt + pre, full[len(pre):]
        pairs.append((ctx, cont))
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([ctx + cont])).float()[0], dim=-1)
        hand = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert ll == pytest.approx(hand, abs=1e-4)
    assert got.context_tokens == len(prompt) + len(pre)
    # the same numbers as the library's (context, continuation) scoring, one pair at a time
    ref = score_token_pairs(model_logits_fn(model), pairs, max_len=model.cfg.max_seq_len, batch_size=4)
    assert got.logliks == pytest.approx([s.loglik for s in ref], abs=1e-4)
    assert len(set(round(x, 3) for x in got.logliks)) > 1  # the choices really differ
    v = J.likelihood_verdict(kind, got.logliks)
    assert v["verdict_mass"] == pytest.approx(sum(math.exp(x) for x in got.logliks), rel=1e-6)


def test_split_handles_a_prefix_token_that_merges_with_the_choice():
    class Tok:  # "[[A" is one token here, so the prefix's last token is not shared by every choice
        table = {"V: [[A]]": [1, 2, 9, 5], "V: [[B]]": [1, 2, 3, 6, 5], "V: [[C]]": [1, 2, 3, 7, 5]}

        def encode(self, text, bos=False):
            return list(self.table[text])

    jd = J.LikelihoodJudge.__new__(J.LikelihoodJudge)
    jd.tokenizer = Tok()
    shared, tails = jd.split("V: [[", ["A]]", "B]]", "C]]"])
    assert shared == [1, 2] and tails == [[9, 5], [3, 6, 5], [3, 7, 5]]


def test_likelihood_verdict_pairwise_and_g_eval_grade():
    v = J.likelihood_verdict("pair", [math.log(0.2), math.log(0.1), math.log(0.1)])
    assert v["verdict"] == "A" and v["probs"] == {"A": 0.5, "B": 0.25, "tie": 0.25}
    assert v["verdict_mass"] == pytest.approx(0.4)
    assert J.likelihood_verdict("pair", [-5.0, -1.0, -3.0])["verdict"] == "B"
    assert J.likelihood_verdict("pair", [-5.0, -4.0, -1.0])["verdict"] == "tie"

    rng = np.random.default_rng(3)
    for _ in range(5):
        lls = list(rng.normal(-4.0, 2.0, 10))
        v = J.likelihood_verdict("single", lls)
        z = sum(math.exp(x) for x in lls)
        hand = sum(k * math.exp(x) / z for k, x in zip(range(1, 11), lls))  # G-Eval: sum_k k * p(k)
        assert v["rating"] == pytest.approx(hand, abs=1e-4) and 1.0 <= v["rating"] <= 10.0
        assert v["rating_argmax"] == 1 + int(np.argmax(lls))
        assert sum(v["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    # all the mass on one grade: the weighted mean is that grade
    assert J.likelihood_verdict("single", [-50.0] * 6 + [0.0] + [-50.0] * 3)["rating"] == pytest.approx(7.0)


def test_tiny_judge_single_grade_is_the_weighted_mean_of_its_probabilities(tiny_judge):
    sc = tiny_judge.score(P.single_messages(["Name a colour."], ["Blue."]), *P.likelihood_choices("single"))
    v = J.likelihood_verdict("single", sc.logliks)
    assert 1.0 <= v["rating"] <= 10.0
    assert v["rating"] == pytest.approx(sum(int(k) * p for k, p in v["probs"].items()), abs=1e-3)
    assert sc.n_tokens[-1] >= sc.n_tokens[0]  # "10]]" is scored whole, not just its first digit


def test_prefixes_are_in_the_prompts_hash():
    assert P.ALL["PAIR_VERDICT_PREFIX"] == "My verdict: [[" and P.ALL["SINGLE_CHOICES"][-1] == "10"
    assert P.likelihood_choices("pair") == ("My verdict: [[", ["A]]", "B]]", "C]]"])


# ----------------------------------------------------------------------------- verdicts across both orders


class ScriptedScorer:
    """A fake likelihood judge: log-likelihoods from a rule over the prompt text, calls counted."""

    endpoint, name, max_seq_len = "local:/fake", "fake", 4096

    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def score(self, messages, prefix, choices):
        self.calls += 1
        return J.ChoiceScores(self.rule(messages[-1]["content"], len(choices)), [2] * len(choices), 100)


def _position_biased(text, n):
    return [math.log(0.6), math.log(0.3), math.log(0.1)] if n == 3 else [-2.0] * n  # A always, whatever is shown


def _content_aware(text, n):
    a = text.split("[Answer of assistant A]")[1].split("[End of answer")[0]
    return [math.log(0.7), math.log(0.2), math.log(0.1)] if "GOOD" in a else [math.log(0.2), math.log(0.7),
                                                                                math.log(0.1)]


def _answers(good_first: bool):
    good = {i: {"turns": [f"GOOD answer {i}"]} for i in (1, 2, 3)}
    bad = {i: {"turns": [f"meh answer {i}"]} for i in (1, 2, 3)}
    return {"x": good, "y": bad} if good_first else {"x": bad, "y": good}


def _run(tmp_path, scorer, answers, name="o"):
    qs = [J.Question(i, "generic", [f"Question {i}?"]) for i in (1, 2, 3)]
    jobs, _ = J.build_jobs(qs, answers, J.JudgeSettings(mode="pairwise"), J.likelihood_judge_id(scorer))
    recs, counts = J.run_likelihood_judgments(jobs, scorer, tmp_path / name)
    return J.summarize(recs, jobs, ["x", "y"], [("x", "y")], bootstrap=20), counts, jobs


def test_position_biased_scorer_gives_only_ties_and_a_balanced_soft_score(tmp_path):
    scorer = ScriptedScorer(_position_biased)
    res, counts, _ = _run(tmp_path, scorer, _answers(True))
    row = res["pairwise"]["x vs y"]
    assert (row["win"], row["tie"], row["loss"], row["disagree"]) == (0, 3, 0, 3)  # both orders say "A"
    assert res["position"]["first_win_rate"] == 1.0
    assert res["position"]["mean_prob"] == {"first": 0.6, "second": 0.3, "tie": 0.1}
    assert row["soft_win_rate"] == pytest.approx(0.5)  # averaged over both orders, the position cancels
    assert scorer.calls == 6 and counts["sent"] == 6


def test_content_aware_scorer_wins_both_orders_and_flips_when_answers_swap(tmp_path):
    r1, _, _ = _run(tmp_path, ScriptedScorer(_content_aware), _answers(True), "o1")
    r2, _, _ = _run(tmp_path, ScriptedScorer(_content_aware), _answers(False), "o2")
    a, b = r1["pairwise"]["x vs y"], r2["pairwise"]["x vs y"]
    assert (a["win"], a["tie"], a["loss"], a["agreement"]) == (3, 0, 0, 1.0)
    assert (b["win"], b["tie"], b["loss"]) == (0, 0, 3)
    assert a["mean_prob"] == {"model_a": 0.7, "model_b": 0.2, "tie": 0.1}
    assert a["soft_win_rate"] == pytest.approx(0.75) and b["soft_win_rate"] == pytest.approx(0.25)
    assert r1["ratings"]["models"]["x"]["rating"] > r1["ratings"]["models"]["y"]["rating"]


def test_resume_scores_nothing_twice_and_keys_depend_on_the_mode(tmp_path):
    scorer = ScriptedScorer(_content_aware)
    _, c1, jobs = _run(tmp_path, scorer, _answers(True))
    again = ScriptedScorer(_content_aware)
    _, c2, _ = _run(tmp_path, again, _answers(True))
    assert c1["sent"] == 6 and c2 == {**c2, "already": 6, "sent": 0} and again.calls == 0
    recs = [json.loads(x) for x in (tmp_path / "o" / J.JUDGMENTS).read_text().splitlines()]
    assert len(recs) == 6 and all(r["verdict_mode"] == "likelihood" and r["reply"] is None for r in recs)
    assert all(set(r["probs"]) == {"A", "B", "tie"} and r["prefix"] == "My verdict: [[" for r in recs)
    # the same prompts judged by text are other judgments (other keys): a text run never reuses these
    qs = [J.Question(i, "generic", [f"Question {i}?"]) for i in (1, 2, 3)]
    text_jobs, _ = J.build_jobs(qs, _answers(True), J.JudgeSettings(mode="pairwise"),
                                {"endpoint": "local:/fake", "model": "fake", "max_tokens": 512, "temperature": 0.0})
    assert not {j.key for j in jobs} & {j.key for j in text_jobs}
    assert [j.messages for j in jobs] == [j.messages for j in text_jobs]  # the same prompts


def test_prompt_longer_than_the_judge_context_is_counted_not_guessed(judge_folders, tmp_path):
    short = J.LikelihoodJudge.load(judge_folders / "short")
    sc = short.score(P.pair_messages(["Q?"], ["a"], ["b"]), *P.likelihood_choices("pair"))
    assert sc.logliks is None and sc.why == "prompt_too_long"
    res, counts, _ = _run(tmp_path, short, _answers(True))
    assert counts["prompt_too_long"] == 6 and res["pairwise"]["x vs y"]["unparsable"] == 3


# ----------------------------------------------------------------------------- the command


def test_judge_command_likelihood_end_to_end_and_resume(tmp_path, judge_folders):
    from llamalab.commands.judge import Config, main

    for m, good in (("x", True), ("y", False)):
        with open(tmp_path / f"{m}.jsonl", "w") as f:
            for i in (1, 2):
                f.write(json.dumps({"question_id": i, "model": m, "turns": ["Sure: " + ("ok" if good else "no")]})
                        + "\n")

    def cfg():
        c = Config(base_url=f"local:{judge_folders / 'judge'}", verdict="likelihood", mode="both", limit=2,
                   questions=str(shared_path("judge/vicuna80_question.jsonl")), bootstrap=20, out=str(tmp_path / "o"),
                   answers=[str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")])
        c.validate()
        return c

    r = main(cfg())
    res, meta = r["results"], r["meta"]
    assert res["verdict"] == "likelihood" and meta["verdict"] == "likelihood"
    assert res["counts"]["jobs"] == 2 * (2 + 2) and res["counts"]["unparsable"] == 0
    assert meta["judge"]["kind"] == "local-likelihood" and meta["judge"]["forwards"] == 8  # one per judgment
    row = res["pairwise"]["x vs y"]
    assert row["win"] + row["tie"] + row["loss"] == 2 and 0.0 <= row["soft_win_rate"] <= 1.0
    for m in ("x", "y"):
        assert 1.0 <= res["single"][m]["score"] <= 10.0 and res["single"][m]["unparsable"] == 0
    recs = [json.loads(x) for x in (tmp_path / "o" / J.JUDGMENTS).read_text().splitlines()]
    single = [x for x in recs if x["kind"] == "single"]
    assert all(x["rating"] == pytest.approx(sum(int(k) * p for k, p in x["probs"].items()), abs=1e-3)
               for x in single)
    assert "Likelihood verdicts" in (tmp_path / "o" / "report.html").read_text()

    r2 = main(cfg())
    assert r2["results"]["counts"]["sent"] == 0 and r2["meta"]["judge"]["forwards"] == 0
    assert r2["meta"]["judge"]["max_seq_len"] is None  # nothing left to judge: the weights were never read
    assert r2["results"]["pairwise"] == res["pairwise"]


def test_likelihood_needs_a_local_judge(tmp_path, monkeypatch):
    from llamalab.commands.judge import Config

    monkeypatch.delenv("LLAMALAB_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LlamalabError, match=r"--base-url local:PATH.*got 'http://127.0.0.1:9/v1'"):
        Config(base_url="http://user:pw@127.0.0.1:9/v1", verdict="likelihood", questions="q", out="o",
               models=["a"]).validate()
    with pytest.raises(LlamalabError, match=r"judge model not found"):
        J.LikelihoodJudge.load(tmp_path / "nothing")
    Config(verdict="likelihood", questions="q", out="o", models=["a"], answer_only=True).validate()  # no judge


def test_verdict_flag_parses():
    from llamalab.commands.judge import Config
    from llamalab.config import parse_config

    cfg, _ = parse_config(Config, ["--questions", "q.jsonl", "--answers", "x.jsonl", "y.jsonl", "--out", "o",
                                   "--base-url", "local:m.gguf", "--verdict", "likelihood"])
    assert cfg.verdict == "likelihood" and cfg.answers == ["x.jsonl", "y.jsonl"]
    assert parse_config(Config, ["--questions", "q", "--answers", "x", "--out", "o"])[0].verdict == "text"
    with pytest.raises((LlamalabError, SystemExit)):
        parse_config(Config, ["--questions", "q", "--answers", "x", "--out", "o", "--verdict", "logprobs"])
