"""The lm-evaluation-harness adapter: request types mapped onto our scoring and generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalab.eval.lm_eval_adapter import LlamalabLMCore


@pytest.fixture(scope="module")
def core(eval_model):
    model, tok = eval_model
    return LlamalabLMCore(model=model, tokenizer=tok, batch_size=3, max_gen_toks=8)


def lm_eval_rolling_reference(model, ids: list[int], bos: int, L: int) -> float:
    """lm-eval's documented rolling windows: first [BOS]+t[:L-1] -> t[:L]; then each next block of up
    to L tokens predicted with a full L-token input window ending just before its last token."""
    total, done = 0.0, 0
    while done < len(ids):
        n = min(L, len(ids) - done)
        if done == 0:
            inp, tgt = [bos] + ids[:n - 1], ids[:n]
        else:
            end = done + n
            inp, tgt = ids[end - L - 1:end - 1], ids[done:end]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([inp])).float(), -1)[0]
        total += float(logp[-len(tgt):].gather(-1, torch.tensor(tgt)[:, None]).sum())
        done += n
    return total


def test_rolling_matches_lm_eval_windows(core, botchan_text):
    text = botchan_text[5000:7000]
    ids = core.tok.encode(text)
    assert len(ids) > 2 * core.max_length
    [ours] = core.rolling([text])
    ref = lm_eval_rolling_reference(core.model, ids, core.tok.bos_id, core.max_length)
    assert abs(ours - ref) < 1e-3


def test_loglikelihood_and_generation(core):
    res = core.loglikelihood_pairs([("The cat sat on the", " mat"), ("", "Hello there")])
    assert len(res) == 2 and all(ll < 0 and isinstance(g, bool) for ll, g in res)
    gens = core.generate([("It was a", {"until": ["\n"], "max_gen_toks": 5}),
                          ("It was a", {"until": [], "max_gen_toks": 8}),
                          ("My parents", {"until": ["\n"], "max_gen_toks": 5})])
    assert len(gens) == 3 and all("\n" not in g for g in (gens[0], gens[2]))
    assert gens[1].startswith(gens[0])  # the same greedy path, run longer


def test_registered_class_with_lm_eval_instances(eval_model_folder):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llamalab.eval.lm_eval_adapter import register

    cls = register()
    lm = cls.create_from_arg_string(f"pretrained={eval_model_folder},batch_size=2", {"device": "cpu"})
    reqs = [Instance("loglikelihood", {}, ("Question: who?\nAnswer:", " the boy"), 0),
            Instance("loglikelihood", {}, ("Question: who?\nAnswer:", " the master"), 1)]
    out = lm.loglikelihood(reqs)
    assert out == lm.core.loglikelihood_pairs([r.args for r in reqs])
    gen = lm.generate_until([Instance("generate_until", {}, ("It was", {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert isinstance(gen[0], str)


def test_harness_without_lm_eval_names_the_extra(eval_model_folder, monkeypatch, capsys):
    import sys

    from llamalab.cli import main as cli_main

    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry", "lm_eval.evaluator"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed, whether it is or not
    rc = cli_main(["eval", "harness", str(eval_model_folder), "--tasks", "arc_easy", "--limit", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["error: lm-evaluation-harness (lm_eval) is not installed; pip install 'llamalab[lm-eval]'"]


def test_device_is_the_one_the_machine_has(monkeypatch, capsys):
    """lm-eval passes its --device (cuda:0 by default in some front ends): without CUDA the machine's own is used."""
    from llamalab.eval.lm_eval_adapter import available_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_device("cuda:0") == "auto" and "does not have" in capsys.readouterr().err
    assert available_device("cuda") == "auto" and available_device(None) == "auto"
    assert available_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_device("cuda:0") == "cuda:0"
