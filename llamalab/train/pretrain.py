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
and every checkpoint (``--keep-last 0`` keeps all).

Resume is exact on CPU: N steps straight equal k steps + stop + ``--resume`` + N-k steps, bit for
bit, because the data order is a pure function of (seed, batch index), and the checkpoint holds the
optimizer moments, RNG states, the guard's window and the data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.common import (LlamalabError, git_sha, is_rank0, measure_matmul_peak, package_versions, print0,
                             seed_everything, sha256_file, write_json_atomic)
from llamalab.config import to_dict
from llamalab.data.shards import MANIFEST, TokenDataset, load_manifest, val_batches
from llamalab.model.config import ModelConfig, flops_per_token, get_preset, num_params
from llamalab.model.transformer import Transformer
from llamalab.train.distributed import ParallelConfig, init_device, parallelize, resolve_strategy
from llamalab.train.loop import evaluate_loss, split_micro
from llamalab.train.optim import OptimConfig, build_optimizer, effective_warmup
from llamalab.train.stability import GuardConfig
from llamalab.train.trainer import LoopSettings, Trainer


@dataclass
class Config:
    data: str = field(default="", metadata={"positional": True, "help": "folder holding manifest.json (token shards)"})
    run_dir: str = field(default="runs/pretrain", metadata={"help": "where the run's record goes"})
    preset: str = field(default="tiny", metadata={"help": "model preset (llamalab info --all)"})
    model: dict = field(default_factory=dict, metadata={"help": 'JSON overrides of the preset, e.g. {"n_layers": 2}'})
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


@dataclass
class Plan:
    """Everything derived from the config before training starts."""

    model_cfg: ModelConfig
    seq_len: int
    global_seqs: int
    micro: int
    accum: int
    steps: int
    warmup: int
    peak_lr: float


def build_model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    preset = get_preset(cfg.preset)
    fields = dataclasses.asdict(preset.model)
    unknown = set(cfg.model) - set(fields)
    if unknown:
        raise LlamalabError(f"model: unknown field(s) {sorted(unknown)}")
    fields.update(cfg.model)
    fields["vocab_size"] = vocab_size
    return ModelConfig(**fields)


def resolve_seq_len(cfg: Config, model_cfg: ModelConfig) -> int:
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise LlamalabError(f"seq_len ({seq_len}) is longer than the model's context model.max_seq_len "
                            f"({model_cfg.max_seq_len})")
    return seq_len


def make_plan(cfg: Config, train: TokenDataset, model_cfg: ModelConfig, world: int) -> Plan:
    seq_len = train.seq_len
    preset = get_preset(cfg.preset)
    tokens = cfg.global_batch_tokens or preset.batch_tokens
    global_seqs = max(1, tokens // seq_len)
    micro = cfg.micro_batch_size
    if micro == 0:
        per_rank = max(1, global_seqs // world)
        micro = max(d for d in range(1, min(16, per_rank) + 1) if per_rank % d == 0)
    if global_seqs % (world * micro) != 0:
        raise LlamalabError(f"global batch of {global_seqs} sequences ({tokens} tokens / seq_len {seq_len}) does not "
                            f"divide by world size {world} x micro_batch_size {micro}")
    steps = cfg.steps or max(1, train.n_windows // global_seqs)
    return Plan(model_cfg, seq_len, global_seqs, micro, global_seqs // (world * micro), steps,
                effective_warmup(cfg.optim.warmup_steps, steps), cfg.optim.lr or preset.peak_lr)


def autocast_for(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_parallel_model(model_cfg: ModelConfig, pcfg: ParallelConfig, device: torch.device, dtype: torch.dtype,
                         seed: int, world: int) -> tuple[torch.nn.Module, Any]:
    """The model, initialised with ``seed`` and wrapped for ``pcfg``; and the autocast to train it under.

    FSDP builds on the meta device, shards, then draws each rank's slices (same weights as an
    unsharded init); on GPU its mixed-precision policy replaces autocast (bf16/fp16 all-gathers,
    fp32 gradient reduction). DDP and single-process runs build the full model and use autocast.
    """
    strategy = resolve_strategy(pcfg, world)
    if strategy == "fsdp":
        from llamalab.train.fsdp import init_sharded_weights

        with torch.device("meta"):
            model = Transformer(model_cfg)
        mp = device.type == "cuda" and dtype != torch.float32
        model = parallelize(model, pcfg, device, param_dtype=dtype if mp else None)
        init_sharded_weights(model, device, seed)
        return model, (contextlib.nullcontext if mp else autocast_for(device, dtype))
    model = Transformer(model_cfg)
    model.init_weights(seed=seed)
    model.to(device)
    return parallelize(model, pcfg, device), autocast_for(device, dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype, strategy: str) -> torch.amp.GradScaler | None:
    """fp16 only: dynamic loss scaling (OPT); sharded runs agree on overflows across ranks."""
    if dtype != torch.float16:
        return None
    if strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def write_meta(run: Path, cfg: Config, plan: Plan, data_root: Path, extra: dict[str, Any]) -> dict:
    meta = {
        "config": to_dict(cfg), "model": dataclasses.asdict(plan.model_cfg),
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "model_cfg"},
        "git_sha": git_sha(), "versions": package_versions(),
        "data": {"path": str(data_root.resolve()), "manifest_sha256": sha256_file(data_root / MANIFEST)},
        **extra,
    }
    if is_rank0():
        old = run / "meta.json"
        history = []
        if old.exists():
            prev = json.loads(old.read_text())
            kept = ("config", "plan", "git_sha", "world_size", "strategy")  # a resize shows in the history
            history = prev.get("history", []) + [{k: prev[k] for k in kept if k in prev}]
        write_json_atomic(old, {**meta, "history": history})
    return meta


def copy_tokenizer(run: Path, manifest: dict) -> Path | None:
    src = Path(manifest["tokenizer"]["path"])
    dst = run / "tokenizer" / "tokenizer.model"
    if dst.exists():
        return dst
    if not src.exists():
        print0(f"pretrain: tokenizer {src} named by the manifest is not found; checkpoints will not carry it")
        return None
    if sha256_file(src) != manifest["tokenizer"]["sha256"]:
        raise LlamalabError(f"{src}: tokenizer differs from the one the shards were made with (sha256)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    device, dtype, rank, world = init_device(cfg.device, cfg.dtype)
    data_root = Path(cfg.data)
    model_cfg = build_model_config(cfg, load_manifest(data_root)["vocab_size"])
    train = TokenDataset.open(data_root, "train", resolve_seq_len(cfg, model_cfg), verify=True)
    strategy = resolve_strategy(cfg.parallel, world)
    # ranks reading different data: all of them, except under tensor parallelism (one shared batch)
    dp_world, dp_rank = (1, 0) if strategy == "tp" else (world, rank)
    if strategy == "tp" and dtype == torch.float16:
        raise LlamalabError("dtype fp16 with parallel.strategy=tp is not supported (the loss scaler cannot mix "
                            "sharded and replicated gradients): use bf16 or fp32")
    plan = make_plan(cfg, train, model_cfg, dp_world)
    val = TokenDataset.open(data_root, "val", plan.seq_len)
    if train.n_windows < plan.global_seqs:
        raise LlamalabError(f"{data_root}: {train.n_windows} training windows of {plan.seq_len + 1} tokens, fewer than "
                            f"one global batch ({plan.global_seqs}); use more data or a smaller batch")
    run = Path(cfg.run_dir)
    if is_rank0():
        run.mkdir(parents=True, exist_ok=True)
    tok_path = copy_tokenizer(run, train.manifest) if is_rank0() else None
    if is_rank0():
        write_json_atomic(run / "data" / MANIFEST, train.manifest)

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
        name="pretrain", run_dir=run, steps=plan.steps, peak_lr=plan.peak_lr, warmup=plan.warmup,
        min_lr_ratio=cfg.optim.min_lr_ratio, grad_clip=cfg.optim.grad_clip, tokens_per_step=plan.global_seqs * plan.seq_len,
        flops_per_token=fpt, peak_flops=peak, checkpoint_interval=cfg.checkpoint_interval, keep_last=cfg.keep_last,
        eval_interval=cfg.eval_interval, stop_after=cfg.stop_after, max_seconds=cfg.max_seconds, resume=cfg.resume,
        tensorboard=cfg.tensorboard, fault_nan_steps=tuple(cfg.fault_nan_steps), guard=cfg.guard)
    trainer = Trainer(model, optimizer, settings, batch, run_cfg=to_dict(cfg), tokenizer_path=tok_path,
                      autocast=autocast,
                      eval_fn=lambda m, ac: evaluate_loss(m, val_batches(val, plan.micro, cfg.eval_batches), ac),
                      scaler=scaler)
    trainer.restore()
    n_params = num_params(plan.model_cfg)
    write_meta(run, cfg, plan, data_root, {"world_size": world, "strategy": strategy, "device": str(device),
                                           "dtype": str(dtype), "peak_flops": peak, "flops_per_token": fpt,
                                           "n_params": n_params})
    print0(f"pretrain: {plan.model_cfg.n_layers}L/{plan.model_cfg.dim}d, {n_params:,} params | "
           f"{plan.steps} steps x {plan.global_seqs} seqs x {plan.seq_len} tokens "
           f"(micro {plan.micro} x accum {plan.accum} x data-parallel {dp_world} of world {world}) | "
           f"{train.n_windows:,} train windows "
           f"= {train.epochs_for(plan.steps, plan.global_seqs):.2f} epochs | lr {plan.peak_lr:g}, warmup {plan.warmup} | "
           f"{device} {str(dtype).replace('torch.', '')} | {strategy}")
    result = trainer.fit()
    if is_rank0() and cfg.report:
        from llamalab.report.html import write_report

        print0(f"pretrain: report {write_report(run)}")
    return result

if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
