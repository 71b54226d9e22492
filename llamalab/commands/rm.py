"""Train a reward model: ``llamalab rm --base MODEL --data PAIRS [--format hh|pairs|auto] --run-dir DIR``.

Recipe (Llama 2, Touvron et al. 2023b, section 3.2.2): the reward model starts from a model folder (Llama 2
starts from the chat model's checkpoint) with its LM head replaced by a scalar head on the last token; binary
ranking loss with margin ``-log sigmoid(r_chosen - r_rejected - m)`` (``m`` from a pair's ``margin`` or rating
label, else 0); one epoch; AdamW, peak lr 1e-5 (Llama 2 used 5e-6 for 70B), cosine to 10% of the peak, warmup 3%
of the steps; batch 512 pairs (1024 rows). ``--lora.rank 8`` trains adapters and the head only (default peak lr
2e-4). Pairs are split into train and held-out by a seeded hash of the prompt (``--heldout-fraction``), so no
prompt is on both sides.

The run goes through :class:`~llamalab.train.trainer.Trainer` (guards, metrics.jsonl, logbook, checkpoints,
``--resume``): every step logs loss, ``accuracy`` (chosen scored above rejected) and ``margin`` (mean
r_chosen - r_rejected); every ``--eval-interval`` steps and at the end the held-out ones as ``val_loss``,
``val_accuracy``, ``val_margin``.

Outputs in ``--run-dir``:
  ``model/``               the reward model folder (``kind: reward``, LoRA merged, tokenizer, chat template):
                           ``llamalab rm score``, ``llamalab rejection-sample``, ``llamalab ppo`` read it;
                           ``llamalab convert model/ OUT`` writes a HF ``LlamaForSequenceClassification``
  ``adapter/``             with LoRA, the adapter alone
  ``preference_data.json`` the pair ledger (read, kept, dropped by reason with file:line, split)
  ``rm_summary.json``      steps, held-out accuracy and margin before and after training
  ``meta.json`` (base and data sha256), ``metrics.jsonl``, ``logbook.jsonl``, ``checkpoints/``, ``report.html``
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llamalab.align.data import FORMATS, encode_pairs, read_preferences, split_by_prompt
from llamalab.align.reward import (
    HeldoutEval,
    RMOptimConfig,
    finish_rm,
    gather_reward_model,
    pair_batch_fn,
    ranking_loss,
    reward_model_from,
)
from llamalab.common import LlamalabError, is_rank0, print0, seed_everything, write_json_atomic
from llamalab.config import to_dict
from llamalab.finetune.lora import LoRAConfig, apply_lora
from llamalab.finetune.outputs import base_record
from llamalab.finetune.packing import pad_id_of, plan_steps
from llamalab.finetune.stage import (
    DEFAULT_LENGTH,
    StageConfig,
    check_warmup,
    load_base,
    loop_settings,
    parallel_model,
    print_dropped,
    stage_optimizer,
)
from llamalab.model.config import flops_per_token
from llamalab.run_dir import RunDir
from llamalab.tokenizer.templates import TEMPLATES
from llamalab.train.distributed import ParallelConfig
from llamalab.train.fsdp import is_sharded
from llamalab.train.meta import files_record, run_meta, write_meta
from llamalab.train.trainer import Trainer


@dataclass
class Config(StageConfig):
    base: str = field(default="", metadata={"help": "the model to start from (Llama 2: the chat model): a llamalab "
                                                   "model or run folder, a Hugging Face folder or a .gguf file"})
    data: list[str] = field(default_factory=list, metadata={"help": "preference file(s), JSON or JSONL (.gz ok)"})
    format: str = field(default="auto", metadata={"choices": list(FORMATS), "help": "pairs: prompt/chosen/rejected; "
                                                  "hh: Anthropic HH-RLHF dialogues; auto: per record"})
    template: str = field(default="", metadata={"help": f"chat template ({', '.join(TEMPLATES)}); default: the "
                                                       "base model's, else llama2"})
    run_dir: str = field(default="runs/rm", metadata={"help": "where the run's record and model/ go"})
    max_len: int = field(default=0, metadata={"help": f"tokens per prompt + answer (0: min(the model's "
                                                      f"context, {DEFAULT_LENGTH})); longer answers are cut"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "prompts held out for accuracy (seeded hash)"})
    eval_interval: int = field(default=50, metadata={"help": "steps between held-out evaluations (and at the end)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs (Llama 2: 1)"})
    batch_size: int = field(default=512, metadata={"help": "pairs per optimizer step (Llama 2: 512)"})
    micro_batch_size: int = field(default=0, metadata={"help": "pairs per forward pass (0: min(batch_size, 4))"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: epochs * ceil(pairs / batch_size))"})
    optim: RMOptimConfig = field(default_factory=RMOptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={
        "help": "under torchrun: strategy ddp (auto) or fsdp; activation checkpointing; compile"})
    # --on-error, --limit, --guard.*, --device ... --resume: StageConfig

    def validate(self) -> None:
        if not self.base:
            raise LlamalabError("rm: give the model to start from, --base MODEL")
        if not self.data:
            raise LlamalabError("rm: give the preference data, --data FILE (pairs or HH-RLHF JSON/JSONL)")
        if self.template and self.template not in TEMPLATES:
            raise LlamalabError(f"--template: unknown {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.batch_size <= 0 or self.micro_batch_size < 0:
            raise LlamalabError("rm: --batch-size must be > 0 and --micro-batch-size >= 0")
        if not 0 <= self.heldout_fraction < 1:
            raise LlamalabError(f"rm: --heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.epochs <= 0 and not self.steps:
            raise LlamalabError("rm: --epochs must be > 0 (or give --steps)")
        if self.max_len < 0:
            raise LlamalabError(f"rm: --max-len must be >= 0, got {self.max_len}")
        check_warmup("rm", self.optim)
        self.optim.validate()
        self.lora.validate()


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    b = load_base(cfg.base, cfg.template, cfg.device, cfg.dtype, cfg.max_len, "--max-len", DEFAULT_LENGTH)
    device, dtype, rank, world = b.device, b.dtype, b.rank, b.world
    base, tok, template, max_len = b.path, b.tokenizer, b.template, b.length

    t0 = time.perf_counter()
    pairs, ledger = read_preferences(cfg.data, cfg.format, cfg.limit, cfg.on_error)
    train_pairs, held_pairs = split_by_prompt(pairs, cfg.heldout_fraction, cfg.seed)
    train = encode_pairs(train_pairs, tok, template, max_len, ledger)
    held = encode_pairs(held_pairs, tok, template, max_len, ledger)
    split = {"train": len(train), "heldout": len(held), "heldout_fraction": cfg.heldout_fraction, "seed": cfg.seed}
    print0(f"rm data: {ledger.summary()} | {len(train)} train, {len(held)} held-out pairs "
           f"({time.perf_counter() - t0:.1f}s)")
    print_dropped(ledger.errors)
    if not train:
        raise LlamalabError(f"rm: no usable training pairs in {', '.join(cfg.data)} (see the counts above)")
    g, per_epoch, steps = plan_steps(len(train), cfg.batch_size, cfg.epochs, cfg.steps)
    if g < world:
        raise LlamalabError(f"rm: --batch-size {g} pairs is fewer than the {world} data-parallel processes")
    micro = cfg.micro_batch_size or min(-(-g // world), 4)
    run = RunDir(cfg.run_dir)
    if is_rank0():
        run.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.preference_data, {**ledger.to_json(), "split": split, "max_len": max_len,
                                                "template": template})

    seed_everything(cfg.seed)
    rm = reward_model_from(b.model)
    b.model = None  # the reward model took its weights
    n_trainable = rm.num_params()
    if cfg.lora.rank:
        apply_lora(rm, cfg.lora)
        rm.score.weight.requires_grad_(True)  # the head always trains
        n_trainable = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    rm.to(device)
    autocast = b.autocast
    pad_id = pad_id_of(tok)
    evaluate = HeldoutEval(held, micro, pad_id)
    if held:
        evaluate(rm, autocast)
    heldout: dict[str, Any] = {"before": evaluate.last}
    evaluate.last = None
    net, strategy = parallel_model(rm, cfg.parallel, device, dtype, world, "rm")  # fsdp: the root holds the head
    optim, optimizer = stage_optimizer(rm, cfg.optim, bool(cfg.lora.rank))
    settings = loop_settings("rm", run.root, cfg, optim, steps, cfg.eval_interval if held else 0)
    batches = pair_batch_fn(train, g, per_epoch, micro, pad_id, cfg.seed, rank, world)
    trainer = Trainer(net, optimizer, settings, batches, run_cfg=to_dict(cfg), tokenizer_path=tok, autocast=autocast,
                      loss_fn=ranking_loss,
                      model_extra={"kind": "reward", "chat_template": template},
                      eval_fn=evaluate if held else None)
    trainer.restore()
    write_meta(run, run_meta(to_dict(cfg), rm.cfg, files_record(cfg.data), kind="reward_model",
                             base=base_record(base), flops_per_token=flops_per_token(rm.cfg, max_len),
                             world_size=world, strategy=strategy, device=str(device), dtype=str(dtype),
                             n_params=rm.num_params(), trainable_params=n_trainable, template=template, split=split))
    mode = f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)} + head" if cfg.lora.rank else "full fine-tuning"
    print0(f"rm: {base} | {mode}, {n_trainable:,} trainable params | template {template} | {len(train)} pairs of "
           f"<= {max_len} tokens | {steps} steps x {g} pairs (micro {micro} x {world} processes) = "
           f"{steps / per_epoch:.2f} epochs | lr {optim.lr:g} cosine to {optim.min_lr_ratio:g}, warmup "
           f"{settings.warmup} | {device} {str(dtype).replace('torch.', '')}")
    t_fit = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t_fit
    done = result["steps"] >= result["planned_steps"]
    if held and done and evaluate.last is None:  # resumed at the end: the loop ran no evaluation
        evaluate(rm, autocast)  # every rank (FSDP: a collective; each rank scores every held-out pair)
    heldout["after"] = evaluate.last if held and done else None
    if done and is_sharded(rm):
        rm = gather_reward_model(rm, cfg.lora)  # a collective: rank 0 gets the full weights
    if not is_rank0():
        return result
    return finish_rm(run, rm, lora=cfg.lora, base=base, data=cfg.data, fmt=cfg.format, tokenizer=tok,
                     template=template, ledger=ledger, split=split, heldout=heldout, result=result, seconds=seconds)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
