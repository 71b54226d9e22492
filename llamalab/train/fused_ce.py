"""Fused, chunked output projection + cross-entropy for training: the (tokens x vocab) logits are
never materialised whole.

With a 32k vocabulary the logits dominate a small model's step: at stories15M's shape a 32 x 256
batch has 262M logits, 1 GiB in fp32, written and read again by log-softmax, its gradient and two
matmuls; on a CPU that is memory traffic (and page faults for fresh 1 GiB buffers) rather than
arithmetic. Here each chunk of ``chunk_rows`` tokens (~1k by default) does logits -> log-sum-exp ->
loss -> softmax gradient -> grad_h and grad_W (accumulated in place) in the forward pass, in one
reused 128 MiB buffer; backward only scales the two saved gradients. Same FLOPs as the plain path,
no logits tensor. Liger-Kernel's fused linear cross-entropy does the same on GPU.
On fp32 CPU tensors each chunk's log-sum-exp, loss and softmax gradient are one C pass per row
(:func:`llamalab.model.fused.xent_rows`) instead of six tensor passes over the chunk.
NOTE: chunks much smaller than ~1k rows make the three matmuls inefficient (128 rows ran 2x slower
on CPU than 1k).

Trade-offs: the gradients are computed in forward, so a forward whose loss is never backpropagated
wastes two matmuls (evaluation runs under ``no_grad`` and skips them). The loss sum is accumulated
chunk by chunk, so it differs from ``F.cross_entropy`` by fp32 rounding (~1e-6 relative).

Use: :func:`install_fused_head` swaps ``model.output`` for a :class:`FusedHead` holding the *same*
weight (parameter names, checkpoints and weight tying unchanged) before any parallel wrapper; then
:func:`fused_loss_sum(model, x, y)` arms it with the targets, so the model's own forward returns the
loss sum (DDP and FSDP see an ordinary forward). Unarmed, the head is an ordinary ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from llamalab.model import fused
from llamalab.train.step import IGNORE_INDEX


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (bf16/fp16 matmuls on GPU), else the input's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, written in place (out may be wider than a/b: fp32 logits of bf16 inputs)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def chunk_grads(dlogits: torch.Tensor, cdt: torch.dtype, w: torch.Tensor, hc: torch.Tensor, grad_h: torch.Tensor,
                grad_w: torch.Tensor) -> None:
    """A chunk's gradients from its logits' gradient: grad_h = dlogits @ W (written), grad_W += dlogits^T @ h."""
    g = dlogits.to(cdt)
    _mm(g, w, grad_h)
    if cdt == torch.float32:
        grad_w.addmm_(g.t(), hc)
    else:
        grad_w.add_(g.t() @ hc)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        cdt = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            return _LinearCrossEntropy._run(ctx, h, weight, targets, chunk_rows, cdt)

    @staticmethod
    def _run(ctx, h, weight, targets, chunk_rows, cdt):
        h2 = h.reshape(-1, h.shape[-1])
        t = targets.reshape(-1)
        w = weight.to(cdt)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h2) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        logits = None
        for i in range(0, h2.shape[0], chunk_rows):
            hc, tc = h2[i:i + chunk_rows].to(cdt), t[i:i + chunk_rows]
            n = hc.shape[0]
            if logits is None or logits.shape[0] != n:  # NOTE: one fp32 buffer reused by every chunk
                logits = torch.empty(n, w.shape[0], dtype=torch.float32, device=h.device)
            _mm(hc, w.t(), logits)
            losses = fused.xent_rows(logits, tc, IGNORE_INDEX, need_grad)  # one C pass per row (fp32 CPU)
            if losses is not None:
                total += losses.sum()
                if need_grad:
                    chunk_grads(logits, cdt, w, hc, grad_h[i:i + n], grad_w)
                continue
            valid = tc != IGNORE_INDEX
            safe = torch.where(valid, tc, 0)
            picked = logits.gather(1, safe[:, None])
            # log-sum-exp with a single exp pass, whose result is reused as the softmax
            peak = logits.amax(dim=-1, keepdim=True)
            logits.sub_(peak).exp_()
            sumexp = logits.sum(dim=-1, keepdim=True)
            total += ((peak + sumexp.log() - picked).squeeze(1) * valid).sum()
            if not need_grad:
                continue
            logits.mul_(valid[:, None] / sumexp)  # softmax, zero on ignored rows
            logits.scatter_add_(1, safe[:, None], -valid[:, None].to(logits.dtype))  # minus the one-hot
            chunk_grads(logits, cdt, w, hc, grad_h[i:i + n], grad_w)
        if need_grad:
            ctx.save_for_backward(grad_h.view_as(h), grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_rows: int = 0) -> torch.Tensor:
    """sum over targets != IGNORE_INDEX of CE(h @ weight.T, target), in chunks; h (..., D), weight (V, D)."""
    if chunk_rows <= 0:  # 128 MiB of fp32 logits per chunk: ~1k rows at 32k vocab, big enough for
        chunk_rows = max(256, (32 << 20) // weight.shape[0])  # efficient matmuls (128 rows ran 2x slower)
    return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows)


class FusedHead(nn.Linear):
    """``model.output`` that returns the loss sum instead of logits while armed with targets."""

    def __init__(self, linear: nn.Linear, chunk_rows: int = 0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: tying and state-dict names survive
        self.register_parameter("bias", None)
        self.chunk_rows = chunk_rows
        self.targets: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return super().forward(h)
        return linear_cross_entropy_sum(h, self.weight, self.targets, self.chunk_rows)


def install_fused_head(model: nn.Module, chunk_rows: int = 0) -> bool:
    """Swap ``model.output`` (a bias-free ``nn.Linear``) for a :class:`FusedHead`; True if done.

    The parameter object is unchanged, so an optimizer built earlier still holds it.
    NOTE: call before ``fully_shard`` / DDP, which take the modules as they find them.
    """
    out = getattr(model, "output", None)
    if isinstance(out, FusedHead):
        return True
    if type(out) is not nn.Linear or out.bias is not None:
        return False
    model.output = FusedHead(out, chunk_rows)
    return True


def find_fused_head(model: nn.Module) -> FusedHead | None:
    inner = model.module if hasattr(model, "module") else model
    head = getattr(inner, "output", None)
    return head if isinstance(head, FusedHead) else None


def fused_loss_sum(model: nn.Module, head: FusedHead, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's forward with ``head`` armed: the summed token loss, no logits tensor."""
    head.targets = y
    try:
        return model(x)
    finally:
        head.targets = None
