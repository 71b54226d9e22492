"""PPO under torchrun: 2 gloo processes (DDP) sample half the prompts each, share the rollout buffer and train the
same weights as 1 process (the same minibatches, whitening and statistics over all answers)."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.commands.ppo import Config
from llamalab.commands.ppo import main as ppo_main
from llamalab.config import from_dict
from llamalab.model.folder import load_model
from tests.align.conftest import synthetic_pairs, write_jsonl


def _ppo_rank(rank: int, world: int, cfg: dict) -> None:
    ppo_main(from_dict(Config, cfg))


def _rows(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path, align_base, gloo_runner):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=4))
    cfg = {"policy": str(align_base), "data": [str(data)], "reward_fn": ["tests.align.test_ppo:letter_share"],
           "iterations": 2, "micro_batch_size": 4, "optim": {"lr": 1e-2}, "checkpoint_interval": 2, "seed": 0,
           "device": "cpu", "ppo": {"rollout_batch": 16, "minibatch": 8, "epochs": 2, "max_new_tokens": 6,
                                    "rollout_micro": 8, "kl_coef": 0.1}}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ppo_main(from_dict(Config, {**cfg, "run_dir": str(tmp_path / "one")}))
    finally:
        torch.set_num_threads(n)
    gloo_runner(_ppo_rank, 2, {**cfg, "run_dir": str(tmp_path / "two")})
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["strategy"] == "ddp"
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == len(two) == 2 * 2 * 2
    for key in ("loss", "score", "kl", "reward", "entropy", "clip_frac", "value_loss", "answer_len"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], rel=1e-4, abs=1e-5), key
    a, _ = load_model(tmp_path / "one" / "model")
    b, _ = load_model(tmp_path / "two" / "model")
    base, _ = load_model(align_base)
    moved = 0
    for (k, va), vb, v0 in zip(a.state_dict().items(), b.state_dict().values(), base.state_dict().values()):
        diff, update = (va - vb).norm(), (va - v0).norm()
        assert diff <= 1e-2 * update + 1e-6, (k, float(diff), float(update))
        moved += not torch.equal(va, v0)
    assert moved > 0
