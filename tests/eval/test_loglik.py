"""Log-likelihood scoring against Hugging Face transformers on the same random weights, acc_norm,
and perplexity windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamalab.eval.loglik import (
    choice_metrics,
    document_nll,
    encode_pair,
    model_logits_fn,
    rolling_windows,
    score_text_pairs,
)
from llamalab.eval.tasks import choice_pairs, get_task, load_items
from tests.conftest import shared_path

transformers = pytest.importorskip("transformers")


def hf_twin(model):
    from llamalab.interop.hf import config_to_hf, state_to_hf

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(model.cfg).items()
                                         if k not in ("architectures", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(state_to_hf(model), strict=False)
    return hf


def hf_loglik(hf, ctx: list[int], cont: list[int]) -> float:
    """Reference: one unpadded sequence, log p of each continuation token, summed."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(hf(ids).logits.float(), -1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_multiple_choice_matches_hf(eval_model):
    model, tok = eval_model
    hf = hf_twin(model)
    task = get_task("arc_easy")
    items = load_items(task, shared_path("eval/arc/ARC-Easy-Dev.jsonl"), limit=6)
    pairs, per_item = [], []
    for it in items:
        p, conts = choice_pairs(task, it, items, "test")
        per_item.append((len(pairs), len(p), conts, it.fields["gold"]))
        pairs += p
    ours = score_text_pairs(model_logits_fn(model), tok, pairs, model.cfg.max_seq_len, batch_size=5)
    ref = [hf_loglik(hf, *encode_pair(tok, c, x)) for c, x in pairs]
    assert len(ours) == len(ref) == len(pairs) > 20
    for o, r in zip(ours, ref):
        assert abs(o.loglik - r) < 1e-4, (o.loglik, r)
    for start, n, conts, gold in per_item:  # same chosen answers under both metrics
        mine = choice_metrics([s.loglik for s in ours[start:start + n]], conts, gold)
        theirs = choice_metrics(ref[start:start + n], conts, gold)
        assert mine == theirs
        assert max(range(n), key=lambda i: ours[start + i].loglik) == max(range(n), key=lambda i: ref[start + i])


def test_long_context_is_truncated_from_the_left(eval_model):
    model, tok = eval_model
    hf = hf_twin(model)
    ctx_text = "It was a fine day in the country and " * 40
    ctx, cont = encode_pair(tok, ctx_text, "the master said nothing.")
    L = model.cfg.max_seq_len
    assert len(ctx) + len(cont) > L + 1
    [s] = score_text_pairs(model_logits_fn(model), tok, [(ctx_text, "the master said nothing.")], L)
    kept = (ctx + cont)[-(L + 1):]
    assert s.n_tokens == len(cont)
    assert abs(s.loglik - hf_loglik(hf, kept[:-len(cont)], cont)) < 1e-4


def test_encode_pair_moves_trailing_space(botchan_tokenizer):
    tok = botchan_tokenizer
    ctx, cont = encode_pair(tok, "Question: who?\nAnswer: ", "the schoolmaster")
    ctx2, cont2 = encode_pair(tok, "Question: who?\nAnswer:", " the schoolmaster")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx[0] == tok.bos_id and ctx + cont == tok.encode("Question: who?\nAnswer: the schoolmaster", bos=True)


def test_acc_norm_divides_by_characters():
    # raw sums prefer choice 0; per character choice 1 (-5.0 vs -0.857)
    m = choice_metrics([-10.0, -12.0], [" a", " a much longer one"], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # characters vs bytes differ for non-ASCII: "éé" is 2 characters but 4 bytes
    lls = [-2.2, -3.0]
    m = choice_metrics(lls, ["éé", "abc"], gold=0)
    assert (-2.2 / 2 < -3.0 / 3) and m["acc_norm"] == 0.0  # per character: choice 1 wins
    assert m["acc_bytes"] == 1.0 and m["acc"] == 1.0  # per byte -0.55 > -1.0: choice 0 wins


@pytest.mark.parametrize("n,L,stride", [(10, 16, 16), (100, 16, 16), (100, 16, 5), (17, 16, 1), (2, 4, 4)])
def test_rolling_windows_score_each_token_once(n, L, stride):
    scored = []
    for start, end, first in rolling_windows(n, L, stride):
        assert end - 1 - start <= L  # inputs fit the context
        assert first - start >= min(L - stride, first)  # at least L - stride tokens of left context
        scored += list(range(first, end))
    assert scored == list(range(1, n))


def test_document_nll_matches_hf(eval_model, botchan_text):
    model, tok = eval_model
    hf = hf_twin(model)
    ids = tok.encode(botchan_text[:3000], bos=True)
    L = model.cfg.max_seq_len
    assert len(ids) > L + 10
    fn = model_logits_fn(model)
    # short document: one window, equals the full-sequence NLL
    short = ids[:100]
    nll, n = document_nll(fn, short, L, L)
    assert n == 99 and abs(-nll - hf_loglik(hf, short[:1], short[1:])) < 1e-3
    # long document with overlapping windows: each window's new tokens scored with the window's context
    stride = 64
    nll, n = document_nll(fn, ids, L, stride)
    ref = sum(hf_loglik(hf, ids[s:f], ids[f:e]) for s, e, f in rolling_windows(len(ids), L, stride))
    assert n == len(ids) - 1 and abs(-nll - ref) < 1e-3
    assert math.isfinite(nll / n) and nll / n > 0


def test_acc_norm_counts_the_choice_not_its_leading_space():
    """lm-eval: the continuation is " " + choice and acc_norm divides by len(choice). With the space counted this
    item flips: -10/5 > -12.4/6 picks choice 0; lm-eval's -10/4 < -12.4/5 picks choice 1."""
    m = choice_metrics([-10.0, -12.4], [" abcd", " abcde"], gold=1)
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0 and m["acc_bytes"] == 1.0
    assert choice_metrics([-10.0, -12.4], ["abcd", "abcde"], gold=1)["acc_norm"] == 1.0  # no delimiter: as is


def test_letter_choices_score_their_shared_context_once(eval_model):
    """MMLU's " A".." D": one forward of the shared context scores all four (the same numbers as one by one)."""
    model, tok = eval_model
    fn = model_logits_fn(model)
    rows = []

    def counting(x):
        rows.append(x.shape[0])
        return fn(x)

    task = get_task("mmlu")
    items = load_items(task, shared_path("eval/mmlu.jsonl.gz"), limit=3)
    pairs = [p for it in items for p in choice_pairs(task, it, items, "test")[0]]
    enc = [encode_pair(tok, c, x) for c, x in pairs]
    assert len(pairs) == 12 and all(len(cont) == 1 for _, cont in enc)
    together = score_text_pairs(counting, tok, pairs, model.cfg.max_seq_len, batch_size=16)
    assert sum(rows) == 3  # one row per question, not per choice
    alone = [score_text_pairs(fn, tok, [p], model.cfg.max_seq_len)[0] for p in pairs]
    for a, b in zip(together, alone):
        assert abs(a.loglik - b.loglik) < 1e-5 and a.is_greedy == b.is_greedy and a.n_tokens == b.n_tokens == 1


def test_encode_pair_follows_lm_eval_on_whitespace_and_empty_context(botchan_tokenizer):
    tok = botchan_tokenizer
    # every trailing whitespace character moves to the continuation (lm-eval's context.rstrip())
    ctx, cont = encode_pair(tok, "Question: who?\nAnswer:\n", "the schoolmaster")
    assert ctx == tok.encode("Question: who?\nAnswer:", bos=True)
    # an empty context is lm-eval's prefix token (BOS, else EOS) with the continuation encoded alone
    assert encode_pair(tok, "", "Hello there") == ([tok.bos_id], tok.encode("Hello there"))
