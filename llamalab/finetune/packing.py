"""Packing SFT examples into full-length rows, with attention that stays inside each example.

Each example of length L contributes L inputs and L targets: target t is token t+1 where the loss
mask of token t+1 is 1 (assistant content and its EOS), else ``IGNORE_INDEX``; the example's last
position has no target (nothing of the same example follows it). So no target ever crosses an
example boundary.

Rows: best-fit of the (shuffled) examples into rows of ``seq_len`` tokens, padding the rest
(pad tokens have target ``IGNORE_INDEX``). ``packing=False`` gives one example per row, padded
only to the longest row of the micro-batch.

Attention: the trainer hands ``loss_fn(model, x, y)`` one tensor ``x``; here ``x`` is ``(B, 2, T)``
(row 0: token ids, row 1: segment ids, 1..k for the examples of a row, 0 for padding), so that
:class:`~llamalab.train.trainer.Trainer` needs no change. :func:`packed_mask` builds the
block-diagonal causal mask ``(B, 1, T, T)`` (True = may attend) passed to the model.

Batches: ``epochs * ceil(rows / batch_size)`` steps (:func:`plan_steps`); global batch ``b`` is a
slice of epoch ``b // per_epoch``'s shuffled rows (:func:`make_batch_fn`), a pure function of ``b``,
so resume, rollback and a resize replay the same data.

RoPE positions are NOT restarted per example (HF/TRL restart them through ``position_ids``; our
``Transformer`` takes only a ``start_pos``). This is equivalent: RoPE makes the score of query m and
key n a function of m - n only, and the mask keeps both inside one example, so an example's logits
are the same at any offset (up to fp32 rounding of the rotation angles, ~1e-6 relative, checked in
tests/finetune). Cost of the mask: SDPA cannot use its causal fast path with an explicit mask
(on CPU the math kernel, O(T^2) mask memory per row); rows holding a single example skip the mask.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from llamalab.finetune.data import Example
from llamalab.train.step import IGNORE_INDEX, token_loss_sum


def targets_of(ex: Example) -> list[int]:
    """Next-token targets of one example: ids[t+1] where mask[t+1], else IGNORE_INDEX."""
    tgt = [ex.ids[t + 1] if ex.mask[t + 1] else IGNORE_INDEX for t in range(len(ex) - 1)]
    return tgt + [IGNORE_INDEX]


def pack_rows(examples: Sequence[Example], seq_len: int, packing: bool = True, seed: int = 0) -> list[list[int]]:
    """Rows as lists of example indices. Best fit in a seeded shuffled order (the row order is
    shuffled again per epoch by the caller)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if not packing:
        return [[i] for i in order]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in order:
        n = len(examples[i])
        if n > seq_len:
            raise ValueError(f"example {examples[i].where} has {n} tokens > seq_len {seq_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            if seq_len - n > 0:
                bisect.insort(free, (seq_len - n, len(rows) - 1))
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int,
            seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of examples -> (x (B, 2, T) tokens and segment ids, y (B, T) targets). T is ``seq_len``
    or the longest row."""
    lens = [sum(len(examples[i]) for i in r) for r in rows]
    T = seq_len or max(lens)
    x = torch.full((len(rows), 2, T), 0, dtype=torch.long)
    x[:, 0] = pad_id
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        pos = 0
        for seg, i in enumerate(r, 1):
            ex = examples[i]
            n = len(ex)
            x[b, 0, pos:pos + n] = torch.tensor(ex.ids)
            x[b, 1, pos:pos + n] = seg
            y[b, pos:pos + n] = torch.tensor(targets_of(ex))
            pos += n
    return x, y


def packed_mask(seg: torch.Tensor) -> torch.Tensor | None:
    """Block-diagonal causal mask (B, 1, T, T) from segment ids (B, T); None when every row holds
    at most one example (then plain causal attention is exact, padding being at the end)."""
    if int(seg.max()) <= 1:
        return None
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    return (same & causal)[:, None]


def sft_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of packed input ``x`` (B, 2, T)."""
    return model(x[:, 0], mask=packed_mask(x[:, 1]))


def sft_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Trainer's ``loss_fn``: summed cross-entropy over assistant targets of packed rows."""
    return token_loss_sum(sft_forward(model, x), y)


def pad_id_of(tok: Any) -> int:
    """The id right-padding uses: the tokenizer's pad id, else its EOS, else 0 (pad positions carry no loss and,
    for a reward model, are never read: rewards come from the last real token)."""
    return next(i for i in (tok.pad_id, tok.eos_id, 0) if i >= 0)


def plan_steps(n_rows: int, batch_size: int, epochs: float, steps: int = 0) -> tuple[int, int, int]:
    """(rows per global batch, steps per epoch, total steps): ``steps``, or ``epochs`` over the rows."""
    g = min(batch_size, n_rows)
    per_epoch = math.ceil(n_rows / g)
    return g, per_epoch, steps or max(1, math.ceil(epochs * per_epoch))


def batch_indices(n: int, g: int, per_epoch: int, seed: int, b: int, rank: int = 0,
                  world: int = 1) -> tuple[list[int], list[int]]:
    """Global batch ``b`` of ``n`` items: the indices of its (up to) ``g`` items, those of epoch ``b // per_epoch``
    in that epoch's seeded shuffle, and this rank's contiguous share of them (empty for a rank left without items
    in an epoch's short last batch). A pure function of ``b``, independent of the world size, so resume, rollback
    and a resize replay exactly; SFT rows, reward-model pairs and DPO pairs are batched by it."""
    epoch, j = divmod(b, per_epoch)
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    picked = order[j * g:(j + 1) * g]
    share = -(-len(picked) // world)
    return picked, picked[rank * share:(rank + 1) * share]


def make_batch_fn(examples: list[Example], rows: list[list[int]], g: int, per_epoch: int, micro: int,
                  pad_id: int, seed: int, rank: int = 0, world: int = 1
                  ) -> Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``batch(b)``: this rank's share of global batch b = rows of epoch b // per_epoch in that
    epoch's shuffled order (a pure function of b and independent of the world size, so resume,
    rollback and a resize replay exactly). Ranks take contiguous slices of the global rows.

    NOTE: an epoch's last batch can hold fewer rows than ranks; a rank left without rows gets one
    all-padding row with no targets, so every rank still runs backward (DDP would hang otherwise)
    and the loss and gradients are unchanged.
    """

    def batch(b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        picked, mine = ([rows[i] for i in ix] for ix in batch_indices(len(rows), g, per_epoch, seed, b, rank, world))
        if not mine:
            x, y = collate(examples, picked[:1], pad_id)
            x[:, 0], x[:, 1], y[:] = pad_id, 0, IGNORE_INDEX  # padding tokens, no segment, no targets
            return [(x, y)]
        return [collate(examples, mine[k:k + micro], pad_id) for k in range(0, len(mine), micro)]

    return batch


def eval_batches(examples: Sequence[Example], rows: Sequence[Sequence[int]], micro: int,
                 pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every row once, ``micro`` rows at a time, in order (for a validation loss)."""
    for k in range(0, len(rows), micro):
        yield collate(examples, rows[k:k + micro], pad_id)
