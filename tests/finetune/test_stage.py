"""The pieces sft/rm/dpo/ppo share (llamalab.finetune.stage): the run flags of every stage, listed after the
command's own, with PPO's overrides; the batch order; the setup's errors."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from llamalab.common import LlamalabError
from llamalab.config import build_parser, parse_config
from llamalab.finetune.packing import batch_indices
from llamalab.finetune.stage import StageConfig, load_base, parallel_model
from llamalab.train.distributed import ParallelConfig

STAGES = ["sft", "rm", "dpo", "ppo"]
RUN_FLAGS = [f.name for f in dataclasses.fields(StageConfig)]


def _flags(cls: type) -> list[str]:
    """The --flags of ``cls`` in --help order, nested ones (--optim.lr) folded to their field (optim)."""
    out: list[str] = []
    for a in build_parser(cls, "x")._actions:
        long = [o for o in a.option_strings if o.startswith("--")]
        if not long or long[0] in ("--help", "--config", "--debug"):
            continue
        name = long[0][2:].split(".")[0].replace("-", "_")
        if name not in out:
            out.append(name)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_run_flags_are_listed_last_in_their_order(stage):
    cls = importlib.import_module(f"llamalab.commands.{stage}").Config
    assert issubclass(cls, StageConfig)
    flags = _flags(cls)
    assert flags[-len(RUN_FLAGS):] == RUN_FLAGS
    assert flags[0] == ("policy" if stage == "ppo" else "base")  # what the command is about comes first
    assert len(flags) == len(set(flags)) == len([f for f in dataclasses.fields(cls) if f.init])


@pytest.mark.parametrize("stage", STAGES)
def test_run_flags_parse_and_defaults(stage):
    mod = importlib.import_module(f"llamalab.commands.{stage}")
    need = ["--policy", "p", "--reward-fn", "m:f"] if stage == "ppo" else ["--base", "b"]
    cfg, _ = parse_config(mod.Config, [*need, "--data", "d.jsonl", "--on-error", "skip", "--limit", "3", "--seed",
                                       "5", "--keep-last", "0", "--guard.window", "7", "--resume",
                                       "--parallel.strategy", "ddp"])
    assert (cfg.on_error, cfg.limit, cfg.seed, cfg.keep_last, cfg.guard.window, cfg.resume) == ("skip", 3, 5, 0, 7,
                                                                                                True)
    assert cfg.parallel.strategy == "ddp"
    d = mod.Config()
    if stage == "ppo":  # counted in iterations; no loss-spike guard (a PPO loss is centred near 0)
        assert (d.checkpoint_interval, d.guard.spike_action) == (10, "none")
    else:
        assert (d.checkpoint_interval, d.guard.spike_action) == (500, "skip")
    assert (d.keep_last, d.seed, d.device, d.dtype, d.on_error, d.limit) == (2, 1337, "auto", "auto", "raise", 0)
    with pytest.raises(SystemExit):
        parse_config(mod.Config, [*need, "--data", "d.jsonl", "--on-error", "ignore"])


def test_own_class_keeps_its_order():
    """A Config without the FLAGS_LAST base lists its fields as declared (StageConfig itself included)."""
    assert _flags(StageConfig) == RUN_FLAGS


@pytest.mark.parametrize("n,g,world", [(10, 4, 1), (10, 4, 3), (7, 7, 2), (5, 2, 4)])
def test_batch_indices_cover_each_epoch_once_whatever_the_world_size(n, g, world):
    per_epoch = -(-n // g)
    for epoch in range(2):
        seen: list[int] = []
        for b in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            picked, alone = batch_indices(n, g, per_epoch, 3, b)
            assert picked == alone and len(picked) == min(g, n - (b - epoch * per_epoch) * g)
            shares = [batch_indices(n, g, per_epoch, 3, b, r, world)[1] for r in range(world)]
            assert sum(shares, []) == picked  # ranks take contiguous slices of the one global batch
            seen += picked
        assert sorted(seen) == list(range(n))
    e0 = sum((batch_indices(n, g, per_epoch, 3, b)[0] for b in range(per_epoch)), [])
    e1 = sum((batch_indices(n, g, per_epoch, 3, b)[0] for b in range(per_epoch, 2 * per_epoch)), [])
    assert e0 != e1 or n < 4  # each epoch its own seeded order


def test_parallel_model_rejects_unsupported_strategies():
    import torch

    model = torch.nn.Linear(2, 2)
    with pytest.raises(LlamalabError, match="sft: parallel.strategy tp is not supported; use ddp or fsdp"):
        parallel_model(model, ParallelConfig(strategy="tp"), torch.device("cpu"), torch.float32, 2, "sft")
    with pytest.raises(LlamalabError, match="rm: parallel.strategy fsdp is not supported for reward models; use ddp"):
        parallel_model(model, ParallelConfig(strategy="fsdp"), torch.device("cpu"), torch.float32, 2, "rm",
                       allowed=("ddp",), unsupported=" for reward models")
    net, strategy = parallel_model(model, ParallelConfig(), torch.device("cpu"), torch.float32, 1, "sft")
    assert strategy == "none" and net(torch.zeros(1, 2)).shape == (1, 2)


def test_load_base_length_and_template(tiny_base):
    b = load_base(str(tiny_base), "chatml", "cpu", "auto")
    assert (b.length, b.template, b.world, b.rank) == (128, "chatml", 1, 0)
    assert load_base(str(tiny_base), "", "cpu", "auto", 64, "--seq-len").length == 64
    with pytest.raises(LlamalabError, match=r"--max-len 129 exceeds the model's context \(128\)"):
        load_base(str(tiny_base), "", "cpu", "auto", 129, "--max-len")
