"""Tensor parallelism (Megatron-LM style) for the Transformer's blocks, with DTensor.

In every block the q/k/v and gate/up projections are split by output features (column-wise: each
rank computes its own heads and its own slice of the SwiGLU hidden layer) and the attention output
and down projections by input features (row-wise), so a block costs two all-reduces of the
activations in forward and two in backward, and each rank holds 1/tp of the block weights. The
embeddings, final norm and output head stay whole on every rank (replicated, computed
redundantly): for the small models this runs on that costs little; a vocabulary-parallel loss
would be the next step for large ones.

Sequence parallelism (``sequence_parallel=True``, Korthikanti et al. 2022): between the
projection groups the residual stream and the block norms are split along the sequence, so the
all-reduces become reduce-scatter + all-gather pairs (the same traffic) and the activations kept
outside the projections are divided by tp.

Every rank sees the same batch, so with ``strategy=tp`` the data-parallel size is 1: all ranks
form one tensor-parallel group (one node; combining it with data parallelism across nodes, a 2-D
mesh, is not implemented). Trade-off against FSDP: TP cuts activation memory and per-rank matmul
size but communicates activations in every block, so it pays only over fast links (NVLink).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llamalab.common import LlamalabError

BLOCK_PLAN = {"attention.wq": "col", "attention.wk": "col", "attention.wv": "col", "attention.wo": "row",
              "feed_forward.w1": "col", "feed_forward.w3": "col", "feed_forward.w2": "row"}


def check_divisible(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads), ("ffn hidden size", cfg.ffn_hidden_dim)):
        if n % tp:
            raise LlamalabError(f"tensor parallel over {tp} processes needs {name} ({n}) divisible by {tp}")


def _check_sequence_length(tp: int):
    def hook(module: nn.Module, args: tuple) -> None:
        T = args[0].shape[1]
        if T % tp:  # NOTE: uneven sequence shards abort the process group instead of raising
            raise LlamalabError(f"sequence parallelism over {tp} processes needs a sequence length divisible by "
                                f"{tp}, got {T} (set --seq-len)")
    return hook


def _sequence_parallel_plan() -> dict:
    """Norms on sequence shards; gather the sequence before each projection group, and
    reduce-scatter (instead of all-reduce) after it: same traffic, activations between blocks
    divided by tp."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    gather = lambda n: PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * n,  # noqa: E731
                                          desired_input_layouts=(Replicate(),) + (None,) * n, use_local_output=True)
    plan = {k: ColwiseParallel() if v == "col" else RowwiseParallel(output_layouts=Shard(1))
            for k, v in BLOCK_PLAN.items()}
    plan.update({"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                 "attention": gather(4), "feed_forward": gather(0)})
    return plan


def apply_tensor_parallel(model: nn.Module, device: torch.device, sequence_parallel: bool = False) -> nn.Module:
    """Shard every block's projections over all ranks (in place); returns ``model``.

    ``sequence_parallel``: the residual stream between blocks is split along the sequence (norms
    included); it is cut before the first block and gathered again before the final norm, so the
    embeddings, final norm and loss head see whole sequences.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    tp = dist.get_world_size()
    check_divisible(model, tp)
    if sequence_parallel:
        model.register_forward_pre_hook(_check_sequence_length(tp))
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    styles = {"col": ColwiseParallel, "row": RowwiseParallel}
    for block in model.layers:
        plan = _sequence_parallel_plan() if sequence_parallel else {k: styles[v]() for k, v in BLOCK_PLAN.items()}
        parallelize_module(block, mesh, plan)  # the attention counts its heads from wq/wk/wv: 1/tp each
    if sequence_parallel:
        # NOTE: the first block's input arrives whole (the embeddings are replicated): keep this rank's
        # slice of the sequence; the final norm gets the whole sequence back
        parallelize_module(model.layers[0], mesh, PrepareModuleInput(
            input_layouts=(Replicate(),) + (None,) * 4, desired_input_layouts=(Shard(1),) + (None,) * 4,
            use_local_output=True))
        parallelize_module(model.norm, mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    model.dp_world = 1  # read by the training step: every rank holds the same batch
    return model
