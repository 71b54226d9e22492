"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the Transformer.

Each transformer block is its own FSDP unit, then the root (embeddings, final norm, output) is one:
a block's full weights exist only while it runs forward or backward, so the memory for weights,
gradients and AdamW moments is divided by the world size, at the cost of an all-gather per block
per pass and a reduce-scatter of gradients (ZeRO-3). For a model that fits on one device, DDP is
simpler and at least as fast; FSDP is what lets a model that does not fit train at all.

Mixed precision on GPU: parameters are all-gathered and computed in bf16 (or fp16), gradients are
reduced in fp32, and the sharded master weights and optimizer states stay fp32. On CPU the policy
is empty (fp32 throughout): NOTE most CPUs emulate bf16 at ~1 GFLOP/s.

Large models are built on the meta device (no memory), sharded, then materialised shard by shard
with :func:`init_sharded_weights`: it runs ``Transformer.init_weights`` (each module's own rule)
through :class:`ShardedInit`, which draws each full matrix exactly as an unsharded init would and
keeps only this rank's rows, so the weights are identical to an unsharded init with the same seed,
whatever the world size (one full matrix at a time in memory). Trade-off: every rank draws every
full matrix (no communication, but the same random-number work on each rank).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llamalab.common import LlamalabError
from llamalab.model.layers import WeightInit


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # torch < 2.6 kept FSDP2 under a private path
        raise LlamalabError(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available in torch "
                            f"{torch.__version__}; use parallel.strategy=ddp") from e
    return fully_shard, MixedPrecisionPolicy


def mixed_precision_policy(device: torch.device, param_dtype: torch.dtype | None):
    """bf16/fp16 compute with fp32 gradient reduction on GPU; no policy (fp32) elsewhere."""
    _, MixedPrecisionPolicy = _fsdp_api()
    if device.type != "cuda" or param_dtype in (None, torch.float32):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Shard ``model`` in place: ``fully_shard`` on every block (``blocks``, default ``model.layers``: e.g. a
    value model's ``trunk.layers``), then on the root; returns ``model``.

    ``reshard_after_forward=False`` keeps the gathered weights of each block from forward to
    backward (ZeRO-2 like: one all-gather fewer per block, more memory). The root is never
    resharded after forward, since backward starts with it.
    NOTE: build the optimizer *after* this call: sharding replaces every parameter by a DTensor.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise LlamalabError("parallel.strategy=fsdp needs a process group: launch with torchrun")
    fully_shard, _ = _fsdp_api()
    mp = mixed_precision_policy(device, param_dtype)
    for block in model.layers if blocks is None else blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=False, mp_policy=mp)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2 or tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedInit(WeightInit):
    """A :class:`WeightInit` for DTensor parameters: draw the full tensor, keep this rank's shard."""

    def _write(self, p: torch.Tensor, fill) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(p, DTensor):
            fill(p)
            return
        full = torch.empty(p.shape, dtype=p.dtype, device=p.device)
        fill(full)
        # every rank drew the same full tensor: slice locally, no communication (src_data_rank=None)
        p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())

    def normal_(self, w: torch.Tensor, std: float) -> None:
        self._write(w, lambda t: WeightInit.normal_(self, t, std))

    def ones_(self, w: torch.Tensor) -> None:
        self._write(w, lambda t: WeightInit.ones_(self, t))


@torch.no_grad()
def init_sharded_weights(model: nn.Module, device: torch.device, seed: int) -> None:
    """Materialise a meta-built, sharded Transformer on ``device`` and initialise it as
    ``Transformer.init_weights(seed)`` would, bit for bit, keeping only this rank's shards."""
    model.to_empty(device=device)
    base = WeightInit.for_model(model.cfg.init, model.cfg.n_layers, seed)
    model.init_weights(init=ShardedInit(base.std, base.resid_std, base.generator))
