"""What the fine-tuning stages (``sft``, ``rm``, ``dpo``, ``ppo``) share: the run's flags and the setup before the
first step.

:class:`StageConfig` holds the flags every one of them has (records: ``--on-error``, ``--limit``; the run:
``--parallel.*``, ``--guard.*``, ``--device``, ``--dtype``, ``--checkpoint-interval``, ``--keep-last``,
``--stop-after``, ``--max-seconds``, ``--seed``, ``--resume``); each command's ``Config`` subclasses it, adds its
own flags and overrides a field where its default or help differs (PPO counts checkpoints in iterations). Its
flags are listed after the command's own in ``--help`` (``FLAGS_LAST``, read by :mod:`llamalab.config`).

The functions are the steps the stages take in the same way: :func:`load_base` (device, base model, chat
template, length), :func:`parallel_model`, :func:`stage_optimizer` and :func:`loop_settings`. They take explicit
values or a :class:`StageConfig`, never a command's ``Config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from llamalab.common import LlamalabError, print0
from llamalab.train.distributed import ParallelConfig, init_device, parallelize, resolve_strategy
from llamalab.train.optim import OptimConfig, build_optimizer, warmup_steps_for
from llamalab.train.setup import Autocast, autocast_for
from llamalab.train.stability import GuardConfig
from llamalab.train.trainer import LoopSettings

ON_ERROR = ("raise", "skip")


@dataclass
class StageConfig:
    """The flags of a fine-tuning run that every stage has (module docstring)."""

    FLAGS_LAST: ClassVar[bool] = True  # llamalab.config lists these fields after the subclass's own

    on_error: str = field(default="raise", metadata={"choices": list(ON_ERROR),
                                                     "help": "malformed records: stop with file:line, or count "
                                                             "and skip"})
    limit: int = field(default=0, metadata={"help": "read at most N records (0: all)"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={
        "help": "under torchrun: strategy ddp (auto) or fsdp; activation checkpointing; compile"})
    guard: GuardConfig = field(default_factory=GuardConfig)
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 autocast where fast (CUDA), else fp32"})
    checkpoint_interval: int = field(default=500, metadata={"help": "steps between checkpoints (and at the end)"})
    keep_last: int = field(default=2, metadata={"help": "keep only the newest N checkpoints (0: all)"})
    stop_after: int = 0
    max_seconds: float = 0.0
    seed: int = 1337
    resume: bool = False


def check_warmup(stage: str, optim: OptimConfig) -> None:
    """``--optim.warmup-steps`` and ``--optim.warmup-ratio`` both set: the ratio wins, so say so (an error)."""
    if optim.warmup_steps and optim.warmup_ratio:
        raise LlamalabError(f"{stage}: --optim.warmup-steps {optim.warmup_steps} is ignored while "
                            f"--optim.warmup-ratio is {optim.warmup_ratio:g}: add --optim.warmup-ratio 0")


@dataclass
class Base:
    """The device of this process and the base model as a stage starts: loaded on the CPU in fp32 (the stage
    moves it), its chat template resolved, and the length a stage's rows or answers may reach."""

    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    model: torch.nn.Module
    meta: dict[str, Any]
    path: Path
    tokenizer: Any
    template: str
    length: int

    @property
    def autocast(self) -> Autocast:
        return autocast_for(self.device, self.dtype)


DEFAULT_LENGTH = 1024  # TRL's max_length for SFT, DPO and reward models; rows/pairs longer are split or cut
MICRO_TOKENS = 4096  # SFT tokens per forward pass by default: SmolLM2 LoRA at 8 x 1024 needs > 23 GB on CPU


def default_micro(rows_per_process: int, seq_len: int) -> int:
    """SFT rows per forward pass when ``--micro-batch-size`` is 0: as many ``seq_len`` rows as fit
    :data:`MICRO_TOKENS` tokens, at least 1 and at most 8 (and the rows a process gets per step)."""
    return max(1, min(rows_per_process, 8, MICRO_TOKENS // seq_len))


def load_base(path: str, template: str, device: str, dtype: str, length: int = 0, length_flag: str = "",
              default_length: int = 0) -> Base:
    """:func:`~llamalab.train.distributed.init_device`, then the model at ``path`` by the one loader and its
    template (``template``, else its own: :func:`~llamalab.tokenizer.templates.resolve_template`). ``length``
    (0: ``default_length`` capped at the model's context; 0 again: the context) may not exceed the context;
    ``length_flag`` names the flag in the error.

    NOTE: a fine-tuning row's activations and (rows, T, vocabulary) logits grow with its length: SmolLM2's
    8192-token context as the default length got the chat recipe killed for memory on a 24 GB machine."""
    from llamalab.model.folder import load
    from llamalab.tokenizer.templates import resolve_template

    dev, dt, rank, world = init_device(device, dtype)
    loaded = load(path, device="cpu", dtype=torch.float32)
    model = loaded.model
    ctx = model.cfg.max_seq_len
    n = length or min(ctx, default_length or ctx)
    if n > ctx:
        raise LlamalabError(f"{length_flag} {n} exceeds the model's context ({ctx})")
    return Base(dev, dt, rank, world, model, loaded.meta, loaded.path, loaded.tokenizer,
                resolve_template(loaded.meta, template or None), n)


def print_dropped(errors: list[str], n: int = 5) -> None:
    """The first ``n`` dropped records of a data ledger (their file:line and why), under its summary line."""
    for e in errors[:n]:
        print0(f"  dropped {e}")


def parallel_model(model: torch.nn.Module, parallel: ParallelConfig, device: torch.device, dtype: torch.dtype,
                   world: int, stage: str, allowed: tuple[str, ...] = ("ddp", "fsdp"),
                   unsupported: str = "") -> tuple[torch.nn.Module, str]:
    """The model wrapped for ``world`` processes (DDP or FSDP, as :func:`~llamalab.train.distributed.parallelize`)
    with the fused pretraining head off (every fine-tuning loss reads the logits). A strategy not in ``allowed``
    is an error (``unsupported``: words after "is not supported", e.g. " yet"). Returns (the model, strategy)."""
    pcfg = dataclasses.replace(parallel, fused_loss=False)
    strategy = resolve_strategy(pcfg, world)
    if strategy not in ("none", *allowed):
        raise LlamalabError(f"{stage}: parallel.strategy {strategy} is not supported{unsupported}; "
                            f"use {' or '.join(allowed)}")
    net = parallelize(model, pcfg, device, param_dtype=dtype if dtype != torch.float32 else None)
    return net, strategy


def stage_optimizer(model: torch.nn.Module, optim: Any, lora: bool) -> tuple[Any, torch.optim.Optimizer]:
    """The optimizer config with its stage's peak learning rate set (``optim.peak_lr(lora)``: LoRA's default is
    larger) and the optimizer over ``model``'s trainable parameters. Returns (config, optimizer)."""
    optim = dataclasses.replace(optim, lr=optim.peak_lr(lora))
    return optim, build_optimizer(model, optim, optim.lr)


def loop_settings(name: str, run_dir: Path, cfg: StageConfig, optim: OptimConfig, steps: int,
                  eval_interval: int = 0) -> LoopSettings:
    """The Trainer's settings of a stage: a cosine schedule to ``optim.min_lr_ratio`` after its warmup, and the
    run flags of ``cfg`` (checkpoints, stops, resume, guards), all counted in optimizer steps."""
    return LoopSettings(
        name=name, run_dir=run_dir, steps=steps, peak_lr=optim.lr, warmup=warmup_steps_for(optim, steps),
        min_lr_ratio=optim.min_lr_ratio, grad_clip=optim.grad_clip, checkpoint_interval=cfg.checkpoint_interval,
        keep_last=cfg.keep_last, eval_interval=eval_interval, stop_after=cfg.stop_after,
        max_seconds=cfg.max_seconds, resume=cfg.resume, guard=cfg.guard)
