"""Packing: an example's logits packed with others equal its logits alone; targets stay inside it."""

from __future__ import annotations

import random

import torch

from llamalab.finetune.data import Example
from llamalab.finetune.packing import (
    collate,
    pack_rows,
    packed_mask,
    sft_forward,
    sft_loss,
)
from llamalab.model import Transformer
from llamalab.train.step import IGNORE_INDEX


def _examples(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        L = rng.randint(lo, hi)
        ids = [1] + [rng.randrange(3, vocab) for _ in range(L - 1)]
        mask = [0] * (L // 2) + [1] * (L - L // 2)
        out.append(Example(ids, mask, f"ex{k}"))
    return out


def test_packed_logits_equal_alone(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    exs = _examples(3, 10, 20, tiny_config.vocab_size)
    x, _ = collate(exs, [[0, 1, 2]], pad_id=0, seq_len=tiny_config.max_seq_len)
    assert x.shape == (1, 2, 64) and int(x[0, 1].max()) == 3
    with torch.no_grad():
        packed = sft_forward(model, x)[0]
        leaky = model(x[:, 0])[0]  # plain causal attention over the whole row
        pos = 0
        for k, ex in enumerate(exs):
            alone = model(torch.tensor([ex.ids]))[0]
            got = packed[pos:pos + len(ex)]
            torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)
            if k > 0:  # the control: without the block mask later examples see earlier ones
                assert (leaky[pos:pos + len(ex)] - alone).abs().max() > 1e-3
            pos += len(ex)


def test_targets_never_cross_boundaries():
    exs = _examples(4, 5, 9, 100, seed=1)
    x, y = collate(exs, [[0, 1], [2, 3]], pad_id=0)
    for b, row in enumerate([[0, 1], [2, 3]]):
        pos = 0
        for i in row:
            ex = exs[i]
            n = len(ex)
            want = [ex.ids[t + 1] if ex.mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
            assert y[b, pos:pos + n].tolist() == want
            pos += n
        assert (y[b, pos:] == IGNORE_INDEX).all() and (x[b, 1, pos:] == 0).all()


def test_pack_rows_best_fit_covers_every_example_once():
    exs = _examples(200, 5, 60, 100, seed=2)
    rows = pack_rows(exs, 64, packing=True, seed=3)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(200))
    assert all(sum(len(exs[i]) for i in r) <= 64 for r in rows)
    fill = sum(len(e) for e in exs) / (64 * len(rows))
    assert fill > 0.9, fill
    assert len(pack_rows(exs, 64, packing=False)) == 200


def test_mask_skipped_for_single_example_rows_and_loss_matches(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    exs = _examples(2, 10, 20, tiny_config.vocab_size, seed=4)
    x, y = collate(exs, [[0], [1]], pad_id=0)
    assert packed_mask(x[:, 1]) is None
    xp, yp = collate(exs, [[0, 1]], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(model, x, y), sft_loss(model, xp, yp), atol=1e-4, rtol=1e-5)
