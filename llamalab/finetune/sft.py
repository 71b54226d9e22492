"""Supervised fine-tuning (SFT): ``llamalab sft --base MODEL --data FILE --format alpaca|sharegpt``.

Recipe (Llama 2, Touvron et al. 2023b, section 3.1): AdamW, cosine schedule, peak lr 2e-5, weight
decay 0.1, batch 64 sequences, 2 epochs, loss on assistant tokens only, examples packed into
full-length rows. Warmup is 3% of the steps (Alpaca / TRL; the paper states none). With LoRA
(``--lora.rank 8``) the default peak lr is 2e-4 instead, as for alpaca-lora / QLoRA: adapters
start at zero and need a larger step.

The run goes through :class:`~llamalab.train.trainer.Trainer`, the loop pretraining uses (guards,
metrics.jsonl, logbook, atomic checkpoints, ``--resume``); only the batches (packed rows, see
:mod:`llamalab.finetune.packing`) and the loss function differ. Steps are derived from the data:
``epochs * ceil(rows / batch_size)``.

Outputs in ``--run-dir``:
  ``model/``        a llamalab model folder (LoRA merged) with ``chat_template`` recorded: the engine,
                    ``llamalab generate|chat|serve`` and the HF/GGUF exporters read it
  ``adapter/``      with LoRA, the adapter alone (``adapter_model.safetensors`` + config)
  ``sft_data.json`` the data ledger (records read, kept, dropped by reason, fixes, tokens)
  ``metrics.jsonl``, ``logbook.jsonl``, ``checkpoints/``  as for pretraining
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint import load_model, save_model
from llamalab.common import (
    LlamalabError,
    git_sha,
    package_versions,
    is_rank0,
    print0,
    seed_everything,
    sha256_file,
    write_json_atomic,
)
from llamalab.config import to_dict
from llamalab.finetune.data import FORMATS, OVERLONG, Example, load_sft_data
from llamalab.finetune.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from llamalab.finetune.packing import collate, pack_rows, sft_loss
from llamalab.tokenizer.chat import TEMPLATES, resolve_template
from llamalab.train.distributed import ParallelConfig, init_device, parallelize, resolve_strategy
from llamalab.train.fsdp import is_sharded
from llamalab.train.loop import IGNORE_INDEX
from llamalab.train.optim import OptimConfig, build_optimizer
from llamalab.train.pretrain import autocast_for
from llamalab.train.stability import GuardConfig
from llamalab.train.trainer import LoopSettings, Trainer

FULL_LR, LORA_LR = 2e-5, 2e-4


@dataclass
class Config:
    base: str = field(default="", metadata={"help": "base model folder (llamalab format)"})
    data: list[str] = field(default_factory=list, metadata={"help": "data file(s), JSON or JSONL (.gz ok), comma-separated"})
    format: str = field(default="sharegpt", metadata={"choices": list(FORMATS),
                                                       "help": "alpaca: instruction/input/output; sharegpt: conversations"})
    template: str = field(default="", metadata={"help": f"chat template ({', '.join(TEMPLATES)}); "
                                                       "default: the base model's, else llama2"})
    run_dir: str = field(default="runs/sft", metadata={"help": "where the run's record and model/ go"})
    seq_len: int = field(default=0, metadata={"help": "row length in tokens (0: the model's context)"})
    packing: bool = field(default=True, metadata={"help": "pack examples into full rows (attention kept per example)"})
    overlong: str = field(default="split", metadata={"choices": list(OVERLONG),
                                                     "help": "examples longer than seq_len: split at turns, truncate, drop"})
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"],
                                                     "help": "malformed records: stop with file:line, or count and skip"})
    limit: int = field(default=0, metadata={"help": "read at most N records (0: all)"})
    val_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of examples for a "
                                                               "validation loss (0: none)"})
    eval_interval: int = field(default=50, metadata={"help": "steps between validation losses (with --val-fraction)"})
    epochs: float = 2.0
    batch_size: int = field(default=64, metadata={"help": "rows per optimizer step (Llama 2: 64)"})
    micro_batch_size: int = field(default=0, metadata={"help": "rows per forward pass (0: min(batch_size, 8))"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: epochs * ceil(rows / batch_size))"})
    warmup_ratio: float = 0.03
    lr: float = field(default=0.0, metadata={"help": f"peak learning rate (0: {FULL_LR:g}, or {LORA_LR:g} with LoRA)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of the peak"})
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
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

    def validate(self) -> None:
        if not self.base:
            raise LlamalabError("sft: give the base model folder, --base CHECKPOINT")
        if not self.data:
            raise LlamalabError("sft: give the data, --data FILE (Alpaca or ShareGPT JSON/JSONL)")
        if self.template and self.template not in TEMPLATES:
            raise LlamalabError(f"--template: unknown {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        for name in ("batch_size",):
            if getattr(self, name) <= 0:
                raise LlamalabError(f"sft: --{name.replace('_', '-')} must be > 0")
        if not 0 <= self.val_fraction < 1:
            raise LlamalabError(f"sft: --val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs <= 0 and not self.steps:
            raise LlamalabError("sft: --epochs must be > 0 (or give --steps)")
        self.lora.validate()


def plan_steps(cfg: Config, n_rows: int) -> tuple[int, int, int]:
    """(batch rows, steps per epoch, total steps)."""
    g = min(cfg.batch_size, n_rows)
    per_epoch = math.ceil(n_rows / g)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return g, per_epoch, steps


def make_batch_fn(examples: list[Example], rows: list[list[int]], g: int, per_epoch: int, micro: int,
                  pad_id: int, seed: int, rank: int = 0, world: int = 1):
    """``batch(b)``: this rank's share of global batch b = rows of epoch b // per_epoch in that
    epoch's shuffled order (a pure function of b and independent of the world size, so resume,
    rollback and a resize replay exactly). Ranks take contiguous slices of the global rows.

    NOTE: an epoch's last batch can hold fewer rows than ranks; a rank left without rows gets one
    all-padding row with no targets, so every rank still runs backward (DDP would hang otherwise)
    and the loss and gradients are unchanged.
    """

    def batch(b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        epoch, j = divmod(b, per_epoch)
        order = list(range(len(rows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        picked = [rows[i] for i in order[j * g:(j + 1) * g]]
        share = -(-len(picked) // world)
        mine = picked[rank * share:(rank + 1) * share]
        if not mine:
            x, y = collate(examples, picked[:1], pad_id)
            x[:, 0], x[:, 1], y[:] = pad_id, 0, IGNORE_INDEX  # padding tokens, no segment, no targets
            return [(x, y)]
        return [collate(examples, mine[k:k + micro], pad_id) for k in range(0, len(mine), micro)]

    return batch


def split_val(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded random ``fraction`` of the *records* held out (at least one), so the
    chunks of one split conversation never straddle train and val."""
    if not fraction:
        return examples, []
    records = sorted({e.record for e in examples})
    random.Random(seed + 1).shuffle(records)
    k = max(1, round(fraction * len(records)))
    if k >= len(records):
        raise LlamalabError(f"sft: --val-fraction {fraction} leaves no training records")
    held = set(records[:k])
    return [e for e in examples if e.record not in held], [e for e in examples if e.record in held]


def make_eval_fn(val: list[Example], seq_len: int, packing: bool, micro: int, pad_id: int):
    """Mean loss per assistant token over the held-out examples (packed like training)."""
    rows = pack_rows(val, seq_len, packing, seed=0)

    @torch.no_grad()
    def eval_fn(model: torch.nn.Module, autocast) -> float | None:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        total, n = 0.0, 0
        for k in range(0, len(rows), micro):
            x, y = collate(val, rows[k:k + micro], pad_id)
            with autocast():
                total += float(sft_loss(model, x.to(dev), y.to(dev)))
            n += int((y != IGNORE_INDEX).sum())
        model.train(was)
        return total / n if n else None

    return eval_fn


def loss_curve(run: Path) -> dict[str, Any]:
    path = run / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    losses = [r["loss"] for r in rows]
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"first": losses[0], "last": losses[-1], "first_10pct_mean": sum(losses[:k]) / k,
            "last_10pct_mean": sum(losses[-k:]) / k, "steps": len(losses)}


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    device, dtype, rank, world = init_device(cfg.device, cfg.dtype)
    base = Path(cfg.base)
    model, meta = load_model(base)
    tok_path = base / "tokenizer.model"
    if not tok_path.exists():
        raise LlamalabError(f"{base}: no tokenizer.model (SFT needs the SentencePiece tokenizer of the base)")
    from llamalab.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    template = resolve_template(meta, cfg.template or None)
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise LlamalabError(f"--seq-len {seq_len} exceeds the model's context ({model.cfg.max_seq_len})")

    t0 = time.perf_counter()
    examples, ledger = load_sft_data(cfg.data, cfg.format, template, tok, seq_len, cfg.overlong, cfg.on_error,
                                     limit=cfg.limit)
    print0(f"sft data: {ledger.summary()} ({time.perf_counter() - t0:.1f}s)")
    for e in ledger.errors[:5]:
        print0(f"  dropped {e}")
    if not examples:
        raise LlamalabError(f"sft: no usable examples in {', '.join(cfg.data)} (see the counts above)")
    examples, val = split_val(examples, cfg.val_fraction, cfg.seed)
    rows = pack_rows(examples, seq_len, cfg.packing, cfg.seed)
    fill = sum(len(e) for e in examples) / (len(rows) * seq_len)
    g, per_epoch, steps = plan_steps(cfg, len(rows))
    if g % world:
        raise LlamalabError(f"sft: --batch-size {g} rows does not divide by the {world} data-parallel processes")
    micro = cfg.micro_batch_size or min(g // world, 8)
    run = Path(cfg.run_dir)
    if is_rank0():
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / "sft_data.json", {**ledger.to_json(), "rows": len(rows), "seq_len": seq_len,
                                                  "packing": cfg.packing, "fill": fill, "template": template})

    seed_everything(cfg.seed)
    n_trainable = model.num_params()
    if cfg.lora.rank:
        n_trainable = apply_lora(model, cfg.lora)
    model.to(device)
    # under torchrun: DDP (auto) or FSDP2 (LoRA's frozen base weights get no gradients to reduce);
    # NOTE: the SFT loss needs the logits of packed rows, so the fused pretraining head stays off
    pcfg = dataclasses.replace(cfg.parallel, fused_loss=False)
    if resolve_strategy(pcfg, world) == "tp":
        raise LlamalabError("sft: parallel.strategy tp is not supported; use ddp or fsdp")
    net = parallelize(model, pcfg, device, param_dtype=dtype if dtype != torch.float32 else None)
    lr = cfg.lr or (LORA_LR if cfg.lora.rank else FULL_LR)
    optim = OptimConfig(lr=lr, min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    optimizer = build_optimizer(model, optim, lr)
    pad_id = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    settings = LoopSettings(
        name="sft", run_dir=run, steps=steps, peak_lr=lr, warmup=max(1, round(cfg.warmup_ratio * steps)),
        min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, checkpoint_interval=cfg.checkpoint_interval,
        keep_last=cfg.keep_last, eval_interval=cfg.eval_interval if val else 0, stop_after=cfg.stop_after,
        max_seconds=cfg.max_seconds, resume=cfg.resume, guard=cfg.guard)
    trainer = Trainer(net, optimizer, settings,
                      make_batch_fn(examples, rows, g, per_epoch, micro, pad_id, cfg.seed, rank, world),
                      run_cfg=to_dict(cfg), tokenizer_path=tok_path, autocast=autocast_for(device, dtype),
                      loss_fn=sft_loss, model_extra={"chat_template": template},
                      eval_fn=make_eval_fn(val, seq_len, cfg.packing, micro, pad_id) if val else None)
    trainer.restore()
    write_sft_meta(run, cfg, model, base, seq_len, {"world_size": world, "strategy": resolve_strategy(pcfg, world),
                                                    "device": str(device), "dtype": str(dtype),
                                                    "n_params": model.num_params(), "trainable_params": n_trainable,
                                                    "template": template})
    mode = f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora.rank else "full fine-tuning"
    print0(f"sft: {base} | {mode}, {n_trainable:,} trainable params | template {template} | {len(rows)} rows of "
           f"<= {seq_len} tokens ({fill:.0%} filled, {'packed' if cfg.packing else 'unpacked'}) | {steps} steps x "
           f"{g} rows (micro {micro} x {world} processes) = {steps / per_epoch:.2f} epochs | lr {lr:g} cosine, wd {cfg.weight_decay} | "
           f"{device} {str(dtype).replace('torch.', '')}")
    t_fit = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t_fit
    # NOTE: the loop's tokens/s counts target (assistant) tokens; this one counts every input token
    train_tokens = sum(len(e) for e in examples)
    result["input_tokens_per_s"] = train_tokens * result["steps"] / per_epoch / seconds if seconds else None
    result["val_examples"] = len(val)
    return finish(cfg, run, model, meta, tok_path, template, ledger, result, seconds, base)


def _gather_plain(model: torch.nn.Module, cfg: Config) -> torch.nn.Module | None:
    """The FSDP-trained weights as an unsharded CPU model on rank 0 (None elsewhere), LoRA kept
    unmerged so that finish() can save the adapter and then merge."""
    from llamalab.model.transformer import Transformer
    from llamalab.train.checkpoint import full_model_state

    full = full_model_state(model)
    if not is_rank0():
        return None
    plain = Transformer(model.cfg)
    if cfg.lora.rank:
        apply_lora(plain, cfg.lora)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if k != "output.weight"]:
        raise LlamalabError(f"sft: gathered weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return plain


def write_sft_meta(run: Path, cfg: Config, model: torch.nn.Module, base: Path, seq_len: int,
                   extra: dict[str, Any]) -> None:
    """meta.json (rank 0): resolved config, model shape, base weights and data files by sha256, git
    SHA, package versions; an earlier invocation's config is kept in ``history`` (resume)."""
    if not is_rank0():
        return

    from llamalab.model.config import flops_per_token

    meta = {"kind": "sft", "config": to_dict(cfg), "model": dataclasses.asdict(model.cfg),
            "base": {"path": str(base.resolve()), "weights_sha256": sha256_file(base / "model.safetensors")},
            "data": {"files": [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for p in cfg.data]},
            "git_sha": git_sha(), "versions": package_versions(),
            "flops_per_token": flops_per_token(model.cfg, seq_len), **extra}
    path = run / "meta.json"
    history = []
    if path.exists():
        prev = json.loads(path.read_text())
        history = prev.get("history", []) + [{k: prev[k] for k in ("config", "git_sha", "world_size") if k in prev}]
    write_json_atomic(path, {**meta, "history": history})


def finish(cfg: Config, run: Path, model: torch.nn.Module, meta: dict, tok_path: Path, template: str, ledger,
           result: dict[str, Any], seconds: float, base: Path) -> dict[str, Any]:
    """Write model/ (merged) and adapter/, print the end summary."""
    curve = loss_curve(run)
    summary = {**result, "data": ledger.to_json(), "loss_curve": curve, "template": template}
    if result["steps"] < result["planned_steps"]:
        print0(f"sft: stopped at step {result['steps']}/{result['planned_steps']}; continue with --resume "
               f"(no model/ written yet)")
        return summary
    if is_sharded(model):  # a collective: every rank sends its shards, rank 0 rebuilds a plain model
        model = _gather_plain(model, cfg)
    if not is_rank0():  # every rank trained the same weights; rank 0 writes them
        return summary
    base_info = {"path": str(base.resolve()), "weights_sha256": sha256_file(base / "model.safetensors")}
    if cfg.lora.rank:
        summary["adapter"] = str(save_adapter(run / "adapter", model, cfg.lora, base_info))
        merge_lora(model)
    extra = {"chat_template": template, "sft": {"base": base_info, "data": [str(p) for p in cfg.data],
                                                "format": cfg.format, "lora": to_dict(cfg.lora) if cfg.lora.rank else None,
                                                "steps": result["steps"], "loss_curve": curve},
             **{k: meta[k] for k in ("tokenizer",) if k in meta}}
    summary["model"] = str(save_model(run / "model", model.cpu().float(), tok_path, extra))
    write_json_atomic(run / "sft_summary.json", summary)
    from llamalab.report.html import write_report

    summary["report"] = str(write_report(run))
    lc = (f"loss {curve['first']:.3f} -> {curve['last']:.3f} (mean of first/last 10% of steps "
          f"{curve['first_10pct_mean']:.3f} -> {curve['last_10pct_mean']:.3f})") if curve else "no steps run"
    print0(f"sft: done | {ledger.read} records, {ledger.kept} kept, {sum(ledger.dropped.values())} dropped "
           f"{dict(ledger.dropped) or ''} | {ledger.loss_tokens:,} assistant tokens of {ledger.tokens:,} | {lc} | "
           f"{result['steps']} steps in {seconds:.1f}s (~{result['input_tokens_per_s'] or 0:,.0f} input tokens/s, "
           f"{result['tokens_per_s'] or 0:,.0f} trained tokens/s)"
           + (f" | val loss {result['val_loss']:.3f} on {result['val_examples']} examples" if result.get("val_loss") else "")
           + f" | model {summary['model']}"
           + (f" | adapter {summary['adapter']}" if "adapter" in summary else "")
           + f" | report {summary['report']}")
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
