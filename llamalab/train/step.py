"""The one training step, shared by pretraining, SFT and preference tuning.

A step takes the micro-batches of one global batch on this rank, runs forward/backward on each
(gradient accumulation), and returns the loss and gradient norm; the caller decides, through the
stability guard, whether the optimizer steps.

Loss normalisation: the loss is a sum over target tokens divided by the number of target tokens
in the *global* batch (all micro-batches, all ranks), so that accumulation and data parallelism give
the same gradient as one big batch, also when loss masks leave different numbers of tokens per
micro-batch (SFT). DDP and FSDP average gradients over ranks, hence the data-parallel world-size
factor (1 under tensor parallelism, where every rank holds the same batch).
NOTE: only the last micro-batch synchronises gradients: DDP's ``no_sync`` and FSDP2's
``set_requires_gradient_sync(False)`` on the others (FSDP then keeps unsharded fp32 gradients
between micro-steps: more memory, one reduce-scatter per step instead of one per micro-batch).

Batches that are not (inputs, targets): preference pairs (reward model, DPO) and PPO minibatches
are objects with ``to(device)`` and ``units()`` (what the loss is averaged over: pairs, or tokens);
their ``loss_fn(model, batch)`` returns the loss summed over those units, optionally with a dict of
summed statistics (``(loss_sum, {"accuracy": ..., "margin": ...})``) that the step averages over the
global units and the trainer logs in metrics.jsonl beside the loss.

fp16 (OPT's recipe): a ``GradScaler`` multiplies the loss by a dynamic scale before backward;
``clip_and_step`` unscales, clips, and skips the update when any gradient overflowed (the scale
then halves; it doubles after ``growth_interval`` clean steps). bf16 and fp32 need no scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamalab.train.distributed import data_parallel_world

IGNORE_INDEX = -100  # targets never scored: prompts in SFT, padding; F.cross_entropy's default


@runtime_checkable
class UnitBatch(Protocol):
    """A micro-batch other than (x, y): the loss is summed over ``units()`` (pairs, rollout tokens). It may also
    have ``n_tokens()``, the tokens its forward passes read (pairs: both answers' rows without padding): what
    tokens/s and MFU count; without it they count units."""

    def to(self, device: torch.device) -> "UnitBatch": ...

    def units(self) -> int: ...


@dataclass
class StepResult:
    loss: float  # mean loss per target token (or per unit) over the global batch
    n_tokens: int  # target tokens (or units) in the global batch
    n_input_tokens: int = 0  # tokens the forward passes read over the global batch (tokens/s, MFU); 0: n_tokens
    grad_norm: float | None = None
    stats: dict[str, float] = field(default_factory=dict)  # a loss_fn's extra statistics, means over units


def batch_units(mb: Any) -> int:
    """What a micro-batch's loss is averaged over: its scored tokens, or a UnitBatch's units()."""
    if isinstance(mb, tuple):
        return int((mb[1] != IGNORE_INDEX).sum())
    return int(mb.units())


def batch_tokens(mb: Any) -> int:
    """The tokens a micro-batch's forward reads, for throughput: (x, y)'s scored tokens, a UnitBatch's
    ``n_tokens()`` when it has one, else its units."""
    if not isinstance(mb, tuple) and hasattr(mb, "n_tokens"):
        return int(mb.n_tokens())
    return batch_units(mb)


def call_loss(loss_fn: Callable[..., Any] | None, model: torch.nn.Module, mb: Any
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``loss_fn`` on one micro-batch already on the device: (summed loss, summed statistics)."""
    if isinstance(mb, tuple):
        x, y = mb
        out = loss_fn(model, x, y) if loss_fn is not None else model_loss_sum(model, x, y)
    else:
        if loss_fn is None:
            raise TypeError(f"a {type(mb).__name__} batch needs a loss_fn(model, batch)")
        out = loss_fn(model, mb)
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


def _to(mb: Any, device: torch.device) -> Any:
    if isinstance(mb, tuple):
        return tuple(t.to(device, non_blocking=True) for t in mb)
    return mb.to(device)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over targets != IGNORE_INDEX. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def model_loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed token loss of ``model`` on (x, y): through its fused head when it has one (no logits)."""
    from llamalab.train import fused_ce  # here, not at the top: fused_ce imports IGNORE_INDEX from this module

    head = fused_ce.find_fused_head(model)
    if head is not None:
        return fused_ce.fused_loss_sum(model, head, x, y)
    return token_loss_sum(model(x), y)


def _global_count(n: list[int], device: torch.device, dp_world: int) -> list[int]:
    if dp_world == 1:
        return n
    t = torch.tensor(n, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def grad_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A context in which backward does (``sync``) or does not all-reduce/reduce-scatter gradients."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: a flag, not a context
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def forward_backward(model: torch.nn.Module, micro_batches: list[Any],
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     loss_fn: Callable[..., Any] | None = None,
                     scaler: "torch.amp.GradScaler | None" = None) -> StepResult:
    """Accumulate gradients of the global-batch-mean loss over this rank's micro-batches.

    A micro-batch is (x, y) with ``loss_fn(model, x, y)``, or a :class:`UnitBatch` with
    ``loss_fn(model, batch)``; either loss_fn may also return summed statistics (see the module doc).
    """
    device = next(model.parameters()).device
    local = sum(batch_units(mb) for mb in micro_batches)
    local_tokens = sum(batch_tokens(mb) for mb in micro_batches)
    dp_world = data_parallel_world(model)  # 1 under tensor parallelism: every rank has the same batch
    n_global, tokens_global = _global_count([local, local_tokens], device, dp_world)
    scale = dp_world / max(n_global, 1)
    total = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    n_real = len(micro_batches)
    micro_batches = _same_count_for_fsdp(model, micro_batches, device, dp_world)
    for i, mb in enumerate(micro_batches):
        mb = _to(mb, device)
        last = i == len(micro_batches) - 1
        pad = i >= n_real  # a repeat that only keeps this rank's collectives in step with the others
        with grad_sync(model, last):
            with autocast():
                loss_sum, stats = call_loss(loss_fn, model, mb)
            loss = loss_sum.float() * (0.0 if pad else scale)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if pad:
            continue
        total += loss_sum.detach().float()
        for k, v in stats.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + torch.as_tensor(v, device=device).detach().float()
    names = sorted(sums)
    if dp_world > 1:
        packed = torch.stack([total] + [sums[k] for k in names])
        dist.all_reduce(packed)
        total, sums = packed[0], {k: packed[j + 1] for j, k in enumerate(names)}
    denom = max(n_global, 1)
    return StepResult(loss=float(total) / denom, n_tokens=n_global, n_input_tokens=tokens_global,
                      stats={k: float(sums[k]) / denom for k in names})


def _same_count_for_fsdp(model: torch.nn.Module, micro_batches: list[Any], device: torch.device,
                         dp_world: int) -> list[Any]:
    """Under FSDP every forward all-gathers and every backward reduce-scatters, so every rank must run as many
    micro-batches as the others (a data split can leave one rank an extra one); pad with repeats of the last,
    which :func:`forward_backward` runs with a zero loss. DDP syncs only the last micro-batch: no padding."""
    if dp_world == 1 or not hasattr(model, "set_requires_gradient_sync") or not micro_batches:
        return micro_batches
    n = torch.tensor([len(micro_batches)], dtype=torch.long, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return micro_batches + [micro_batches[-1]] * (int(n.item()) - len(micro_batches))


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                  scaler: "torch.amp.GradScaler | None" = None) -> float:
    """Clip gradients to ``grad_clip`` (0 = off), step, and clear gradients; returns the pre-clip norm.

    With a ``scaler`` the gradients are unscaled first, and the step is skipped (the norm is then
    inf or nan) when any overflowed; the scaler's scale is updated either way.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if _mixes_dtensors(params):  # tensor parallel: sharded blocks, replicated embeddings and norms
        norm = _clip_mixed(params, max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding partial norms
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _mixes_dtensors(params: list[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    return len(kinds) == 2


def _clip_mixed(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over DTensor and plain gradients together (torch's refuses the mix)."""
    norms = []
    for p in params:
        n = torch.linalg.vector_norm(p.grad, 2.0)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return total


def split_micro(x: torch.Tensor, y: torch.Tensor, micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + micro], y[i:i + micro]) for i in range(0, x.shape[0], micro)]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[Any],
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  loss_fn: Callable[..., Any] | None = None, with_stats: bool = False
                  ) -> float | dict[str, float] | None:
    """Mean loss per target token (or unit) over ``batches`` (None when there are none); the validation
    loss of pretraining, SFT and preference tuning. ``loss_fn`` is as in :func:`forward_backward`.
    With ``with_stats``: a dict {"loss": ..., <each statistic>: mean over units}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    sums: dict[str, float] = {}
    for mb in batches:
        mb = _to(mb, device)
        with autocast():
            loss_sum, stats = call_loss(loss_fn, model, mb)
        total += float(loss_sum)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += batch_units(mb)
    model.train(was_training)
    if not n:
        return None
    if with_stats:
        return {"loss": total / n, **{k: v / n for k, v in sums.items()}}
    return total / n
