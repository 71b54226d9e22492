"""Parallelism and memory savers, applied to the model from outside (the torchtitan way).

The model never knows it is distributed: this module initialises the process group from
torchrun's environment, installs the fused loss head, wraps blocks for activation checkpointing,
and wraps the model for parallelism. ``parallelize`` is the one entry point the trainers call.

Strategies: ``ddp`` (full replica per rank, one gradient all-reduce per step: simplest and fastest
while the model, its gradients and AdamW states fit), ``fsdp`` (FSDP2: parameters, gradients and
optimizer states sharded, weights all-gathered per block: for models that do not fit; see
``fsdp.py``), ``tp`` (tensor parallel blocks over all ranks, activations all-reduced per block:
only worth it over fast links; see ``tensor_parallel.py``). Activation checkpointing trades about
a third more compute for keeping only block inputs.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from llamalab.common import LlamalabError, dist_info


@dataclass
class ParallelConfig:
    strategy: str = "auto"  # auto | none | ddp | fsdp | tp (tensor parallel, one group of all ranks)
    activation_checkpointing: str = "none"  # none | full | every_k
    ac_every: int = 2  # with every_k: checkpoint every k-th block
    compile: bool = False  # torch.compile each block (CPU needs a C++ compiler)
    fused_loss: bool = True  # chunked output projection + cross-entropy, no logits tensor (fused_ce.py)
    sequence_parallel: bool = False  # with strategy tp: norms and the residual stream split by sequence


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Initialise the default process group when launched by torchrun; returns (rank, local_rank, world)."""
    rank, local_rank, world = dist_info()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return rank, local_rank, world
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise LlamalabError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                            f"(torchrun --nproc-per-node N -m llamalab.train.pretrain ...)")
    if not 0 <= rank < world or not 0 <= local_rank < world:
        raise LlamalabError(f"RANK={rank} / LOCAL_RANK={local_rank} out of range for WORLD_SIZE={world}: "
                            f"launch with torchrun rather than setting these by hand")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return rank, local_rank, world


def init_device(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype, int, int]:
    """Resolve the device, join torchrun's process group (one GPU per local rank) and pick the
    dtype: (device, dtype, rank, world). The one set-up every training stage starts with."""
    from llamalab.common import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    rank, local_rank, world = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    return device, resolve_dtype(dtype_name, device), rank, world


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every: int = 2) -> int:
    """Recompute each wrapped block's activations in backward (non-reentrant); returns blocks wrapped.

    The block's ``forward`` is replaced on the instance, so parameter names and checkpoints are
    unchanged.
    """
    if mode == "none":
        return 0
    if mode not in ("full", "every_k"):
        raise LlamalabError(f"activation_checkpointing must be none, full or every_k, got {mode!r}")
    n = 0
    for i, block in enumerate(model.layers):
        if mode == "every_k" and i % every != 0:
            continue
        inner = type(block).forward

        def fwd(self, *args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(self, *args, **kwargs)
            return checkpoint(_inner, self, *args, use_reentrant=False, **kwargs)

        block.forward = types.MethodType(fwd, block)
        n += 1
    return n


def resolve_strategy(cfg: ParallelConfig, world: int) -> str:
    """``auto`` -> ddp when launched with several processes, else none; validates the name."""
    if cfg.strategy not in ("auto", "none", "ddp", "fsdp", "tp"):
        raise LlamalabError(f"parallel.strategy must be auto, none, ddp, fsdp or tp, got {cfg.strategy!r}")
    if cfg.strategy == "auto":
        return "ddp" if world > 1 else "none"
    if cfg.strategy == "none" and world > 1:
        raise LlamalabError(f"parallel.strategy=none with {world} processes would train {world} diverging "
                            f"copies: use ddp or fsdp (or auto)")
    return cfg.strategy if world > 1 else "none"


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Fused loss head, activation checkpointing, optional compile, then DDP/FSDP by ``cfg.strategy``.

    ``param_dtype``: FSDP's compute dtype on GPU (bf16/fp16 all-gathers, fp32 reductions).
    NOTE: with fsdp the parameters change identity (DTensors): build the optimizer afterwards.
    """
    if cfg.fused_loss:
        from llamalab.train.fused_ce import install_fused_head

        install_fused_head(model)
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    strategy = resolve_strategy(cfg, world)
    if cfg.compile:
        for block in model.layers:
            block.compile()
    if strategy == "none" or world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from llamalab.train.fsdp import apply_fsdp

        return apply_fsdp(model, device, param_dtype)
    if strategy == "tp":
        from llamalab.train.tensor_parallel import apply_tensor_parallel

        return apply_tensor_parallel(model, device, cfg.sequence_parallel)
    raise AssertionError(strategy)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def data_parallel_world(model: nn.Module) -> int:
    """How many ranks read different data: the world size, or 1 under pure tensor parallelism."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return getattr(unwrap(model), "dp_world", world)
