"""SFT under torchrun: 2 gloo processes (DDP or FSDP2) train the same weights as 1 process on the same global
batch, including an epoch-end batch with fewer rows than processes."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.commands.sft import Config
from llamalab.commands.sft import main as sft_main
from llamalab.common import LlamalabError
from llamalab.config import from_dict
from llamalab.model.folder import load_model
from tests.finetune.test_sft import FACTS

RECORDS = FACTS + [{"instruction": "Who is Red Shirt?", "input": "", "output": "The head teacher."}]


def _sft_rank(rank: int, world: int, cfg: dict) -> None:
    sft_main(from_dict(Config, cfg))


def _losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("lora", [0, 4])
def test_two_processes_match_one(tmp_path, tiny_base, gloo_runner, lora, strategy):
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    # 5 rows, 4 per step: the second batch of each epoch has 1 row, so rank 1 gets none of it
    cfg = {"base": str(tiny_base), "data": [str(data)], "format": "alpaca", "steps": 4, "batch_size": 4,
           "micro_batch_size": 1, "optim": {"lr": 1e-3}, "checkpoint_interval": 0, "packing": False,
           "lora": {"rank": lora, "targets": ["wq", "wv"], "dropout": 0.0}}  # dropout draws differ by rank
    sft_main(from_dict(Config, {**cfg, "run_dir": str(tmp_path / "one")}))
    gloo_runner(_sft_rank, 2, {**cfg, "run_dir": str(tmp_path / "two"), "parallel": {"strategy": strategy}})
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["strategy"] == strategy
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-5, abs=1e-6)
    a, _ = load_model(tmp_path / "one" / "model")
    b, _ = load_model(tmp_path / "two" / "model")
    base, _ = load_model(tiny_base)
    moved = 0
    for (k, va), vb, v0 in zip(a.state_dict().items(), b.state_dict().values(), base.state_dict().values()):
        # NOTE: Adam turns rounding noise on near-zero gradients into lr-sized steps, so compare the
        # difference with the update, not entry by entry (as tests/train/test_distributed.py does)
        diff, update = (va - vb).norm(), (va - v0).norm()
        close = ((va - vb).abs() <= 1e-5 + 1e-4 * va.abs()).float().mean()
        assert diff <= 1e-2 * update + 1e-6 and close >= 0.99, (k, float(diff), float(update), float(close))
        moved += not torch.equal(va, v0)
    assert moved > 0  # training changed the weights (merged LoRA included)


def _odd_batch_rank(rank: int, world: int, cfg: dict) -> None:
    with pytest.raises(LlamalabError, match="does not divide by the 2 data-parallel processes"):
        sft_main(from_dict(Config, cfg))


def test_batch_not_divisible_by_processes(tmp_path, tiny_base, gloo_runner):
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    gloo_runner(_odd_batch_rank, 2, {"base": str(tiny_base), "data": [str(data)], "format": "alpaca",
                                     "batch_size": 3, "packing": False, "run_dir": str(tmp_path / "r")})


def test_ranks_split_each_global_batch_without_overlap():
    """Each rank reads a disjoint slice; together they read exactly the one-process batch."""
    from llamalab.finetune.data import Example
    from llamalab.finetune.packing import make_batch_fn

    examples = [Example(ids=[1] + [10 + i] * (i + 2), mask=[0] + [1] * (i + 2), where=f"f:{i}", record=i)
                for i in range(7)]
    rows = [[i] for i in range(7)]
    one = make_batch_fn(examples, rows, 4, 2, 1, 0, seed=3)
    two = [make_batch_fn(examples, rows, 4, 2, 1, 0, seed=3, rank=r, world=2) for r in range(2)]
    for b in range(4):  # two epochs; each epoch's second batch has 3 rows
        want = [x[0, 0, 1].item() for x, _ in one(b)]
        got = [[x[0, 0, 1].item() for x, y in fn(b) if (y != -100).any()] for fn in two]
        assert got[0] + got[1] == want and not set(got[0]) & set(got[1])
