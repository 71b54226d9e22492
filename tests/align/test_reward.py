"""Reward models: the ranking loss against hand computations, training on the synthetic marker preference
(held-out accuracy), LoRA, resume, scoring files, HF export against transformers, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamalab.align.data import EncodedPair, collate_pairs
from llamalab.align.reward import (
    RewardModel,
    load_reward_model,
    ranking_loss,
    ranking_losses,
    reward_model_from,
    score_texts,
)
from llamalab.common import LlamalabError
from llamalab.run_dir import RunDir

from .conftest import synthetic_pairs, write_jsonl


def _rm_cfg(base: Path, data: Path, run_dir: Path, **kw):
    from llamalab.commands import rm

    opts = dict(base=str(base), data=[str(data)], run_dir=str(run_dir), batch_size=16, heldout_fraction=0.25,
                eval_interval=4, device="cpu", optim=rm.RMOptimConfig(lr=3e-3))
    opts.update(kw)
    return rm.Config(**opts)


def _run_rm(cfg):
    from llamalab.commands import rm

    return rm.main(cfg)


# ----------------------------------------------------------------------------- the loss


def _nll_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log sigmoid(x)


class TableRM(torch.nn.Module):
    """A stand-in reward model: the reward of a row is table[token at last_index]."""

    def __init__(self, table: list[float]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table))

    def forward(self, tokens, last_index=None):
        return self.table[tokens[torch.arange(tokens.shape[0]), last_index]]


def test_ranking_loss_equals_hand_computation_with_and_without_margin():
    r_c, r_r, m = [2.0, 0.5, -1.0, 3.0], [1.0, 1.5, -1.0, -2.0], [0.0, 0.5, 1.0, 1 / 3]
    got = ranking_losses(torch.tensor(r_c), torch.tensor(r_r), torch.tensor(m))
    want = [_nll_sigmoid(c - r - mm) for c, r, mm in zip(r_c, r_r, m)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    no_margin = ranking_losses(torch.tensor(r_c), torch.tensor(r_r))
    assert torch.allclose(no_margin, torch.tensor([_nll_sigmoid(c - r) for c, r in zip(r_c, r_r)]), atol=1e-6)
    assert abs(float(no_margin[0]) - 0.31326168751822286) < 1e-6  # log(1 + e^-1)

    # through the Trainer loss_fn on a PairBatch: rows end in token i, whose reward is table[i]
    table = r_c + r_r
    pairs = [EncodedPair([9, 9, i], [9, 5, 9, 4 + i], 1, mm) for i, mm in enumerate(m)]
    batch = collate_pairs(pairs, pad_id=0)
    loss, stats = ranking_loss(TableRM(table + [0.0] * 10), batch)
    assert abs(float(loss.detach()) - sum(want)) < 1e-5
    assert float(stats["accuracy"]) == 2.0  # pairs 0 and 3 (a tie is not a win)
    assert abs(float(stats["margin"]) - sum(c - r for c, r in zip(r_c, r_r))) < 1e-6


def test_reward_model_reads_the_last_real_token_and_keeps_the_base_weights(align_base):
    from llamalab.model.folder import load_model

    base, _ = load_model(align_base)
    torch.manual_seed(0)
    rm = reward_model_from(base)
    assert "output.weight" not in rm.state_dict() and rm.score.weight.shape == (1, base.cfg.dim)
    for k, v in base.state_dict().items():
        if k != "output.weight":
            assert torch.equal(rm.state_dict()[k], v), k
    tokens = torch.randint(1, base.cfg.vocab_size, (3, 12))
    last = torch.tensor([11, 4, 0])
    padded = tokens.clone()
    padded[1, 5:] = 0  # padding after the last real token changes nothing
    got = rm(padded, last_index=last)
    for i in range(3):
        h = base.hidden(tokens[i:i + 1, :last[i] + 1])[0, -1]  # the base's hidden state of the prefix alone
        assert abs(float(got[i]) - float(h @ rm.score.weight[0])) < 1e-4


# ----------------------------------------------------------------------------- training


def test_reward_model_learns_the_marker_preference(tmp_path, align_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(160, seed=0))
    out = _run_rm(_rm_cfg(align_base, data, tmp_path / "rm"))
    before, after = out["heldout"]["before"], out["heldout"]["after"]
    assert after["pairs"] >= 25 and out["split"]["train"] + after["pairs"] == 160
    assert after["accuracy"] > 0.95 and after["margin"] > 1.0, after
    assert before["accuracy"] < 0.9  # it was not already solved by the random head
    run = RunDir(tmp_path / "rm")
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert all({"loss", "accuracy", "margin"} <= set(r) for r in rows)
    # tokens/s counts the pairs' tokens: tokens_seen grows by far more than the pairs of a step
    assert rows[0]["tokens_seen"] > 10 * out["split"]["train"] / max(1, out["steps"])
    vals = [r for r in rows if "val_accuracy" in r]
    assert "val_pairs" not in vals[-1]  # a count, not a metric
    assert vals and vals[-1]["step"] == out["steps"] and abs(vals[-1]["val_accuracy"] - after["accuracy"]) < 1e-9
    meta = json.loads(run.meta.read_text())
    assert meta["kind"] == "reward_model" and meta["base"]["weights_sha256"]
    assert meta["data"]["files"][0]["sha256"]
    pytest.importorskip("matplotlib")
    assert 'alt="Accuracy"' in run.report.read_text() and 'alt="Margin"' in run.report.read_text()
    # the folder loads for scoring and agrees with the held-out numbers' direction
    rm, tok, rm_meta = load_reward_model(run.root)
    assert rm_meta["kind"] == "reward" and rm_meta["chat_template"] == "llama2"
    p = synthetic_pairs(1, seed=99)[0]
    conv = [{"role": "user", "content": p["prompt"]}]
    r_c, r_r = score_texts(rm, tok, "llama2", [conv + [{"role": "assistant", "content": p["chosen"]}],
                                               conv + [{"role": "assistant", "content": p["rejected"]}]])
    assert r_c > r_r


def test_lora_reward_model_trains_only_adapters_and_head(tmp_path, align_base):
    from llamalab.finetune.lora import LoRAConfig

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(48, seed=1))
    out = _run_rm(_rm_cfg(align_base, data, tmp_path / "rm", steps=2, lora=LoRAConfig(rank=4, dropout=0.0)))
    run = RunDir(tmp_path / "rm")
    ckpt = load_file(str(run.checkpoint(2) / "model" / "model.safetensors"))
    base = load_file(str(align_base / "model.safetensors"))
    lora = {k: v for k, v in ckpt.items() if ".lora_" in k}
    assert lora and any(float(v.abs().sum()) > 0 for k, v in lora.items() if k.endswith("lora_B"))
    for k, v in base.items():  # every base weight is untouched
        if k != "output.weight":
            assert torch.equal(ckpt[k], v), k
    meta = json.loads(run.meta.read_text())
    assert meta["trainable_params"] == sum(v.numel() for v in lora.values()) + ckpt["score.weight"].numel()
    torch.manual_seed(1337)  # the run's seed: the head it started from
    from llamalab.model.folder import load_model

    start = reward_model_from(load_model(align_base)[0]).score.weight
    assert not torch.equal(ckpt["score.weight"], start)  # the head trained
    assert (run.adapter / "adapter_model.safetensors").exists()
    rm, _, _ = load_reward_model(out["model"])  # merged
    assert not any(".lora_" in k for k in rm.state_dict())


def test_resume_equals_a_straight_run(tmp_path, align_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(64, seed=2))
    straight = _run_rm(_rm_cfg(align_base, data, tmp_path / "a", steps=4, batch_size=8, eval_interval=2))
    _run_rm(_rm_cfg(align_base, data, tmp_path / "b", steps=4, batch_size=8, eval_interval=2, stop_after=2,
                    checkpoint_interval=1))
    resumed = _run_rm(_rm_cfg(align_base, data, tmp_path / "b", steps=4, batch_size=8, eval_interval=2, resume=True))
    a = load_file(str(Path(straight["model"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["model"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in RunDir(tmp_path / "a").metrics.read_text().splitlines()]
    lb = [json.loads(x) for x in RunDir(tmp_path / "b").metrics.read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r.get("val_accuracy") for r in la] == [r.get("val_accuracy") for r in lb]
    assert resumed["heldout"]["after"] == straight["heldout"]["after"]


# ----------------------------------------------------------------------------- scoring files


@pytest.fixture
def random_rm(tmp_path, align_base, align_tok) -> Path:
    """A reward model folder with random weights (no training)."""
    from llamalab.align.reward import save_reward_model
    from llamalab.model.folder import load_model

    torch.manual_seed(3)
    rm = reward_model_from(load_model(align_base)[0])
    return save_reward_model(tmp_path / "rm_model", rm, align_tok, "llama2")


def test_rm_score_writes_a_reward_per_record(tmp_path, random_rm, align_tok):
    from llamalab.commands import rm_score

    recs = synthetic_pairs(3, seed=4)
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello, friend.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.", "id": "hh-1"}
    answers = [{"prompt": "Tell me about the inn.", "response": "It is old."},
               {"messages": [{"role": "user", "content": "Tell me about the inn."},
                             {"role": "assistant", "content": "It is old."}]}]
    data = write_jsonl(tmp_path / "mixed.jsonl", recs + [hh] + answers)
    out = tmp_path / "rewards.jsonl"
    summary = rm_score.main(rm_score.Config(rm=str(random_rm), data=[str(data)], out=str(out), device="cpu",
                                            summary=str(tmp_path / "s.json"), batch_size=3))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{data}:{i}" for i in range(1, 7)]
    assert rows[3]["id"] == "hh-1"
    rm, tok, _ = load_reward_model(random_rm)
    for rec, row in zip(recs, rows):  # each pair scored as prompt + answer, independently of the batch
        conv = [{"role": "user", "content": rec["prompt"]}]
        want = score_texts(rm, tok, "llama2", [conv + [{"role": "assistant", "content": rec["chosen"]}],
                                               conv + [{"role": "assistant", "content": rec["rejected"]}]],
                           batch_size=1)
        assert abs(row["reward_chosen"] - want[0]) < 1e-4 and abs(row["reward_rejected"] - want[1]) < 1e-4
        assert row["chosen_wins"] == (want[0] > want[1])
    assert abs(rows[4]["reward"] - rows[5]["reward"]) < 1e-5  # the same conversation in two shapes
    assert summary["pairs"] == 4 and summary["answers"] == 2
    assert summary["pair_accuracy"] == sum(r["chosen_wins"] for r in rows[:4]) / 4
    assert json.loads((tmp_path / "s.json").read_text())["records"] == 6


def test_hf_export_scores_like_llamalab(tmp_path, random_rm):
    transformers = pytest.importorskip("transformers")
    from llamalab.interop.convert import convert

    _, to, dst = convert(random_rm, tmp_path / "hf")
    assert to == "hf"
    hf_cfg = json.loads((dst / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"] and hf_cfg["num_labels"] == 1
    pad = hf_cfg["pad_token_id"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(dst), dtype=torch.float32).eval()
    rm, _, _ = load_reward_model(random_rm)
    g = torch.Generator().manual_seed(0)
    lengths = [12, 7, 3]
    tokens = torch.full((3, 12), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(0, rm.cfg.vocab_size, (n,), generator=g)
        row[row == pad] = pad + 1
        tokens[i, :n] = row
    with torch.no_grad():
        ours = rm(tokens, last_index=torch.tensor(lengths) - 1)
        theirs = hf(input_ids=tokens).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_named_or_counted(tmp_path, align_base, random_rm):
    from llamalab.commands import rm_score

    good = synthetic_pairs(40, seed=5)
    bad = write_jsonl(tmp_path / "bad.jsonl", good[:3] + ["{not json"] + good[3:])
    with pytest.raises(LlamalabError, match=r"bad\.jsonl:4"):
        _run_rm(_rm_cfg(align_base, bad, tmp_path / "r1", steps=1))
    with pytest.raises(LlamalabError, match=r"bad\.jsonl:4"):
        rm_score.main(rm_score.Config(rm=str(random_rm), data=[str(bad)], out=str(tmp_path / "o.jsonl"),
                                      device="cpu"))
    s = rm_score.main(rm_score.Config(rm=str(random_rm), data=[str(bad)], out=str(tmp_path / "o.jsonl"),
                                      device="cpu", on_error="skip"))
    assert s["skipped"] == {"malformed": 1} and s["pairs"] == 40

    same = dict(good[0], rejected=good[0]["chosen"])
    empty = dict(good[1], chosen="  ")
    counted = write_jsonl(tmp_path / "counted.jsonl", [same, empty] + good[2:])
    _run_rm(_rm_cfg(align_base, counted, tmp_path / "r2", steps=1, max_len=64))
    ledger = json.loads(RunDir(tmp_path / "r2").preference_data.read_text())
    assert ledger["dropped"]["identical"] == 1 and ledger["dropped"]["empty_answer"] == 1
    assert ledger["read"] == 40 and ledger["kept"] + sum(ledger["dropped"].values()) == 40

    with pytest.raises(LlamalabError, match="not a reward model"):
        load_reward_model(align_base)
    from llamalab.model.folder import load

    with pytest.raises(LlamalabError, match="a reward model"):  # the LM loader names it instead of failing on tensors
        load(random_rm)
    with pytest.raises(LlamalabError, match="heldout-fraction"):
        _run_rm(_rm_cfg(align_base, counted, tmp_path / "r3", heldout_fraction=1.0))
    with pytest.raises(LlamalabError, match="assistant"):
        rm, tok, _ = load_reward_model(random_rm)
        score_texts(rm, tok, "llama2", [[{"role": "user", "content": "hi"}]])


def test_reward_model_class_round_trips_through_its_folder(tmp_path, tiny_config, align_tok):
    from llamalab.align.reward import save_reward_model

    tiny_config.vocab_size = align_tok.vocab_size
    tiny_config.tie_embeddings = True
    torch.manual_seed(0)
    rm = RewardModel(tiny_config)
    folder = save_reward_model(tmp_path / "tied", rm, align_tok, "chatml")
    back, _, meta = load_reward_model(folder)
    assert meta["chat_template"] == "chatml"
    x = torch.randint(0, tiny_config.vocab_size, (2, 9))
    assert torch.allclose(rm(x, last_index=torch.tensor([8, 3])), back(x, last_index=torch.tensor([8, 3])))
