"""Direct Preference Optimization: ``llamalab dpo --base MODEL --data PAIRS.jsonl [--lora.rank 16]``.

Trains a policy so that its implicit reward ``beta * log(pi / pi_ref)`` ranks each chosen answer above the
rejected one (Rafailov et al. 2023), from an SFT model and preference pairs (:mod:`llamalab.align.data`: pairs
JSON/JSONL or Anthropic HH-RLHF dialogues, rendered with the chat template, loss on the answer tokens only).

Defaults (the alignment-handbook's zephyr-7b-beta DPO recipes; beta from the DPO paper and TRL): beta 0.1, the
sigmoid loss (``--loss ipo`` for IPO, Azar et al. 2023), 1 epoch, 64 pairs per step (the DPO paper), peak lr 5e-7
for full fine-tuning and 5e-6 with LoRA, cosine to 0 after a 10% warmup, no weight decay, AdamW (0.9, 0.999).

The reference is the base model (``--reference`` for another one, e.g. the SFT model when ``--base`` is a later
checkpoint). ``--reference-mode cached`` (default) computes its log-probs of every pair once, before training,
and stores them in the run folder (``dpo_reference.safetensors``; ``--resume`` reads them back); ``live``
computes them in every step (a frozen copy in memory for full fine-tuning; under LoRA the policy with its
adapters switched off, no copy). With LoRA the frozen base is the reference either way.

``--heldout-fraction F`` holds out the prompts whose seeded sha256 falls below F (every pair of a prompt on one
side); the held-out pairs are scored before the first step (logbook ``heldout_before``) and every
``--eval-interval`` steps (``val_accuracy``, ``val_margin``, ``val_logp_accuracy`` ... in metrics.jsonl).

Runs under torchrun like SFT (DDP, or FSDP with ``--parallel.strategy fsdp``); the Trainer gives guards,
checkpoints, ``--resume`` and the logbook. Outputs in ``--run-dir``: ``model/`` (merged, with the chat template
and the base's tokenizer), ``adapter/`` (LoRA), ``preference_data.json`` (the pair ledger), ``dpo_summary.json``,
``metrics.jsonl``, ``logbook.jsonl``, ``checkpoints/``, ``meta.json`` (data sha256, base and reference hashes)
and ``report.html``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llamalab.align.data import FORMATS, encode_pairs, read_preferences, split_by_prompt
from llamalab.align.dpo import (
    REFERENCE_MODES,
    DPOOptimConfig,
    dpo_loss_fn,
    eval_batches,
    finish,
    live_reference,
    load_or_compute_reference,
    make_batch_fn,
    reference_key,
    reference_logprobs,
    stats_at_reference,
)
from llamalab.align.losses import LOSSES
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
from llamalab.model.folder import load
from llamalab.run_dir import RunDir
from llamalab.tokenizer.templates import TEMPLATES
from llamalab.train.distributed import unwrap
from llamalab.train.meta import files_record, run_meta, write_meta
from llamalab.train.step import evaluate_loss
from llamalab.train.trainer import Trainer


@dataclass
class Config(StageConfig):
    base: str = field(default="", metadata={"help": "the policy to start from (an SFT model): a llamalab model or run "
                                                   "folder, a Hugging Face folder or a .gguf file"})
    reference: str = field(default="", metadata={"help": "the reference model (default: the base)"})
    data: list[str] = field(default_factory=list, metadata={"help": "preference file(s), JSON or JSONL (.gz ok)"})
    format: str = field(default="auto", metadata={
        "choices": list(FORMATS),
        "help": "pairs: {prompt|messages, chosen, rejected}; hh: Anthropic HH-RLHF dialogues; auto: by record"})
    template: str = field(default="", metadata={"help": f"chat template ({', '.join(TEMPLATES)}); "
                                                       "default: the base model's, else llama2"})
    run_dir: str = field(default="runs/dpo", metadata={"help": "where the run's record and model/ go"})
    max_len: int = field(default=0, metadata={"help": f"tokens per prompt + answer, longer answers cut (0: "
                                                      f"min(the model's context, {DEFAULT_LENGTH}), TRL's max_length)"})
    beta: float = field(default=0.1, metadata={"help": "strength of the KL penalty to the reference"})
    loss: str = field(default="sigmoid", metadata={"choices": list(LOSSES), "help": "sigmoid (DPO) or ipo"})
    label_smoothing: float = field(default=0.0, metadata={"help": "assumed label noise (conservative DPO)"})
    reference_mode: str = field(default="cached", metadata={
        "choices": list(REFERENCE_MODES), "help": "cached: reference log-probs computed once before training "
                                                  "and stored in the run folder; live: in every step"})
    heldout_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of the prompts for "
                                                                   "held-out accuracy (0: none)"})
    eval_interval: int = field(default=50, metadata={"help": "steps between held-out evaluations"})
    epochs: float = 1.0
    batch_size: int = field(default=64, metadata={"help": "pairs per optimizer step"})
    micro_batch_size: int = field(default=0, metadata={"help": "pairs per forward pass (0: min(batch, 4))"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: epochs * ceil(pairs / batch_size))"})
    optim: DPOOptimConfig = field(default_factory=DPOOptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # --on-error, --limit, --parallel.*, --guard.*, --device ... --resume: StageConfig

    def validate(self) -> None:
        if not self.base:
            raise LlamalabError("dpo: give the policy's starting model, --base MODEL")
        if not self.data:
            raise LlamalabError("dpo: give the preference data, --data FILE")
        if self.template and self.template not in TEMPLATES:
            raise LlamalabError(f"--template: unknown {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.beta <= 0:
            raise LlamalabError(f"dpo: --beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LlamalabError(f"dpo: --label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.batch_size <= 0:
            raise LlamalabError("dpo: --batch-size must be > 0")
        if not 0 <= self.heldout_fraction < 1:
            raise LlamalabError(f"dpo: --heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.epochs <= 0 and not self.steps:
            raise LlamalabError("dpo: --epochs must be > 0 (or give --steps)")
        check_warmup("dpo", self.optim)
        if self.reference and self.lora.rank:
            raise LlamalabError("dpo: with LoRA the frozen base is the reference; leave out --reference")
        self.optim.validate()
        self.lora.validate()


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    b = load_base(cfg.base, cfg.template, cfg.device, cfg.dtype, cfg.max_len, "--max-len", DEFAULT_LENGTH)
    device, dtype, rank, world, autocast = b.device, b.dtype, b.rank, b.world, b.autocast
    model, meta, base, tok, template, max_len = b.model, b.meta, b.path, b.tokenizer, b.template, b.length

    t0 = time.perf_counter()
    pairs, ledger = read_preferences(cfg.data, cfg.format, cfg.limit, cfg.on_error)
    train_p, held_p = split_by_prompt(pairs, cfg.heldout_fraction, cfg.seed)
    train = encode_pairs(train_p, tok, template, max_len, ledger)
    held = encode_pairs(held_p, tok, template, max_len, ledger)
    print0(f"dpo data: {ledger.summary()} | {len(train)} train, {len(held)} held-out pairs "
           f"({time.perf_counter() - t0:.1f}s)")
    print_dropped(ledger.errors)
    run = RunDir(cfg.run_dir)
    if is_rank0():
        run.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.preference_data, {**ledger.to_json(), "train_pairs": len(train),
                                                "heldout_pairs": len(held), "max_len": max_len, "template": template,
                                                "heldout_fraction": cfg.heldout_fraction})
    if not train:
        raise LlamalabError(f"dpo: no usable training pairs in {', '.join(cfg.data)} (see the counts above)")
    g, per_epoch, steps = plan_steps(len(train), cfg.batch_size, cfg.epochs, cfg.steps)
    if g % world:
        raise LlamalabError(f"dpo: --batch-size {g} pairs does not divide by the {world} data-parallel processes")
    micro = cfg.micro_batch_size or min(g // world, 4)
    pad_id = pad_id_of(tok)  # padding carries no loss

    other = load(cfg.reference, device="cpu", dtype=torch.float32) if cfg.reference else None
    if other is not None and other.model.cfg.vocab_size != model.cfg.vocab_size:
        raise LlamalabError(f"--reference {cfg.reference}: vocabulary of {other.model.cfg.vocab_size} tokens, "
                            f"the base has {model.cfg.vocab_size}; the two must share a tokenizer")
    reference = base_record(other.path if other is not None else base)
    ref_train = ref_held = frozen = None
    ref_batch = cfg.micro_batch_size or 4  # fixed batches whatever the world size: the same log-probs
    if cfg.reference_mode == "cached":
        ref_model = (other.model if other is not None else model).to(device)
        lp, hit = load_or_compute_reference(
            run.dpo_reference, reference_key(train + held, reference, template),
            lambda: reference_logprobs(ref_model, train + held, pad_id, ref_batch, device, autocast, rank, world))
        print0(f"dpo: reference log-probs of {len(lp)} pairs {'read from' if hit else 'computed, cached in'} "
               f"{run.dpo_reference}")
        ref_train, ref_held = lp[:len(train)], lp[len(train):]
        del ref_model
    elif other is not None or not cfg.lora.rank:  # live, full fine-tuning: a frozen copy in memory
        frozen = other.model if other is not None else load(cfg.base, device="cpu", dtype=torch.float32).model
        frozen.to(device).eval().requires_grad_(False)
    del other  # (cached: the reference model is no longer needed)

    seed_everything(cfg.seed)
    n_trainable = model.num_params()
    if cfg.lora.rank:
        n_trainable = apply_lora(model, cfg.lora)
    model.to(device)
    net, strategy = parallel_model(model, cfg.parallel, device, dtype, world, "dpo")
    optim, optimizer = stage_optimizer(model, cfg.optim, bool(cfg.lora.rank))
    live = live_reference(net, frozen) if cfg.reference_mode == "live" else None
    loss_fn = dpo_loss_fn(cfg.beta, cfg.loss, cfg.label_smoothing, live)
    settings = loop_settings("dpo", run.root, cfg, optim, steps, cfg.eval_interval if held else 0)
    eval_fn = (lambda m, ac: evaluate_loss(m, eval_batches(held, ref_held, micro, pad_id), ac, loss_fn,
                                           with_stats=True)) if held else None
    trainer = Trainer(net, optimizer, settings, make_batch_fn(train, ref_train, g, per_epoch, micro, pad_id,
                                                              cfg.seed, rank, world),
                      run_cfg=to_dict(cfg), tokenizer_path=tok, autocast=autocast, loss_fn=loss_fn,
                      model_extra={"chat_template": template}, eval_fn=eval_fn)
    trainer.restore()
    cache = {"path": str(run.dpo_reference), "sha256": None}
    if cfg.reference_mode == "cached" and run.dpo_reference.exists():
        from llamalab.common import sha256_file

        cache["sha256"] = sha256_file(run.dpo_reference)
    write_meta(run, run_meta(to_dict(cfg), model.cfg, files_record(cfg.data), kind="dpo", base=base_record(base),
                             reference={**reference, "mode": cfg.reference_mode, "cache": cache},
                             flops_per_token=flops_per_token(model.cfg, max_len), world_size=world, strategy=strategy,
                             device=str(device), dtype=str(dtype), n_params=model.num_params(),
                             trainable_params=n_trainable, template=template))
    if held and trainer.state.step == 0:  # the held-out pairs before training (policy == base)
        # the cached log-probs of the base give them without a forward pass; else evaluate the policy
        before = stats_at_reference(ref_held, cfg.beta, cfg.loss, cfg.label_smoothing) \
            if ref_held is not None and not cfg.reference else eval_fn(unwrap(net), autocast)
        trainer.logbook.log("heldout_before", **before)
        print0("dpo: held-out before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    mode = f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora.rank else "full fine-tuning"
    print0(f"dpo: {base} | {mode}, {n_trainable:,} trainable params | {cfg.loss} loss, beta {cfg.beta} | reference "
           f"{reference['path']} ({cfg.reference_mode}) | template {template} | {len(train)} pairs, {steps} steps x "
           f"{g} pairs (micro {micro} x {world} processes) = {steps / per_epoch:.2f} epochs | lr {optim.lr:g} "
           f"cosine, warmup {settings.warmup} | {device} {str(dtype).replace('torch.', '')}")
    t_fit = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t_fit
    result["heldout_pairs"] = len(held)
    return finish(run, model, lora=cfg.lora, base=base, reference=reference, data=cfg.data, tokenizer=tok,
                  template=template, base_meta=meta, ledger=ledger, result=result, seconds=seconds,
                  settings={"beta": cfg.beta, "loss": cfg.loss, "reference_mode": cfg.reference_mode})


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
