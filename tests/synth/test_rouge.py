"""ROUGE-L equals the rouge-score package (bit for bit) on random and real pairs; the index finds the true best."""

from __future__ import annotations

import json
import random

import pytest

from llamalab.synth.rouge import RougeIndex, lcs_length, rouge_l, tokenize
from tests.conftest import shared_path

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = "a b c the of to and is it x y Zebra don't 3 42".split()


def ref(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def random_texts(rng: random.Random, n: int, max_len: int = 150) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


@pytest.fixture(scope="module")
def seeds() -> list[str]:
    with open(shared_path("selfinstruct/seed_tasks.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["instruction"] for line in f if line.strip()]


def test_tokenizer_matches_rouge_score():
    texts = ["Hello, World!", "don't STOP-me now", "Café naïve résumé", "  ", "", "x_y 3.14 #tag İstanbul",
             "\u00c9cole \u00df 2nd", "a\tb\nc"]
    for t in texts:
        assert tokenize(t) == SCORER._tokenizer.tokenize(t), t


def test_pairs_equal_rouge_score(seeds):
    rng = random.Random(0)
    texts = seeds + random_texts(rng, 200) + ["", "!!!", "a", "a a a a"]
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(2000)] + [(s, s) for s in seeds[:20]]
    for a, b in pairs:
        assert rouge_l(a, b) == ref(a, b), (a, b)
    assert rouge_l("a b c d", "a c d e") == 0.75


def test_lcs_against_the_dp_table():
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.randint(0, 4) for _ in range(rng.randint(0, 200))]
        b = [rng.randint(0, 4) for _ in range(rng.randint(0, 80))]
        table = rouge_scorer._lcs_table(a, b)
        assert lcs_length(a, b) == (table[-1][-1] if a and b else 0)


def test_index_scores_every_kept_instruction_exactly(seeds):
    rng = random.Random(2)
    kept = seeds + random_texts(rng, 30)  # up to 150 tokens: patterns of 1..3 64-bit words
    index = RougeIndex(kept)
    for q in seeds[:12] + random_texts(rng, 8) + ["Write a poem about the sea."]:
        if not tokenize(q):
            continue
        idx, f = index.scores(q)
        got = dict(zip(idx.tolist(), f.tolist()))
        want = [ref(q, t) for t in kept]
        for i, w in enumerate(want):
            assert got.get(i, 0.0) == w, (q, kept[i])
        score, at = index.best(q)
        assert score == max(want) and at == want.index(max(want))  # the earliest of ties


def test_length_bound_never_misses_a_near_duplicate(seeds):
    rng = random.Random(3)
    kept = seeds + random_texts(rng, 100, 60)
    index = RougeIndex(kept)
    for q in seeds[::2] + random_texts(rng, 30, 60):
        want = max(rouge_l(q, t) for t in kept)  # rouge_l == rouge-score: test_pairs_equal_rouge_score
        score, at = index.best(q, min_score=0.7)
        if want >= 0.7:
            assert score == want and rouge_l(q, kept[at]) == want
        else:
            assert score < 0.7
    assert len(index) == len(kept)


def test_empty_and_unknown_words():
    index = RougeIndex(["", "!!", "the cat sat"])
    assert index.best("") == (0.0, None)
    assert index.best("dogs run") == (0.0, 2)  # nothing in common: 0 (the one tokenized candidate)
    assert index.best("the cat sat")[0] == 1.0 and index.n_empty == 2
