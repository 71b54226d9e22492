"""Tensor parallelism (Megatron-LM style) for the Transformer's blocks, with DTensor.

In every block the q/k/v and gate/up projections are split by output features (column-wise: each
rank computes its own heads and its own slice of the SwiGLU hidden layer) and the attention output
and down projections by input features (row-wise), so a block costs two all-reduces of the
activations in forward and two in backward, and each rank holds 1/tp of the block weights. The
embeddings, norms and output head stay whole on every rank (replicated, computed redundantly):
for the small models this runs on that costs little; sequence parallelism for the norms and a
vocabulary-parallel loss are the next steps for large ones.

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


def apply_tensor_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard every block's projections over all ranks (in place); returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = dist.get_world_size()
    check_divisible(model, tp)
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    styles = {"col": ColwiseParallel, "row": RowwiseParallel}
    for block in model.layers:
        parallelize_module(block, mesh, {k: styles[v]() for k, v in BLOCK_PLAN.items()})
        # NOTE: the attention reshapes by its head counts: each rank now holds 1/tp of the heads
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp
    model.dp_world = 1  # read by the training step: every rank holds the same batch
    return model
