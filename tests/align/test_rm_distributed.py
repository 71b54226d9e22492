"""The reward model under torchrun: 2 gloo processes with FSDP2 (the root unit holds the scalar ``score`` head; with
LoRA, adapters and the head train) train the same weights as 1 process, the held-out evaluation during and after the
run runs the sharded model on every rank and gives the same numbers, and rank 0 writes the gathered model."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.align.reward import load_reward_model
from llamalab.commands.rm import Config
from llamalab.commands.rm import main as rm_main
from llamalab.config import from_dict
from llamalab.model.folder import load_model
from tests.align.conftest import synthetic_pairs, write_jsonl


def _rm_rank(rank: int, world: int, cfg: dict) -> None:
    rm_main(from_dict(Config, cfg))


def _rows(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [0, 4])
def test_fsdp_two_processes_match_one(tmp_path, align_base, gloo_runner, lora):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(14, seed=3))
    cfg = {"base": str(align_base), "data": [str(data)], "max_len": 64, "steps": 4, "batch_size": 4,
           "micro_batch_size": 1, "heldout_fraction": 0.3, "eval_interval": 2, "optim": {"lr": 1e-2},
           "checkpoint_interval": 0, "seed": 0, "device": "cpu",
           "lora": {"rank": lora, "targets": ["wq", "wv"], "dropout": 0.0}}
    rm_main(from_dict(Config, {**cfg, "run_dir": str(tmp_path / "one")}))
    gloo_runner(_rm_rank, 2, {**cfg, "run_dir": str(tmp_path / "two"), "parallel": {"strategy": "fsdp"}})
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["strategy"] == "fsdp" and meta["world_size"] == 2
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == len(two) == 4
    for key in ("loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_margin"):
        a, b = [r.get(key) for r in one], [r.get(key) for r in two]
        assert sum(v is not None for v in a) >= 2, key  # every step logs; held-out at steps 2 and 4
        assert [v is None for v in a] == [v is None for v in b], key
        assert [v for v in a if v is not None] == pytest.approx([v for v in b if v is not None], rel=1e-5,
                                                                  abs=1e-6), key
    s1 = json.loads((tmp_path / "one" / "rm_summary.json").read_text())["heldout"]
    s2 = json.loads((tmp_path / "two" / "rm_summary.json").read_text())["heldout"]
    assert s1["after"]["pairs"] == s2["after"]["pairs"] > 0
    for k in ("loss", "accuracy", "margin"):
        assert s1["after"][k] == pytest.approx(s2["after"][k], rel=1e-5, abs=1e-6), k
    a, _, _ = load_reward_model(tmp_path / "one" / "model")
    b, _, _ = load_reward_model(tmp_path / "two" / "model")
    start_sd = load_model(align_base)[0].state_dict()
    moved = 0
    for k, va in a.state_dict().items():
        vb = b.state_dict()[k]
        v0 = start_sd.get(k)
        update = (va - v0).norm() if v0 is not None else va.norm()  # the score head is new: its size
        diff = (va - vb).norm()
        close = ((va - vb).abs() <= 1e-5 + 1e-4 * va.abs()).float().mean()
        assert diff <= 1e-2 * update + 1e-6 and close >= 0.99, (k, float(diff), float(update), float(close))
        moved += v0 is not None and not torch.equal(va, v0)
    assert "score.weight" in a.state_dict() and moved > 0
