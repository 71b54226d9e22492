"""Rejection sampling: the best-of-K estimator against enumeration, the kept set is each prompt's argmax and
loads as SFT data, best-of-K >= the mean, bad input."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from llamalab.align.rejection import best_of_k_curve, expected_best_of
from llamalab.common import LlamalabError
from llamalab.run_dir import RunDir

from .conftest import synthetic_pairs, write_jsonl


@pytest.fixture
def random_rm(tmp_path, align_base, align_tok) -> Path:
    from llamalab.align.reward import reward_model_from, save_reward_model
    from llamalab.model.folder import load_model

    torch.manual_seed(3)
    return save_reward_model(tmp_path / "rm_model", reward_model_from(load_model(align_base)[0]), align_tok, "llama2")


def _cfg(align_base, random_rm, prompts, out, **kw):
    from llamalab.commands import rejection_sample as rs

    opts = dict(policy=str(align_base), rm=str(random_rm), prompts=[str(prompts)], out=str(out), k=4,
                max_new_tokens=8, device="cpu", slots=8)
    opts.update(kw)
    return rs.Config(**opts)


def test_expected_best_of_equals_enumeration():
    rng = random.Random(0)
    for n in (1, 3, 5):
        r = [rng.uniform(-2, 2) for _ in range(n)] + ([0.5, 0.5] if n == 5 else [])  # ties too
        for k in range(1, len(r) + 1):
            subsets = list(itertools.combinations(r, k))
            want = sum(max(s) for s in subsets) / len(subsets)
            assert abs(expected_best_of(r, k) - want) < 1e-12
    curve = best_of_k_curve([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert [c["k"] for c in curve] == [1, 2, 3]
    assert abs(curve[0]["best_of_k"] - 10 / 6) < 1e-12 and abs(curve[2]["best_of_k"] - 4.0) < 1e-12
    with pytest.raises(ValueError):
        expected_best_of([1.0], 2)
    from llamalab.align.rejection import engine_context

    assert engine_context([[1] * 10, [1] * 30], 8, 128) == 39 and engine_context([[1] * 200], 8, 128) == 128


def test_rejection_sampling_keeps_the_argmax_and_writes_sft_data(tmp_path, align_base, random_rm, align_tok):
    from llamalab.align.reward import load_reward_model, score_texts
    from llamalab.commands import rejection_sample as rs
    from llamalab.finetune.data import load_sft_data

    pairs = synthetic_pairs(5, seed=7)
    recs = pairs + [pairs[0], {"prompt": "Tell me about the moon."},
                    {"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Tell me about the sea."}]}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", recs)
    summary = rs.main(_cfg(align_base, random_rm, prompts, tmp_path / "rs"))
    run = RunDir(tmp_path / "rs")
    assert summary["prompts"]["read"] == 8 and summary["prompts"]["duplicates"] == 1
    rows = [json.loads(x) for x in run.rejection_samples.read_text().splitlines()]
    kept = [json.loads(x) for x in run.rejection_kept.read_text().splitlines()]
    assert len(rows) == 7 and all(len(r["samples"]) == 4 for r in rows)
    assert len({s["text"] for s in rows[0]["samples"]}) > 1  # sampled, not greedy
    rm, tok, _ = load_reward_model(random_rm)
    r0 = rows[0]
    again = score_texts(rm, tok, "llama2", [r0["prompt"] + [{"role": "assistant", "content": s["text"]}]
                                            for s in r0["samples"]], batch_size=1)
    assert all(abs(a - s["reward"]) < 1e-4 for a, s in zip(again, r0["samples"]))
    by_where = {k["where"]: k for k in kept}
    for r in rows:
        rewards = [s["reward"] for s in r["samples"]]
        assert r["best"] == rewards.index(max(rewards))
        best = r["samples"][r["best"]]
        if best["text"]:
            k = by_where[r["where"]]
            assert k["conversations"][-1] == {"from": "gpt", "value": best["text"]} and k["reward"] == max(rewards)
    assert len(kept) + sum(summary["kept_dropped"].values()) == 7
    assert rows[-1]["prompt"][0] == {"role": "system", "content": "Be brief."}

    curve = [c["best_of_k"] for c in summary["best_of_k"]]
    all_r = [s["reward"] for r in rows for s in r["samples"]]
    assert abs(curve[0] - sum(all_r) / len(all_r)) < 1e-9  # k = 1: the mean sample
    assert abs(curve[-1] - sum(max(s["reward"] for s in r["samples"]) for r in rows) / len(rows)) < 1e-9
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:])) and curve[-1] > curve[0]
    # the kept set is SFT data
    examples, ledger = load_sft_data([run.rejection_kept], "sharegpt", "llama2", align_tok, 128)
    assert ledger.read == len(kept) and len(examples) == len(kept)
    assert json.loads(run.meta.read_text())["rm"]["weights_sha256"]
    pytest.importorskip("matplotlib")
    assert "best-of-K reward" in run.report.read_text()


def test_rejection_sampling_bad_input(tmp_path, align_base, random_rm):
    from llamalab.commands import rejection_sample as rs
    from llamalab.config import parse_config

    cfg, _ = parse_config(rs.Config, ["--policy", "p", "--rm", "r", "--prompts", "f.jsonl", "-k", "3"])
    assert cfg.k == 3
    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tell me about the inn."}])
    with pytest.raises(LlamalabError, match="-k must be >= 1"):
        rs.main(_cfg(align_base, random_rm, good, tmp_path / "o", k=0))
    with pytest.raises(LlamalabError, match="greedy"):
        rs.main(_cfg(align_base, random_rm, good, tmp_path / "o", temperature=0.0))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Tell me about the inn."}, "{oops", {"answer": "x"}])
    with pytest.raises(LlamalabError, match=r"bad\.jsonl:2"):
        rs.main(_cfg(align_base, random_rm, bad, tmp_path / "o"))
    with pytest.raises(LlamalabError, match="not a reward model"):
        rs.main(_cfg(align_base, align_base, good, tmp_path / "o"))
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the school " * 150}, {"prompt": "Tell me about the inn."},
                                                 "{oops"])
    s = rs.main(_cfg(align_base, random_rm, long, tmp_path / "o", k=2, on_error="skip"))
    assert s["prompts"]["dropped"] == {"prompt_too_long": 1, "malformed": 1}
    assert s["prompts"]["kept"] == 1 and s["sampled_prompts"] == 1 and any("long.jsonl:1" in e
                                                                          for e in s["prompts"]["errors"])
