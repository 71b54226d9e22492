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
with :func:`init_sharded_weights`, which draws each full matrix from the same seeded CPU generator
as ``Transformer.init_weights`` and keeps only this rank's rows: the weights are identical to an
unsharded init with the same seed, whatever the world size (one full matrix at a time in host RAM).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llamalab.common import LlamalabError


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
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place: ``fully_shard`` on every block, then on the root; returns ``model``.

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
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=False, mp_policy=mp)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2 or tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def init_sharded_weights(model: nn.Module, device: torch.device, seed: int) -> None:
    """Materialise a meta-built, sharded Transformer on ``device`` and initialise it as
    ``Transformer.init_weights(seed)`` would, bit for bit, keeping only this rank's shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    cfg = model.cfg
    std = 0.02 if cfg.init == "llama" else 0.006
    resid_std = std / math.sqrt(2 * cfg.n_layers)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.freqs_cis.copy_(model._freqs().to(model.freqs_cis.device))
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype)
        if p.ndim == 1:
            full.fill_(1.0)
        else:  # NOTE: the same draws as init_weights, which differ between CPU and accelerator params
            s = resid_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
            if device.type == "cpu":
                full.normal_(0.0, s, generator=gen)
            else:
                full = torch.randn(p.shape, generator=gen).mul_(s).to(p.dtype)
        if isinstance(p, DTensor):
            # every rank drew the same full matrix: slice locally, no communication (src_data_rank=None)
            local = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)
