"""The shared step with non-token batches (preference pairs, PPO minibatches): the loss is averaged over
the global units, accumulation equals one big batch, statistics are averaged and logged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamalab.train.step import StepResult, batch_units, evaluate_loss, forward_backward


@dataclass
class Pairs:
    a: torch.Tensor  # (N, 3)
    b: torch.Tensor  # (N, 3)

    def to(self, device):
        return Pairs(self.a.to(device), self.b.to(device))

    def units(self) -> int:
        return self.a.shape[0]


def pair_loss(model, batch: Pairs):
    d = model(batch.a).squeeze(-1) - model(batch.b).squeeze(-1)  # (N,)
    return -torch.nn.functional.logsigmoid(d).sum(), {"accuracy": (d > 0).float().sum(), "margin": d.sum()}


def test_unit_batches_accumulate_like_one_batch_and_average_stats():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    grads = []
    results: list[StepResult] = []
    for split in ([slice(0, 6)], [slice(0, 2), slice(2, 6)]):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        res = forward_backward(model, [Pairs(a[s], b[s]) for s in split], loss_fn=pair_loss)
        grads.append(model.weight.grad.clone())
        results.append(res)
        with torch.no_grad():
            d = model(a).squeeze(-1) - model(b).squeeze(-1)
        assert abs(res.loss - float(-torch.nn.functional.logsigmoid(d).mean())) < 1e-6
        assert abs(res.stats["accuracy"] - float((d > 0).float().mean())) < 1e-6
        assert abs(res.stats["margin"] - float(d.mean())) < 1e-6
        assert res.n_tokens == 6
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    ev = evaluate_loss(model, [Pairs(a[:2], b[:2]), Pairs(a[2:], b[2:])], loss_fn=pair_loss, with_stats=True)
    assert abs(ev["loss"] - results[1].loss) < 1e-6 and abs(ev["accuracy"] - results[1].stats["accuracy"]) < 1e-6


def test_token_batches_unchanged():
    x = torch.tensor([[1, 2, 3]])
    y = torch.tensor([[2, -100, 4]])
    assert batch_units((x, y)) == 2
    emb = torch.nn.Sequential(torch.nn.Embedding(8, 8))
    res = forward_backward(emb, [(x, y)])
    logits = emb(x)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 8), y.view(-1), ignore_index=-100)
    assert abs(res.loss - float(ref)) < 1e-6 and res.stats == {}


@dataclass
class CountedPairs(Pairs):
    rows: int = 0

    def to(self, device):
        return CountedPairs(self.a.to(device), self.b.to(device), self.rows)

    def n_tokens(self) -> int:
        return self.rows


def test_throughput_counts_the_tokens_a_unit_batch_reads():
    """tokens/s and MFU of RM/DPO/PPO steps count the rows' tokens (n_tokens), not pairs: 16 pairs of 300 tokens
    per step printed "0 tok/s" before."""
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    model = torch.nn.Linear(3, 1)
    res = forward_backward(model, [CountedPairs(a[:2], b[:2], 700), CountedPairs(a[2:], b[2:], 1300)],
                           loss_fn=pair_loss)
    assert res.n_tokens == 6 and res.n_input_tokens == 2000
    assert forward_backward(model, [Pairs(a, b)], loss_fn=pair_loss).n_input_tokens == 6  # no n_tokens: units
