"""Generation metrics (pass@k, GSM8K extraction, QA normalisation) and the batched generator."""

from __future__ import annotations

import gzip
import json
import random
from math import comb

import pytest
import torch

from llamalab.eval.generative import (
    extract_flexible,
    extract_strict,
    majority,
    normalize_answer,
    pass_at_k,
    qa_exact_match,
    qa_f1,
    score_gsm8k,
    score_humaneval,
)
from tests.conftest import shared_path


def test_pass_at_k_matches_closed_form():
    for n in range(1, 25):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                want = 1 - comb(n - c, k) / comb(n, k)
                assert abs(pass_at_k(n, c, k) - want) < 1e-12, (n, c, k)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 101, 100) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_pass_at_k_is_unbiased_for_the_probability_of_success():
    # k draws without replacement from n samples of which c are correct: P(at least one correct)
    rng = random.Random(0)
    n, c, k = 12, 3, 4
    pool = [1] * c + [0] * (n - c)
    hits = sum(any(rng.sample(pool, k)) for _ in range(40000)) / 40000
    assert abs(hits - pass_at_k(n, c, k)) < 0.01


def test_gsm8k_extraction():
    assert extract_strict("so 16-3-4=9 eggs, 9*2 = 18.\n#### 18") == "18"
    assert extract_strict("The answer is 18") is None
    assert extract_flexible("She makes $1,234.00 a day. Then 5 more") == "5"
    assert extract_flexible("In total $1,234.") == "1234"
    assert extract_flexible("no digits here") is None
    assert extract_strict("#### -3.50") == "-3.5"
    assert majority(["3", None, "4", "4", "3"]) == "3"  # tie: first seen
    metrics, recs = score_gsm8k([["... #### 18", "19", "18"], ["The answer is 7.", "#### 8", "8"]], ["18", "8"])
    assert metrics == {"exact_match_strict": 0.5, "exact_match_flexible": 0.5, "maj@3": 1.0}
    assert recs[1]["strict"] is None and recs[1]["flexible"] == "7" and recs[1]["majority"] == "8"


def test_gsm8k_reference_solutions_score_full_marks():
    from llamalab.eval.tasks import get_task, load_items

    items = load_items(get_task("gsm8k"), shared_path("eval/gsm8k_test.jsonl.gz"), limit=200)
    comps = [[" " + it.fields["solution"]] for it in items]
    metrics, _ = score_gsm8k(comps, [it.fields["target"] for it in items])
    assert metrics["exact_match_strict"] == 1.0 and metrics["exact_match_flexible"] == 1.0


def test_qa_normalisation():
    assert normalize_answer("  The Eiffel-Tower! ") == "eiffeltower"  # SQuAD drops punctuation outright
    assert normalize_answer("An  apple, a day") == "apple day"
    assert qa_exact_match("the Beatles.", ["Beatles", "The Quarrymen"]) == 1.0
    assert qa_exact_match("Rolling Stones", ["Beatles"]) == 0.0
    assert qa_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)


def test_humaneval_pass_at_k_with_scripted_completions():
    with gzip.open(shared_path("eval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f][:3]
    bad = "    return None\n"
    # problem 0: 2 of 4 samples right; problem 1: 0 of 4; problem 2: 4 of 4
    comps = [[p["canonical_solution"] if ok else bad for ok in pattern]
             for p, pattern in zip(problems, [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])]
    comps[1][0] = "    import os\n    os.remove('/etc/hostname')\n"  # blocked, counts as a failure
    # OS isolation where available; unsandboxed (scripted, benign programs) only where it is not
    metrics, recs = score_humaneval(problems, comps, ks=(1, 4), timeout=10, workers=2, allow_unsandboxed=True)
    assert [r["correct"] for r in recs] == [2, 0, 4]
    assert recs[1]["results"][0]["status"] == "blocked"
    assert metrics["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert metrics["pass@4"] == pytest.approx((1 + 0 + 1) / 3)


def _argmax_reference(model, prompt: list[int], n: int, eos: int = -1) -> list[int]:
    """Greedy continuation of the plain model, one token at a time (stops before ``eos``)."""
    from llamalab.model import KVCache

    ids, cache = list(prompt), KVCache(model.cfg, 1)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache, 0)[:, -1]
        for _ in range(n):
            nxt = int(logits.argmax(-1))
            if nxt == eos:
                break
            ids.append(nxt)
            logits = model(torch.tensor([[ids[-1]]]), cache, len(ids) - 1)[:, -1]
    return ids[len(prompt):]


PROMPTS = ["It was", "My parents died when I was a boy and", "Hello"]


def test_batched_greedy_generation_matches_one_by_one(eval_model):
    """Eval decodes through the inference engine: 3 prompts of different lengths in 2 slots give the
    plain model's step-by-step argmax (as text, and as ids on the memorization path)."""
    from llamalab.eval.generative import generate_texts
    from llamalab.eval.memorization import memorization_scores
    from llamalab.inference.engine import Engine

    model, tok = eval_model
    prompts = [tok.encode(t, bos=True) for t in PROMPTS]
    refs = [_argmax_reference(model, p, 12, tok.eos_id) for p in prompts]
    texts = generate_texts(Engine(model, tok, slots=2), PROMPTS, 12)
    assert texts == [tok.decode(p + r)[len(tok.decode(p)):] for p, r in zip(prompts, refs)]
    # ids only (EOS an ordinary token): every reference token reproduced -> score 1.0
    k = min(len(p) for p in prompts)
    seqs = [p[:k] + _argmax_reference(model, p[:k], 12) for p in prompts]
    assert memorization_scores(model, seqs, k, 12, batch_size=2) == [1.0, 1.0, 1.0]


def test_generate_stops_at_stop_string_and_sampling_is_seeded(eval_model):
    from llamalab.eval.generative import model_sample_fn

    model, tok = eval_model
    [[free]] = model_sample_fn(model, tok, 20, [])(["It was a"], 1, 0.0)
    assert len(free) > 3
    stop = free[2:4]
    [[cut]] = model_sample_fn(model, tok, 20, [stop])(["It was a"], 1, 0.0)
    assert cut == free[:free.find(stop)]
    a = model_sample_fn(model, tok, 10, [], batch_size=2, seed=3)(["It was a"], 2, 1.0)
    b = model_sample_fn(model, tok, 10, [], batch_size=2, seed=3)(["It was a"], 2, 1.0)
    assert a == b and a[0][0] != a[0][1]  # seeded per sample: reproducible, yet the samples differ
