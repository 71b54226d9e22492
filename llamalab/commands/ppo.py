"""PPO, Llama 2's RLHF step: ``llamalab ppo --policy SFT_MODEL --reward-model RM --data PREFS.jsonl``.

Recipe (Llama 2, Touvron et al. 2023b, section 3.2.3): reward = the reward model's score, whitened, minus
``beta * (log pi - log pi_ref)`` per token (beta 0.01); GAE (gamma 1, lambda 0.95); clipped surrogate (0.2);
512 prompts per iteration, minibatches of 64, one pass (``--ppo.*`` flags); AdamW (0.9, 0.95), eps 1e-5, weight
decay 0.1, gradient clipping 1.0, a constant learning rate of 1e-6 (``--optim.*``). A value model (a copy of
the policy with a scalar head) learns the returns. Full fine-tuning, or LoRA (``--lora.rank 8``: the policy with
its adapters off is the reference). The library pieces, and why each is so, are in :mod:`llamalab.align.ppo`.

Prompts come from preference data (``--format pairs|hh``: their distinct prompts) or prompt records (``{"prompt":
str | messages}``, ``{"messages": [...]}``), read as rejection sampling reads them; repeated and too long ones are
counted. The reward: one or more reward model folders
(``--reward-model``, written by ``llamalab rm``; several are summed with ``--reward-weights`` or combined by
Llama 2's safety gate, ``--reward-combine llama2``) and/or scripted rewards (``--reward-fn module:function``,
``function(prompts, answers) -> floats``).

Every PPO update is one step of the one Trainer, so the run has its record, guards, checkpoints and ``--resume``;
``--iterations``, ``--checkpoint-interval`` and ``--stop-after`` count iterations (each ``ppo.epochs *
ppo.rollout_batch / ppo.minibatch`` steps) so checkpoints fall between iterations and a resumed run equals a
straight one.

Outputs in ``--run-dir``: ``model/`` (the policy, LoRA merged, chat template and tokenizer: the engine, ``generate``,
``chat``, ``serve`` and the exporters read it), ``adapter/`` under LoRA, ``metrics.jsonl`` (per update: loss,
policy/value loss, entropy, clip fraction, approx-KL; and the iteration's rollout score, reward, KL to the
reference, beta, answer length), ``summary.json`` (one line per iteration), ``samples.json``, ``meta.json``
(policy, reference and reward model hashes, prompt data sha256), ``report.html``, ``logbook.jsonl``,
``checkpoints/`` (policy + value model + running reward statistics: they resume the run; the model folder is
``model/``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llamalab.align.data import FORMATS, read_prompts
from llamalab.align.ppo import (
    COMBINE,
    PPOBatches,
    PPOConfig,
    PPOGuardConfig,
    PPOLoRAConfig,
    PPOLoss,
    PPOOptimConfig,
    build_ppo_model,
    build_scorer,
    encode_prompts,
    finish_ppo,
    model_path,
    reference_model,
    shard_ppo_model,
)
from llamalab.common import LlamalabError, print0, seed_everything
from llamalab.config import to_dict
from llamalab.finetune.outputs import base_record
from llamalab.finetune.stage import (
    DEFAULT_LENGTH,
    StageConfig,
    load_base,
    parallel_model,
    print_dropped,
    stage_optimizer,
)
from llamalab.model.config import flops_per_token
from llamalab.run_dir import RunDir
from llamalab.tokenizer.templates import TEMPLATES, stop_token_ids
from llamalab.train.distributed import ParallelConfig, resolve_strategy
from llamalab.train.meta import files_record, run_meta, write_meta
from llamalab.train.optim import warmup_steps_for
from llamalab.train.trainer import LoopSettings, Trainer


@dataclass
class Config(StageConfig):
    policy: str = field(default="", metadata={"help": "the starting policy (an SFT model): a llamalab model or run "
                                                     "folder, a Hugging Face folder or a .gguf file"})
    reference: str = field(default="", metadata={"help": "the frozen reference model (default: the starting "
                                                         "policy; under LoRA the policy with adapters off)"})
    reward_model: list[str] = field(default_factory=list, metadata={
        "help": "reward model folder(s) written by `llamalab rm` (comma-separated)"})
    reward_fn: list[str] = field(default_factory=list, metadata={
        "help": "scripted reward(s), module.path:function taking (prompts, answers) -> one float per answer"})
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "with several rewards and --reward-combine sum: their weights (default 1 each)"})
    reward_combine: str = field(default="sum", metadata={
        "choices": list(COMBINE), "help": "sum: weighted sum; llama2: the first RM (safety) where sigmoid(its "
                                          "score) < --safety-threshold, else the second (helpfulness)"})
    safety_threshold: float = 0.15
    data: list[str] = field(default_factory=list, metadata={"help": "prompts: preference data (their prompts) or "
                                                                    "{prompt|messages} records, JSON/JSONL (.gz "
                                                                    "ok), comma-separated"})
    format: str = field(default="auto", metadata={"choices": list(FORMATS),
                                                  "help": "pairs: {prompt|messages, chosen, rejected}; "
                                                          "hh: Anthropic HH-RLHF dialogues"})
    template: str = field(default="", metadata={"help": f"chat template ({', '.join(TEMPLATES)}); default: "
                                                       "the policy's own"})
    run_dir: str = field(default="runs/ppo", metadata={"help": "where the run's record and model/ go"})
    iterations: int = field(default=100, metadata={"help": "PPO iterations (rollout + updates)"})
    ppo: PPOConfig = field(default_factory=PPOConfig)
    micro_batch_size: int = field(default=0, metadata={"help": "answers per forward pass in an update "
                                                               "(0: min(minibatch per process, 4))"})
    optim: PPOOptimConfig = field(default_factory=PPOOptimConfig)
    lora: PPOLoRAConfig = field(default_factory=PPOLoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={
        "help": "under torchrun: strategy ddp (auto) or fsdp (policy and value model sharded; reference and "
                "reward models whole on every rank); tp is not supported by ppo yet"})
    guard: PPOGuardConfig = field(default_factory=PPOGuardConfig)
    # PPO counts checkpoints and stops in iterations: these override StageConfig's defaults and help
    checkpoint_interval: int = field(default=10, metadata={"help": "iterations between checkpoints (and at the end)"})
    stop_after: int = field(default=0, metadata={"help": "stop (with a checkpoint) after N iterations this run"})
    max_seconds: float = field(default=0.0, metadata={"help": "stop after this long (may cut an iteration: its "
                                                              "rollouts are then sampled again on --resume)"})
    # --on-error, --limit, --device, --dtype, --keep-last, --seed, --resume: StageConfig

    def validate(self) -> None:
        if not self.policy:
            raise LlamalabError("ppo: give the starting policy, --policy MODEL (an SFT model)")
        if not self.data:
            raise LlamalabError("ppo: give prompts, --data FILE (preference pairs, HH-RLHF or {prompt} JSON/JSONL)")
        if not self.reward_model and not self.reward_fn:
            raise LlamalabError("ppo: give a reward, --reward-model RM (llamalab rm) or --reward-fn module:function")
        if self.template and self.template not in TEMPLATES:
            raise LlamalabError(f"--template: unknown {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.iterations <= 0:
            raise LlamalabError(f"ppo: --iterations must be > 0, got {self.iterations}")
        if self.parallel.compile or self.parallel.activation_checkpointing != "none":
            raise LlamalabError("ppo: --parallel.compile and --parallel.activation-checkpointing are not supported")
        self.ppo.validate()
        self.optim.validate()
        self.lora.validate()


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    b = load_base(cfg.policy, cfg.template, cfg.device, cfg.dtype)
    device, dtype, rank, world, autocast = b.device, b.dtype, b.rank, b.world, b.autocast
    cfg.ppo.validate(world)
    policy, meta, base, tok, template = b.model, b.meta, b.path, b.tokenizer, b.template
    ctx = policy.cfg.max_seq_len
    if cfg.ppo.max_new_tokens >= ctx:
        raise LlamalabError(f"--ppo.max-new-tokens {cfg.ppo.max_new_tokens} leaves no room for a prompt in the "
                            f"policy's {ctx}-token context")
    # NOTE: an update runs the policy and the value model over prompt + answer with gradients: SmolLM2's
    # 8192-token context as the prompt limit let 8 HH-RLHF dialogues of ~1,000 tokens take > 21 GB (killed).
    default_prompt = min(ctx, DEFAULT_LENGTH) - cfg.ppo.max_new_tokens
    max_prompt = min(cfg.ppo.max_prompt_len or max(default_prompt, 1), ctx - cfg.ppo.max_new_tokens)

    t0 = time.perf_counter()
    records, ledger = read_prompts(cfg.data, cfg.format, cfg.limit, cfg.on_error)
    prompts, prompt_ids = encode_prompts(records, tok, template, max_prompt, ledger)
    print0(f"ppo prompts: {ledger.read} records read, {len(records)} distinct prompts ({ledger.duplicates} "
           f"duplicates), {len(prompts)} used, dropped {dict(ledger.dropped) or 'none'} "
           f"({time.perf_counter() - t0:.1f}s)")
    print_dropped(ledger.errors)
    if not prompts:
        raise LlamalabError(f"ppo: no usable prompts in {', '.join(cfg.data)} (see the counts above)")
    run = RunDir(cfg.run_dir)

    seed_everything(cfg.seed)
    lora = bool(cfg.lora.rank)
    reference = reference_model(policy, cfg.reference, lora)
    model, n_trainable = build_ppo_model(policy, cfg.lora, cfg.ppo.kl_coef)
    model.to(device)
    if reference is not None:
        reference.to(device)
    scorer, reward_records = build_scorer(cfg.reward_model, cfg.reward_fn, cfg.reward_weights, cfg.reward_combine,
                                          cfg.safety_threshold, device, cfg.ppo.rollout_micro)
    if resolve_strategy(cfg.parallel, world) == "fsdp":  # policy and value sharded; reference and RMs whole
        net, strategy = shard_ppo_model(model, device, dtype if dtype != torch.float32 else None), "fsdp"
    else:
        net, strategy = parallel_model(model, cfg.parallel, device, dtype, world, "ppo", allowed=("ddp", "fsdp"),
                                       unsupported=" by ppo yet")
    optim, optimizer = stage_optimizer(model, cfg.optim, lora)
    updates = cfg.ppo.updates_per_iteration()
    steps = cfg.iterations * updates
    micro = cfg.micro_batch_size or min(cfg.ppo.minibatch // world, 4)
    samples: list[dict[str, Any]] = []
    batches = PPOBatches(model, reference, scorer, prompts, prompt_ids, tok,
                         {tok.eos_id, *stop_token_ids(template, tok)}, cfg.ppo, micro, cfg.seed, rank, world, device,
                         autocast, on_rollout=lambda buf: samples.extend(buf.samples[:2]))
    settings = LoopSettings(
        name="ppo", run_dir=run.root, steps=steps, peak_lr=optim.lr,
        warmup=warmup_steps_for(optim, steps) if (optim.warmup_steps or optim.warmup_ratio) else 0,
        min_lr_ratio=optim.min_lr_ratio, grad_clip=optim.grad_clip,
        checkpoint_interval=cfg.checkpoint_interval * updates, keep_last=cfg.keep_last,
        stop_after=cfg.stop_after * updates, max_seconds=cfg.max_seconds, resume=cfg.resume, guard=cfg.guard)
    trainer = Trainer(net, optimizer, settings, batches, run_cfg=to_dict(cfg), tokenizer_path=tok, autocast=autocast,
                      loss_fn=PPOLoss(cfg.ppo.clip, cfg.ppo.clip_value, cfg.ppo.vf_coef),
                      model_extra={"chat_template": template, "ppo_checkpoint": True})
    trainer.restore()
    record = {"policy": base_record(base),
              "reference": base_record(model_path(cfg.reference)) if cfg.reference
              else {"same_as": "policy", "lora_adapters_off": lora},
              "rewards": reward_records,
              "prompts": {**ledger.to_json(), "max_prompt_len": max_prompt}}
    write_meta(run, run_meta(to_dict(cfg), policy.cfg, files_record(cfg.data), kind="ppo", base=record["policy"],
                             reference=record["reference"], rewards=reward_records, prompts=record["prompts"],
                             flops_per_token=flops_per_token(policy.cfg, ctx), world_size=world, strategy=strategy,
                             device=str(device), dtype=str(dtype), n_params=model.num_params(),
                             trainable_params=n_trainable, template=template, updates_per_iteration=updates))
    mode = f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)}" if lora else "full fine-tuning"
    p = cfg.ppo
    print0(f"ppo: {base} | {mode}, {n_trainable:,} trainable params (policy + value) | template {template} | "
           f"{cfg.iterations} iterations x {p.rollout_batch} prompts, {p.epochs} epoch(s) of minibatches of "
           f"{p.minibatch} = {steps} updates | beta {p.kl_coef:g}{' adaptive' if p.kl_target else ''}, clip "
           f"{p.clip}, GAE {p.gamma}/{p.lam} | lr {optim.lr:g} "
           f"{'constant' if optim.min_lr_ratio == 1 and not settings.warmup else 'scheduled'} | {device} "
           f"{str(dtype).replace('torch.', '')}")
    result = trainer.fit()
    return finish_ppo(run, model, lora=cfg.lora, tokenizer=tok, template=template, base_meta=meta, record=record,
                      result=result, samples=samples)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
