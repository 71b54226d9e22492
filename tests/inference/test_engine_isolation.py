"""A failure inside the engine ends the request that caused it, and only that one."""

from __future__ import annotations

import pytest

import llamalab.inference.sampling as sampling
from llamalab.inference.engine import Engine
from llamalab.inference.sampling import SamplingParams
from tests.inference.conftest import small_model

PROMPTS = ["Once upon a time", "The cat sat", "In a hole in the ground", "It was a bright cold day"]
POISON = 666


@pytest.fixture
def engine(llama_tok):
    return Engine(small_model(), llama_tok, slots=4)


def _params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=10, temperature=0.8, seed=seed, ignore_eos=True)


def test_sampling_failure_ends_only_its_request(engine, llama_tok, monkeypatch):
    solo = {s: engine.generate([PROMPTS[i]], _params(s))[0] for i, s in enumerate((1, 2, 3))}
    real = sampling.sample_row

    def poisoned(logits, p, gen):
        if p.seed == POISON:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, p, gen)

    monkeypatch.setattr(sampling, "sample_row", poisoned)
    outs = engine.generate([PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[2]],
                           [_params(1), _params(POISON), _params(2), _params(3)])
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    for out, s in zip([outs[0], outs[2], outs[3]], (1, 2, 3)):
        assert out.finish_reason == "length" and out.token_ids == solo[s].token_ids and out.text == solo[s].text
    assert engine.stats["failed"] == 1 and not engine.has_work()


def test_failing_request_delta_says_why(engine, monkeypatch):
    monkeypatch.setattr(sampling, "sample_row", lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    engine.add(engine.encode(PROMPTS[0]), _params(5), request_id="bad")
    deltas = [d for _ in range(3) for d in engine.step()]
    assert [(d.request_id, d.finished, d.finish_reason) for d in deltas] == [("bad", True, "error")]
    assert "ValueError: boom" in deltas[0].error


def test_prefill_failure_ends_only_its_request(engine, monkeypatch):
    real = engine.runner.prefill
    bad_len = len(engine.encode(PROMPTS[2]))
    assert bad_len not in {len(engine.encode(p)) for p in (PROMPTS[0], PROMPTS[1])}

    def prefill(slot, ids, all_logits=False):
        if len(ids) == bad_len:
            raise RuntimeError("out of memory")
        return real(slot, ids, all_logits)

    ref = Engine(small_model(), engine.tokenizer, slots=4).generate([PROMPTS[0], PROMPTS[1]],
                                                                    [_params(1), _params(2)])
    monkeypatch.setattr(engine.runner, "prefill", prefill)
    outs = engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [_params(1), _params(7), _params(2)])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert [outs[0].token_ids, outs[2].token_ids] == [ref[0].token_ids, ref[1].token_ids]
    monkeypatch.setattr(engine.runner, "prefill", real)
    assert engine.generate([PROMPTS[2]], _params(7))[0].finish_reason == "length"  # the engine still serves


def test_decode_failure_spares_waiting_requests(llama_tok, monkeypatch):
    engine = Engine(small_model(), llama_tok, slots=1)
    real, calls = engine.runner.decode, []

    def decode(tokens):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(tokens)

    monkeypatch.setattr(engine.runner, "decode", decode)
    outs = engine.generate([PROMPTS[0], PROMPTS[1]], [_params(1), _params(2)])
    assert outs[0].finish_reason == "error" and outs[1].finish_reason == "length"
    assert len(outs[1].token_ids) == 10
