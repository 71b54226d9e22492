"""Direct Preference Optimization (Rafailov et al. 2023) on the shared Trainer.

Pieces used by ``llamalab dpo`` (:mod:`llamalab.commands.dpo`):

- :class:`DPOOptimConfig`: pretraining's ``--optim.*`` flags with DPO defaults: peak lr 5e-7 for full fine-tuning
  and 5e-6 with LoRA (the alignment-handbook's zephyr-7b-beta recipes, ``config_full.yaml`` /
  ``config_qlora.yaml``), cosine to 0, warmup 10% of the steps, no weight decay, AdamW betas (0.9, 0.999)
  (Hugging Face's defaults, which those recipes use).
- The reference: its summed answer log-probs are computed once, before training (:func:`reference_logprobs`, in
  fixed batches independent of the number of processes; under torchrun each rank computes every ``world``-th
  batch and an all-reduce shares them), and cached in the run folder (:func:`load_or_compute_reference`), keyed
  by a sha256 of the encoded pairs and the reference weights, so ``--resume`` reads them back instead of
  recomputing. With LoRA the reference is the frozen base; it is computed before the adapters exist. ``live``
  mode instead keeps the reference in the loop (:func:`live_reference`): a frozen copy for full fine-tuning, or
  the policy itself with its adapters switched off under LoRA (no second copy).
- :class:`DPOBatch` (a ``UnitBatch`` of pairs with their reference log-probs) and :func:`make_batch_fn` (global
  batch ``b`` is a pure function of ``b``: per-epoch seeded shuffles, ranks take contiguous slices), so resume
  and a 2-process run replay the 1-process run.
- :func:`dpo_loss_fn`: the Trainer's ``loss_fn``: summed DPO/IPO loss (:mod:`llamalab.align.losses`) plus
  statistics averaged over pairs and logged per step in ``metrics.jsonl`` (held-out: ``val_``-prefixed):
  ``accuracy`` (implicit reward of chosen > rejected; ties count 1/2, so the untrained policy scores 0.5),
  ``chosen_reward``/``rejected_reward`` (``beta * (log pi - log ref)``), ``margin`` (their difference),
  ``logratio`` (the policy's ``log pi(chosen) - log pi(rejected)``), ``logp_accuracy`` (the policy alone prefers
  the chosen answer: meaningful before training too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.align.data import EncodedPair, PairBatch, answer_logprobs, collate_pairs
from llamalab.align.losses import LOSSES, dpo_loss, reward_accuracy
from llamalab.common import LlamalabError, Progress, is_rank0, print0
from llamalab.finetune.packing import batch_indices
from llamalab.train.optim import OptimConfig

FULL_LR, LORA_LR = 5e-7, 5e-6
REFERENCE_MODES = ("cached", "live")


@dataclass
class DPOOptimConfig(OptimConfig):
    lr: float | None = field(default=None, metadata={
        "help": f"peak learning rate (unset: {FULL_LR:g}, or {LORA_LR:g} with LoRA)"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of the peak"})
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warmup steps, at most a tenth of the run (needs --optim.warmup-ratio 0)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warmup as a fraction of the steps"})
    weight_decay: float = 0.0
    beta2: float = 0.999

    def peak_lr(self, lora: bool) -> float:
        return self.lr or (LORA_LR if lora else FULL_LR)


# ----------------------------------------------------------------------------- batches


@dataclass
class DPOBatch:
    """N pairs, their reference log-probs and weights (a ``UnitBatch``: units = pairs of weight 1)."""

    pairs: PairBatch
    ref: torch.Tensor | None  # (2N,) reference answer log-probs, chosen rows then rejected (None: live reference)
    weight: torch.Tensor  # (N,) 1, or 0 for the stand-in pair of a rank left without pairs in a batch

    def to(self, device: Any) -> DPOBatch:
        return DPOBatch(self.pairs.to(device), None if self.ref is None else self.ref.to(device),
                        self.weight.to(device))

    def units(self) -> int:
        return int(self.weight.sum().item())

    def n_tokens(self) -> int:
        return self.pairs.n_tokens() if self.units() else 0


def _dpo_batch(encoded: Sequence[EncodedPair], ref: torch.Tensor | None, idx: Sequence[int], pad_id: int,
               weight: float = 1.0) -> DPOBatch:
    pairs = collate_pairs([encoded[i] for i in idx], pad_id)
    r = None if ref is None else torch.cat([ref[list(idx), 0], ref[list(idx), 1]])
    return DPOBatch(pairs, r, torch.full((len(idx),), weight))


def make_batch_fn(encoded: Sequence[EncodedPair], ref: torch.Tensor | None, g: int, per_epoch: int, micro: int,
                  pad_id: int, seed: int, rank: int = 0, world: int = 1) -> Callable[[int], list[DPOBatch]]:
    """``batch(b)``: this rank's micro-batches of global batch ``b`` (pairs of epoch ``b // per_epoch`` in that
    epoch's seeded order; ranks take contiguous slices). A rank with no pair left in an epoch's short last batch
    gets one pair of weight 0, so every rank still runs backward."""

    def batch(b: int) -> list[DPOBatch]:
        picked, mine = batch_indices(len(encoded), g, per_epoch, seed, b, rank, world)
        if not mine:
            return [_dpo_batch(encoded, ref, picked[:1], pad_id, weight=0.0)]
        return [_dpo_batch(encoded, ref, mine[k:k + micro], pad_id) for k in range(0, len(mine), micro)]

    return batch


def eval_batches(encoded: Sequence[EncodedPair], ref: torch.Tensor | None, micro: int,
                 pad_id: int) -> Iterator[DPOBatch]:
    """Every pair once, in order, ``micro`` pairs at a time."""
    for k in range(0, len(encoded), micro):
        yield _dpo_batch(encoded, ref, range(k, min(k + micro, len(encoded))), pad_id)


# ----------------------------------------------------------------------------- the reference


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, encoded: Sequence[EncodedPair], pad_id: int, batch_pairs: int,
                       device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext,
                       rank: int = 0, world: int = 1) -> torch.Tensor:
    """(N, 2) fp32 summed answer log-probs (chosen, rejected) of ``model`` for every pair. Batches are fixed
    (``batch_pairs`` pairs in file order) whatever the world size; rank r computes batches r, r + world, ...
    and an all-reduce (a sum with zeros elsewhere, exact) gives every rank all of them."""
    was = model.training
    model.eval()
    n = len(encoded)
    out = torch.zeros(n, 2, dtype=torch.float32, device=device)
    bar = Progress(n, "reference log-probs", unit="pairs", every=5.0)
    for k, start in enumerate(range(0, n, batch_pairs)):
        if k % world != rank:
            continue
        b = collate_pairs(encoded[start:start + batch_pairs], pad_id).to(device)
        with autocast():
            lp = answer_logprobs(model, b.tokens, b.loss_mask).float()
        m = b.units()
        out[start:start + m, 0], out[start:start + m, 1] = lp[:m], lp[m:]
        bar.update(m * world)
    bar.close()
    if world > 1:
        torch.distributed.all_reduce(out)
    model.train(was)
    return out.cpu()


def reference_key(encoded: Sequence[EncodedPair], reference: dict[str, Any], template: str) -> str:
    """sha256 of what the cached log-probs depend on: the token ids and masks of every pair, the reference."""
    h = hashlib.sha256(json.dumps({"reference": reference, "template": template}, sort_keys=True).encode())
    for e in encoded:
        h.update(json.dumps([e.chosen, e.rejected, e.chosen_mask, e.rejected_mask]).encode())
    return h.hexdigest()


def load_cached_reference(path: Path, key: str) -> torch.Tensor | None:
    """The cached (N, 2) log-probs when ``path`` holds them for ``key``, else None."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor("logprobs")


def save_cached_reference(path: Path, logprobs: torch.Tensor, key: str) -> None:
    from llamalab.model.folder import save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_safetensors({"logprobs": logprobs.contiguous()}, tmp, metadata={"key": key, "pairs": str(len(logprobs))})
    tmp.replace(path)


def load_or_compute_reference(path: Path, key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(log-probs, read from the cache?). Every rank reads the cache or computes (a collective); rank 0 writes."""
    cached = load_cached_reference(path, key)
    hit = torch.tensor([cached is not None], dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # all ranks take one branch
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")
        hit = hit.to(dev)
        torch.distributed.all_reduce(hit, op=torch.distributed.ReduceOp.MIN)
    if int(hit.item()) and cached is not None:
        return cached, True
    lp = compute()
    if is_rank0():
        save_cached_reference(path, lp, key)
    return lp, False


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The LoRA model's base alone: every adapter's scale set to 0 (its output adds exact zeros) and dropout off
    (eval mode), restored on exit."""
    from llamalab.finetune.lora import LoRALinear

    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not mods:
        raise LlamalabError("reference: the model has no LoRA adapters to disable")
    scales = [m.scale for m in mods]
    was = model.training
    model.eval()
    try:
        for m in mods:
            m.scale = 0.0
        yield
    finally:
        for m, s in zip(mods, scales):
            m.scale = s
        model.train(was)


def live_reference(policy: torch.nn.Module, frozen: torch.nn.Module | None) -> Callable[[PairBatch], torch.Tensor]:
    """Reference log-probs computed in the loop: ``frozen`` (a frozen copy, full fine-tuning), or ``policy`` with
    its adapters switched off (LoRA)."""
    from llamalab.train.distributed import unwrap

    @torch.no_grad()
    def ref(batch: PairBatch) -> torch.Tensor:
        if frozen is not None:
            return answer_logprobs(frozen, batch.tokens, batch.loss_mask)
        base = unwrap(policy)
        with adapters_disabled(base):
            return answer_logprobs(base, batch.tokens, batch.loss_mask)

    return ref


# ----------------------------------------------------------------------------- the loss


def dpo_loss_fn(beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
                reference: Callable[[PairBatch], torch.Tensor] | None = None
                ) -> Callable[[torch.nn.Module, DPOBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The Trainer's ``loss_fn(model, batch) -> (summed loss, summed statistics)`` (module docstring)."""
    if loss not in LOSSES:
        raise LlamalabError(f"--loss: must be one of {', '.join(LOSSES)}, got {loss!r}")

    def fn(model: torch.nn.Module, batch: DPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = batch.pairs
        n = p.margin.shape[0]
        pol = answer_logprobs(model, p.tokens, p.loss_mask)
        if batch.ref is not None:
            ref = batch.ref
        elif reference is not None:
            ref = reference(p)
        else:
            raise LlamalabError("dpo: a batch without reference log-probs and no live reference")
        t = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta, loss, label_smoothing)
        w = batch.weight.to(pol.dtype)
        c, r = pol[:n].detach(), pol[n:].detach()
        stats = {"accuracy": reward_accuracy(t.chosen_rewards, t.rejected_rewards),
                 "chosen_reward": t.chosen_rewards, "rejected_reward": t.rejected_rewards,
                 "margin": t.chosen_rewards - t.rejected_rewards, "logratio": c - r,
                 "logp_accuracy": (c > r).to(pol.dtype)}
        return (t.losses * w).sum(), {k: (v * w).sum() for k, v in stats.items()}

    return fn


def stats_at_reference(ref: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
                       label_smoothing: float = 0.0) -> dict[str, float]:
    """The held-out statistics of a policy equal to the reference, from the reference's (N, 2) log-probs alone
    (what :func:`dpo_loss_fn` gives before the first step when the reference is the base; no forward pass)."""
    c, r = ref[:, 0].double(), ref[:, 1].double()
    t = dpo_loss(c, r, c, r, beta, loss, label_smoothing)
    acc = reward_accuracy(t.chosen_rewards, t.rejected_rewards)
    return {"loss": float(t.losses.mean()), "accuracy": float(acc.mean()),
            "chosen_reward": float(t.chosen_rewards.mean()), "rejected_reward": float(t.rejected_rewards.mean()),
            "margin": float((t.chosen_rewards - t.rejected_rewards).mean()), "logratio": float((c - r).mean()),
            "logp_accuracy": float((c > r).double().mean())}


# ----------------------------------------------------------------------------- outputs


def heldout_before(logbook: Path) -> dict[str, float] | None:
    """The held-out statistics logged before the first step (``heldout_before`` in the logbook), if any."""
    if not logbook.exists():
        return None
    found = None
    for ln in logbook.read_text(encoding="utf-8").splitlines():
        row = json.loads(ln)
        if row.get("event") == "heldout_before":
            found = {k: v for k, v in row.items() if k not in ("event", "time")}
    return found


def metric_curve(run: Any, keys: Sequence[str]) -> dict[str, Any]:
    """First and last value of each metric in ``metrics.jsonl`` (train and ``val_``)."""
    rows = [json.loads(ln) for ln in run.metrics.read_text().splitlines()] if run.metrics.exists() else []
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[k] = {"first": vals[0], "last": vals[-1]}
    return out


def finish(run: Any, model: torch.nn.Module, *, lora: Any, base: Path, reference: dict[str, Any],
           data: Sequence[str], tokenizer: Any, template: str, base_meta: dict[str, Any], ledger: Any,
           result: dict[str, Any], seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
    """Write model/ (LoRA merged, chat template and the base's tokenizer), adapter/, the summary and the report
    (as SFT's :func:`llamalab.finetune.outputs.finish`); print the end summary. A stopped run writes no model."""
    from llamalab.common import write_json_atomic
    from llamalab.config import to_dict
    from llamalab.finetune.lora import merge_lora, save_adapter
    from llamalab.finetune.outputs import base_record, gather_plain
    from llamalab.model.folder import save_model
    from llamalab.report.html import write_report
    from llamalab.train.fsdp import is_sharded

    keys = ["loss", "accuracy", "margin", "logratio", "val_loss", "val_accuracy", "val_margin", "val_logratio",
            "val_logp_accuracy"]
    curve = metric_curve(run, keys)
    before = heldout_before(run.logbook)
    summary = {**result, "data": ledger.to_json(), "curve": curve, "heldout_before": before,
               "heldout_after": {k[4:]: v["last"] for k, v in curve.items() if k.startswith("val_")} or None,
               "template": template, "reference": reference, **settings}
    if result["steps"] < result["planned_steps"]:
        print0(f"dpo: stopped at step {result['steps']}/{result['planned_steps']}; continue with --resume "
               f"(no model/ written yet)")
        return summary
    if is_sharded(model):
        model = gather_plain(model, lora)
    if not is_rank0():
        return summary
    base_info = base_record(base)
    if lora.rank:
        summary["adapter"] = str(save_adapter(run.adapter, model, lora, base_info))
        merge_lora(model)
    extra = {"chat_template": template, "dpo": {"base": base_info, "reference": reference,
                                                "data": [str(p) for p in data],
                                                "lora": to_dict(lora) if lora.rank else None,
                                                "steps": result["steps"], **settings},
             **{k: base_meta[k] for k in ("tokenizer",) if k in base_meta}}
    summary["model"] = str(save_model(run.model, model.cpu().float(), extra=extra, tokenizer=tokenizer))
    write_json_atomic(run.dpo_summary, summary)
    summary["report"] = str(write_report(run.root))
    print0(done_line(summary, ledger, result, seconds))
    return summary


def done_line(summary: dict[str, Any], ledger: Any, result: dict[str, Any], seconds: float) -> str:
    c = summary["curve"]
    lc = f"loss {c['loss']['first']:.4f} -> {c['loss']['last']:.4f}" if "loss" in c else "no steps run"
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    held = ""
    if after:
        held = (f" | held-out reward accuracy {after.get('accuracy', float('nan')):.1%}, log-prob accuracy "
                + (f"{before['logp_accuracy']:.1%} -> " if before else "")
                + f"{after.get('logp_accuracy', float('nan')):.1%}, margin {after.get('margin', float('nan')):.4f}")
    return (f"dpo: done | {ledger.read} records, {ledger.encoded} pairs encoded, {sum(ledger.dropped.values())} "
            f"dropped {dict(ledger.dropped) or ''} | {lc}{held} | {result['steps']} steps in {seconds:.1f}s"
            f" | model {summary['model']}" + (f" | adapter {summary['adapter']}" if "adapter" in summary else "")
            + f" | report {summary['report']}")
