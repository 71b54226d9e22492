"""Pretrain a LLaMA model on token shards with the published recipe, leaving a complete record.

Recipe (LLaMA, Touvron et al. 2023a): AdamW (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0,
linear warmup (2000 steps, scaled down to a tenth of short runs) then cosine to 10% of the peak;
gradient accumulation to a global batch given in tokens; bf16 autocast where the device has fast
bf16 (fp32 on CPU), or fp16 with dynamic loss scaling; optional activation checkpointing. Launched
with torchrun it trains data parallel (DDP) or fully sharded (FSDP2, ``--parallel.strategy fsdp``):
the global batch and the data order do not depend on the world size (docs/distributed.md).

Record (LLM360): ``meta.json`` (resolved config, git SHA, versions, manifest hash), the data
manifest, ``metrics.jsonl`` (one line per step: loss, lr, grad norm, tokens, tokens/s, MFU, the
global batch index read), ``logbook.jsonl`` (restarts, NaNs, spikes, rollbacks, config changes),
and every checkpoint (``--keep-last 0`` keeps all). A completed schedule ends with the final model
at ``RUN/model/`` (the last checkpoint's, hard-linked): ``--base RUN/model`` or just ``RUN``. A run
stopped early (``--stop-after``, ``--max-seconds``, SIGTERM/SIGINT, which write a checkpoint and
exit 143/130) has no ``model/`` yet: its newest checkpoint is the model until ``--resume`` finishes.

The library pieces live in :mod:`llamalab.train.setup` (model shape, batch plan, precision, the
parallel model), :mod:`llamalab.train.trainer` (the loop) and :mod:`llamalab.train.meta` (the
record); this module only reads the flags and calls them in order.

Resume is exact on CPU: N steps straight equal k steps + stop + ``--resume`` + N-k steps, bit for
bit, because the data order is a pure function of (seed, batch index), and the checkpoint holds the
optimizer moments, RNG states, the guard's window and the data position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.common import LlamalabError, is_rank0, measure_matmul_peak, print0, seed_everything, write_json_atomic
from llamalab.config import to_dict
from llamalab.data.shards import TokenDataset, load_manifest, val_batches
from llamalab.model.config import flops_per_token, num_params
from llamalab.report.html import write_report
from llamalab.run_dir import RunDir
from llamalab.train.distributed import ParallelConfig, init_device, resolve_strategy
from llamalab.train.meta import run_meta, shards_record, write_meta
from llamalab.train.optim import OptimConfig, build_optimizer
from llamalab.train.setup import (
    build_model_config,
    build_parallel_model,
    copy_tokenizer,
    make_grad_scaler,
    make_plan,
    resolve_seq_len,
)
from llamalab.train.stability import GuardConfig
from llamalab.train.step import evaluate_loss, split_micro
from llamalab.train.trainer import LoopSettings, Trainer


@dataclass
class Config:
    data: str = field(default="", metadata={"positional": True, "help": "folder holding manifest.json (token shards)"})
    run_dir: str = field(default="runs/pretrain", metadata={"help": "where the run's record goes"})
    preset: str = field(default="tiny", metadata={"help": "model preset (llamalab info --all)"})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": 'JSON overrides of the preset\'s ModelConfig fields, e.g. {"n_layers": 2}'})
    seq_len: int = field(default=0, metadata={"help": "training sequence length (0: the model's context)"})
    global_batch_tokens: int = field(default=0, metadata={"help": "tokens per optimizer step (0: the preset's)"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward pass per rank (0: auto)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: one epoch of the training windows)"})
    stop_after: int = field(default=0, metadata={"help": "stop this invocation after N steps (a chunked job; "
                                                         "--resume continues); the schedule still spans --steps"})
    max_seconds: float = field(default=0.0, metadata={"help": "stop (with a checkpoint) after this much time"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"
    dtype: str = field(default="auto", metadata={
        "help": "auto: bf16 where fast (CUDA), else fp32; fp16: autocast + dynamic loss scaling (OPT); "
                "with parallel.strategy=fsdp on GPU: FSDP's mixed-precision policy instead of autocast"})
    checkpoint_interval: int = 100
    keep_last: int = field(default=0, metadata={"help": "keep only the newest N checkpoints (0: keep all)"})
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 1337
    resume: bool = False
    restart_if_corrupt: bool = field(default=False, metadata={
        "help": "with --resume: when every checkpoint fails verification, set them aside (step_N.corrupt) and "
                "train again from step 0 instead of stopping with an error"})
    tensorboard: bool = False
    report: bool = field(default=True, metadata={"help": "write report.html (plots, config, logbook) at the end"})
    peak_flops: float = field(default=0.0, metadata={"help": "device peak FLOP/s for MFU (0: measure a matmul)"})
    fault_nan_steps: list[int] = field(default_factory=list, metadata={
        "help": "fault drill: report a NaN loss at these steps (tests the guard and the logbook)"})

    def validate(self) -> None:
        if not self.data:
            raise LlamalabError("pretrain: give the token shard folder (DATA), e.g. from `llamalab data shard`")
        for name in ("steps", "stop_after", "checkpoint_interval", "eval_interval", "log_interval", "seq_len"):
            if getattr(self, name) < 0:
                raise LlamalabError(f"pretrain: {name} must be >= 0, got {getattr(self, name)}")
        self.optim.validate()


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    device, dtype, rank, world = init_device(cfg.device, cfg.dtype)
    data_root = Path(cfg.data)
    model_cfg = build_model_config(cfg.preset, cfg.model_overrides, load_manifest(data_root)["vocab_size"])
    train = TokenDataset.open(data_root, "train", resolve_seq_len(cfg.seq_len, model_cfg), verify=True)
    strategy = resolve_strategy(cfg.parallel, world)
    # ranks reading different data: all of them, except under tensor parallelism (one shared batch)
    dp_world, dp_rank = (1, 0) if strategy == "tp" else (world, rank)
    if strategy == "tp" and dtype == torch.float16:
        raise LlamalabError("dtype fp16 with parallel.strategy=tp is not supported (the loss scaler cannot mix "
                            "sharded and replicated gradients): use bf16 or fp32")
    plan = make_plan(train, model_cfg, dp_world, preset=cfg.preset, global_batch_tokens=cfg.global_batch_tokens,
                     micro_batch_size=cfg.micro_batch_size, steps=cfg.steps, optim=cfg.optim)
    val = TokenDataset.open(data_root, "val", plan.seq_len)
    if train.n_windows < plan.global_seqs:
        raise LlamalabError(f"{data_root}: {train.n_windows} training windows of {plan.seq_len + 1} tokens, fewer than "
                            f"one global batch ({plan.global_seqs}); use more data or a smaller batch")
    run = RunDir(cfg.run_dir)
    tok_path = None
    if is_rank0():
        run.root.mkdir(parents=True, exist_ok=True)
        tok_path = copy_tokenizer(run, train.manifest, data_root=data_root)
        write_json_atomic(run.manifest, train.manifest)

    seed_everything(cfg.seed)
    model, autocast = build_parallel_model(plan.model_cfg, cfg.parallel, device, dtype, cfg.seed, world)
    optim_cfg = cfg.optim
    if dtype == torch.float16 and strategy == "fsdp":  # NOTE: fused AdamW rejects ShardedGradScaler's
        optim_cfg = dataclasses.replace(cfg.optim, fused=False)  # found_inf (shape [1], torch 2.13)
    optimizer = build_optimizer(model, optim_cfg, plan.peak_lr)
    scaler = make_grad_scaler(device, dtype, strategy)
    peak = cfg.peak_flops or measure_matmul_peak(device, torch.float32 if dtype == torch.float32 else dtype)
    fpt = flops_per_token(plan.model_cfg, plan.seq_len)
    per_rank = plan.global_seqs // dp_world

    def batch(b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        windows = train.batch_windows(b, plan.global_seqs, cfg.seed)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return split_micro(*train.get_batch(windows), plan.micro)

    settings = LoopSettings(
        name="pretrain", run_dir=run.root, steps=plan.steps, peak_lr=plan.peak_lr, warmup=plan.warmup,
        min_lr_ratio=cfg.optim.min_lr_ratio, grad_clip=cfg.optim.grad_clip,
        tokens_per_step=plan.global_seqs * plan.seq_len,
        flops_per_token=fpt, peak_flops=peak, checkpoint_interval=cfg.checkpoint_interval, keep_last=cfg.keep_last,
        eval_interval=cfg.eval_interval, stop_after=cfg.stop_after, max_seconds=cfg.max_seconds, resume=cfg.resume,
        restart_if_corrupt=cfg.restart_if_corrupt, final_model=True, tensorboard=cfg.tensorboard,
        fault_nan_steps=tuple(cfg.fault_nan_steps), guard=cfg.guard)
    trainer = Trainer(model, optimizer, settings, batch, run_cfg=to_dict(cfg), tokenizer_path=tok_path,
                      autocast=autocast,
                      eval_fn=lambda m, ac: evaluate_loss(m, val_batches(val, plan.micro, cfg.eval_batches), ac),
                      scaler=scaler)
    trainer.restore()
    n_params = num_params(plan.model_cfg)
    write_meta(run, run_meta(
        to_dict(cfg), plan.model_cfg, shards_record(data_root),
        plan={k: v for k, v in dataclasses.asdict(plan).items() if k != "model_cfg"}, world_size=world,
        strategy=strategy, device=str(device), dtype=str(dtype), peak_flops=peak, flops_per_token=fpt,
        n_params=n_params))
    print0(f"pretrain: {plan.model_cfg.n_layers}L/{plan.model_cfg.dim}d, {n_params:,} params | "
           f"{plan.steps} steps x {plan.global_seqs} seqs x {plan.seq_len} tokens "
           f"(micro {plan.micro} x accum {plan.accum} x data-parallel {dp_world} of world {world}) | "
           f"{train.n_windows:,} train windows "
           f"= {train.epochs_for(plan.steps, plan.global_seqs):.2f} epochs | "
           f"lr {plan.peak_lr:g}, warmup {plan.warmup} | "
           f"{device} {str(dtype).replace('torch.', '')} | {strategy}")
    result = trainer.fit()
    if is_rank0() and cfg.report:
        print0(f"pretrain: report {write_report(run.root)}")
    return result


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
