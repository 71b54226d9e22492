"""Supervised fine-tuning (SFT): ``llamalab sft --base MODEL --data FILE --format alpaca|sharegpt``.

Recipe (Llama 2, Touvron et al. 2023b, section 3.1): AdamW, cosine schedule, peak lr 2e-5, weight
decay 0.1, batch 64 sequences, 2 epochs, loss on assistant tokens only, examples packed into
full-length rows. Warmup is 3% of the steps (Alpaca / TRL; the paper states none). With LoRA
(``--lora.rank 8``) the default peak lr is 2e-4 instead, as for alpaca-lora / QLoRA: adapters
start at zero and need a larger step. The optimizer flags are pretraining's (``--optim.lr``,
``--optim.warmup-ratio``, ``--optim.min-lr-ratio``, ``--optim.weight-decay`` ...) with these defaults.

The run goes through :class:`~llamalab.train.trainer.Trainer`, the loop pretraining uses (guards,
metrics.jsonl, logbook, atomic checkpoints, ``--resume``, the ``meta.json`` writer and the
validation loss); only the batches (packed rows, see :mod:`llamalab.finetune.packing`) and the loss
function differ. Steps are derived from the data: ``epochs * ceil(rows / batch_size)``. The base
model is read by the one loader, :func:`llamalab.model.folder.load` (a llamalab or run folder, a Hugging
Face folder or a .gguf file, with any tokenizer kind: SentencePiece or byte-level BPE); the chat template is
``--template``, else the base's own (a source Jinja template maps to ours when it renders the same, else to ours
of its family, :func:`llamalab.tokenizer.templates.resolve_template`). The library pieces live in
:mod:`llamalab.finetune` (data, packing, LoRA, optimizer defaults, outputs).

Outputs in ``--run-dir``:
  ``model/``        a llamalab model folder (LoRA merged) with ``chat_template`` recorded and the base's
                    tokenizer files (tokenizer.model, or tokenizer.json + tokenizer_config.json): the engine,
                    ``llamalab generate|chat|serve`` and the HF/GGUF exporters read it
  ``adapter/``      with LoRA, the adapter alone (``adapter_model.safetensors`` + config)
  ``sft_data.json`` the data ledger (records read, kept, dropped by reason, fixes, tokens)
  ``metrics.jsonl``, ``logbook.jsonl``, ``checkpoints/``  as for pretraining
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llamalab.common import LlamalabError, is_rank0, print0, seed_everything, write_json_atomic
from llamalab.config import to_dict
from llamalab.finetune.data import FORMATS, OVERLONG, load_sft_data, split_val
from llamalab.finetune.lora import LoRAConfig, apply_lora
from llamalab.finetune.optim import SFTOptimConfig
from llamalab.finetune.outputs import base_record, finish
from llamalab.finetune.packing import eval_batches, make_batch_fn, pack_rows, pad_id_of, plan_steps, sft_loss
from llamalab.finetune.stage import (
    DEFAULT_LENGTH,
    MICRO_TOKENS,
    StageConfig,
    check_warmup,
    default_micro,
    load_base,
    loop_settings,
    parallel_model,
    print_dropped,
    stage_optimizer,
)
from llamalab.model.config import flops_per_token
from llamalab.run_dir import RunDir
from llamalab.tokenizer.templates import TEMPLATES
from llamalab.train.meta import files_record, run_meta, write_meta
from llamalab.train.step import evaluate_loss
from llamalab.train.trainer import Trainer


@dataclass
class Config(StageConfig):
    base: str = field(default="", metadata={"help": "base model: a llamalab model or run folder, a Hugging Face "
                                                   "folder or a .gguf file (any tokenizer kind llamalab reads)"})
    data: list[str] = field(default_factory=list, metadata={"help": "data file(s), JSON or JSONL (.gz ok), "
                                                                    "comma-separated"})
    format: str = field(default="sharegpt", metadata={"choices": list(FORMATS),
                                                       "help": "alpaca: instruction/input/output; "
                                                               "sharegpt: conversations"})
    template: str = field(default="", metadata={"help": f"chat template ({', '.join(TEMPLATES)}); "
                                                       "default: the base model's, else llama2"})
    run_dir: str = field(default="runs/sft", metadata={"help": "where the run's record and model/ go"})
    seq_len: int = field(default=0, metadata={"help": f"row length in tokens (0: min(the model's context, "
                                                     f"{DEFAULT_LENGTH}), TRL's SFT default)"})
    packing: bool = field(default=True, metadata={"help": "pack examples into full rows (attention kept per example)"})
    overlong: str = field(default="split", metadata={"choices": list(OVERLONG),
                                                     "help": "examples longer than seq_len: split at turns, "
                                                             "truncate, drop"})
    val_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of examples for a "
                                                               "validation loss (0: none)"})
    eval_interval: int = field(default=50, metadata={"help": "steps between validation losses (with --val-fraction)"})
    epochs: float = 2.0
    batch_size: int = field(default=64, metadata={"help": "rows per optimizer step (Llama 2: 64)"})
    micro_batch_size: int = field(default=0, metadata={"help": f"rows per forward pass (0: as many as fit "
                                                               f"{MICRO_TOKENS} tokens, 1 to 8)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: epochs * ceil(rows / batch_size))"})
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # --on-error, --limit, --parallel.*, --guard.*, --device ... --resume: StageConfig

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
        check_warmup("sft", self.optim)
        self.optim.validate()
        self.lora.validate()


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    # NOTE: rows are padded to seq_len, so "the model's context" (8192 for SmolLM2) as the default row made
    # packed rows of 8192 tokens whose logits alone (x 49k vocabulary) took GBs per row: killed for memory.
    b = load_base(cfg.base, cfg.template, cfg.device, cfg.dtype, cfg.seq_len, "--seq-len", DEFAULT_LENGTH)
    device, dtype, rank, world = b.device, b.dtype, b.rank, b.world
    model, meta, base, tok, template, seq_len = b.model, b.meta, b.path, b.tokenizer, b.template, b.length

    t0 = time.perf_counter()
    examples, ledger = load_sft_data(cfg.data, cfg.format, template, tok, seq_len, cfg.overlong, cfg.on_error,
                                     limit=cfg.limit)
    print0(f"sft data: {ledger.summary()} ({time.perf_counter() - t0:.1f}s)")
    print_dropped(ledger.errors)
    if not examples:
        raise LlamalabError(f"sft: no usable examples in {', '.join(cfg.data)} (see the counts above)")
    examples, val = split_val(examples, cfg.val_fraction, cfg.seed)
    rows = pack_rows(examples, seq_len, cfg.packing, cfg.seed)
    fill = sum(len(e) for e in examples) / (len(rows) * seq_len)
    g, per_epoch, steps = plan_steps(len(rows), cfg.batch_size, cfg.epochs, cfg.steps)
    if g % world:
        raise LlamalabError(f"sft: --batch-size {g} rows does not divide by the {world} data-parallel processes")
    micro = cfg.micro_batch_size or default_micro(g // world, seq_len)
    run = RunDir(cfg.run_dir)
    if is_rank0():
        run.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.sft_data, {**ledger.to_json(), "rows": len(rows), "seq_len": seq_len,
                                         "packing": cfg.packing, "fill": fill, "template": template})

    seed_everything(cfg.seed)
    n_trainable = model.num_params()
    if cfg.lora.rank:
        n_trainable = apply_lora(model, cfg.lora)
    model.to(device)
    # under torchrun: DDP (auto) or FSDP2 (LoRA's frozen base weights get no gradients to reduce);
    # the SFT loss needs the logits of packed rows, so the fused pretraining head stays off
    net, strategy = parallel_model(model, cfg.parallel, device, dtype, world, "sft")
    optim, optimizer = stage_optimizer(model, cfg.optim, bool(cfg.lora.rank))
    pad_id = pad_id_of(tok)  # pad positions carry no loss
    settings = loop_settings("sft", run.root, cfg, optim, steps, cfg.eval_interval if val else 0)
    val_rows = pack_rows(val, seq_len, cfg.packing, seed=0)
    trainer = Trainer(net, optimizer, settings,
                      make_batch_fn(examples, rows, g, per_epoch, micro, pad_id, cfg.seed, rank, world),
                      run_cfg=to_dict(cfg), tokenizer_path=tok, autocast=b.autocast,
                      loss_fn=sft_loss, model_extra={"chat_template": template},
                      eval_fn=(lambda m, ac: evaluate_loss(m, eval_batches(val, val_rows, micro, pad_id), ac, sft_loss))
                      if val else None)
    trainer.restore()
    write_meta(run, run_meta(to_dict(cfg), model.cfg, files_record(cfg.data), kind="sft", base=base_record(base),
                             flops_per_token=flops_per_token(model.cfg, seq_len), world_size=world, strategy=strategy,
                             device=str(device), dtype=str(dtype), n_params=model.num_params(),
                             trainable_params=n_trainable, template=template))
    mode = f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora.rank else "full fine-tuning"
    print0(f"sft: {base} | {mode}, {n_trainable:,} trainable params | template {template} | {len(rows)} rows of "
           f"<= {seq_len} tokens ({fill:.0%} filled, {'packed' if cfg.packing else 'unpacked'}) | {steps} steps x "
           f"{g} rows (micro {micro} x {world} processes) = {steps / per_epoch:.2f} epochs | lr {optim.lr:g} cosine, "
           f"wd {optim.weight_decay} | {device} {str(dtype).replace('torch.', '')}")
    t_fit = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t_fit
    # NOTE: the loop's tokens/s counts target (assistant) tokens; this one counts every input token
    train_tokens = sum(len(e) for e in examples)
    result["input_tokens_per_s"] = train_tokens * result["steps"] / per_epoch / seconds if seconds else None
    result["val_examples"] = len(val)
    return finish(run, model, lora=cfg.lora, base=base, data=cfg.data, fmt=cfg.format, tokenizer=tok,
                  template=template, base_meta=meta, ledger=ledger, result=result, seconds=seconds)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
