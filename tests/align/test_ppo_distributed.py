"""PPO under torchrun: 2 gloo processes (DDP, or FSDP2 on the policy and the value model) sample half the prompts
each, share the rollout buffer and train the same weights as 1 process (the same minibatches, whitening and
statistics over all answers); a sharded policy samples the same answers as a whole one, with ranks whose decode
loops run different numbers of steps."""

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


@pytest.mark.parametrize("strategy,lora", [("ddp", 0), ("fsdp", 0), ("fsdp", 4)])
def test_two_processes_match_one(tmp_path, align_base, gloo_runner, strategy, lora):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=4))
    cfg = {"policy": str(align_base), "data": [str(data)], "reward_fn": ["tests.align.test_ppo:letter_share"],
           "iterations": 2, "micro_batch_size": 4, "optim": {"lr": 1e-2}, "checkpoint_interval": 2, "seed": 0,
           "device": "cpu", "ppo": {"rollout_batch": 16, "minibatch": 8, "epochs": 2, "max_new_tokens": 6,
                                    "rollout_micro": 8, "kl_coef": 0.1},
           "lora": {"rank": lora, "targets": ["wq", "wv"], "dropout": 0.0}}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ppo_main(from_dict(Config, {**cfg, "run_dir": str(tmp_path / "one")}))
    finally:
        torch.set_num_threads(n)
    gloo_runner(_ppo_rank, 2, {**cfg, "run_dir": str(tmp_path / "two"), "parallel": {"strategy": strategy}})
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["strategy"] == strategy and meta["world_size"] == 2
    assert (meta["trainable_params"] < meta["n_params"]) == bool(lora)
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


def _sample_rank(rank: int, world: int, base: str, out: str) -> None:
    from llamalab.align.ppo import build_ppo_model, sample_answers, shard_ppo_model
    from llamalab.finetune.lora import LoRAConfig
    from llamalab.inference.sampling import SamplingParams

    policy, _ = load_model(base)
    model, _ = build_ppo_model(policy, LoRAConfig(), 0.1)
    shard_ppo_model(model, torch.device("cpu"))
    # rank 0: answers of 2 tokens, rank 1: of 7 (no stop tokens): the ranks' decode loops run 1 and 6 steps, so a
    # collective per decode step would hang or pair the wrong calls; then both ranks run one sharded forward
    steps = 2 if rank == 0 else 7
    prompts = [[1, 5, 9, 13], [1, 7]]
    params = [SamplingParams(temperature=1.0, max_tokens=steps, seed=100 + rank * 10 + i) for i in range(2)]
    got = sample_answers(model.policy, prompts, params, set(), 0, 2)
    model.policy(torch.tensor([[1, 2, 3]]))  # the sharded policy still works after sampling (a collective)
    torch.save({"got": got, "params": params, "prompts": prompts}, f"{out}/rank{rank}.pt")


def test_sharded_policy_samples_as_whole(tmp_path, align_base, gloo_runner):
    from llamalab.align.ppo import sample_answers

    gloo_runner(_sample_rank, 2, str(align_base), str(tmp_path))
    whole, _ = load_model(align_base)
    lens = []
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        want = sample_answers(whole, r["prompts"], r["params"], set(), 0, 2)
        assert r["got"] == want, rank
        lens.append([len(a) for a, _ in r["got"]])
    assert lens == [[2, 2], [7, 7]]
