"""DPO: the losses against hand computations; training on the synthetic marker-word preference raises the chosen
answers' log-prob ratio and the held-out implicit-reward accuracy; LoRA trains only adapters; the reference is
cached and resume equals a straight run; the live reference equals the cached one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamalab.align.data import PairBatch
from llamalab.align.dpo import DPOBatch, dpo_loss_fn
from llamalab.align.losses import dpo_loss, reward_accuracy
from llamalab.commands.dpo import Config
from llamalab.commands.dpo import main as dpo_main
from llamalab.common import LlamalabError
from llamalab.config import from_dict
from llamalab.model.folder import load_model
from tests.align.conftest import synthetic_pairs, write_jsonl


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_and_ipo_losses_equal_hand_computations():
    pc, pr = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.0])
    rc, rr = torch.tensor([-3.5, -5.0, -1.0]), torch.tensor([-3.5, -4.0, -3.0])
    beta = 0.5
    t = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(3):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        assert float(t.losses[i]) == pytest.approx(-math.log(_sig(beta * h)), rel=1e-6)
        assert float(t.chosen_rewards[i]) == pytest.approx(beta * (float(pc[i]) - float(rc[i])))
        assert float(t.rejected_rewards[i]) == pytest.approx(beta * (float(pr[i]) - float(rr[i])))
        eps = 0.1
        ls = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps).losses[i]
        assert float(ls) == pytest.approx(-(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h)))
        ipo = dpo_loss(pc, pr, rc, rr, beta, loss="ipo").losses[i]
        assert float(ipo.detach()) == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)
    # pair 0: h = 0.5 - (-0.5) = 1 > 0; pair 1: h = 0 - (-0.5) = 0.5; pair 2: h = -1 - 1 = -2
    assert reward_accuracy(t.chosen_rewards, t.rejected_rewards).tolist() == [1.0, 1.0, 0.0]
    assert reward_accuracy(torch.zeros(2), torch.zeros(2)).tolist() == [0.5, 0.5]


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a fixed tensor (rows of the batch pick their own)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits[: tokens.shape[0], : tokens.shape[1]]
        return logits if keep is None else logits[keep]  # as Transformer.forward's keep


def test_dpo_loss_fn_on_fixed_logits_sums_answer_logprobs_only():
    torch.manual_seed(0)
    V, T = 5, 4
    logits = torch.randn(2, T, V)
    tokens = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 4]])  # chosen row, rejected row; prompt = [1, 2]
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)  # targets t+1: chosen 3; rejected 4, 4
    batch = DPOBatch(PairBatch(tokens, mask, torch.tensor([2, 3]), torch.zeros(1)), torch.tensor([-1.0, -2.0]),
                     torch.ones(1))
    model = FixedLogits(logits.clone())
    loss, stats = dpo_loss_fn(beta=0.2)(model, batch)
    loss_value = float(loss.detach())
    lp = torch.log_softmax(logits, -1).tolist()
    pc = lp[0][1][3]
    pr = lp[1][1][4] + lp[1][2][4]
    h = (pc + 1.0) - (pr + 2.0)
    assert loss_value == pytest.approx(-math.log(_sig(0.2 * h)), rel=1e-5)
    assert float(stats["chosen_reward"]) == pytest.approx(0.2 * (pc + 1.0), rel=1e-5)
    assert float(stats["logratio"]) == pytest.approx(pc - pr, rel=1e-5)
    loss.backward()
    assert model.logits.grad[0, 0].abs().sum() == 0 and model.logits.grad[0, 2:].abs().sum() == 0  # prompt, pad
    ipo, _ = dpo_loss_fn(beta=0.2, loss="ipo")(model, batch)
    assert float(ipo.detach()) == pytest.approx((h - 2.5) ** 2, rel=1e-5)
    zero = DPOBatch(batch.pairs, batch.ref, torch.zeros(1))
    assert zero.units() == 0 and float(dpo_loss_fn()(model, zero)[0].detach()) == 0.0


def _rows(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(base, data, run, **kw) -> Config:
    d = {"base": str(base), "data": [str(data)], "run_dir": str(run), "checkpoint_interval": 0, "seed": 0,
         "max_len": 64, **kw}
    return from_dict(Config, d)


def test_dpo_learns_the_marker_preference_on_heldout_prompts(tmp_path, align_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(96, seed=0))
    out = dpo_main(_cfg(align_base, data, tmp_path / "run", steps=12, batch_size=16, heldout_fraction=0.25,
                        eval_interval=6, optim={"lr": 3e-3}, beta=0.1))
    before, after = out["heldout_before"], out["heldout_after"]
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0  # the policy starts as the reference
    # log pi(chosen) - log pi(rejected) on held-out prompts: the untrained model prefers the rejected answers (the
    # marker is several tokens); DPO moves the ratio up by far more than the held-out noise
    assert after["logratio"] > before["logratio"] + 5.0
    assert after["logp_accuracy"] > before["logp_accuracy"]
    assert after["accuracy"] > 0.9 and after["margin"] > 0
    rows = _rows(tmp_path / "run")
    assert {"accuracy", "chosen_reward", "rejected_reward", "margin", "logratio"} <= set(rows[0])
    assert rows[-1]["val_accuracy"] == after["accuracy"]
    assert (tmp_path / "run" / "model" / "config.json").exists()
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Preference data" in report and "Logratio" in report and "Accuracy" in report  # ledger and plots
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["kind"] == "dpo" and meta["data"]["files"][0]["sha256"]
    assert meta["base"]["weights_sha256"] and meta["reference"]["weights_sha256"] == meta["base"]["weights_sha256"]
    assert meta["reference"]["cache"]["sha256"]
    ledger = json.loads((tmp_path / "run" / "preference_data.json").read_text())
    assert ledger["read"] == 96 and ledger["train_pairs"] + ledger["heldout_pairs"] == 96
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg["chat_template"] == "llama2" and cfg["dpo"]["beta"] == 0.1


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_lora_trains_only_adapters_and_the_frozen_base_is_the_reference(tmp_path, align_base, capsys):
    from llamalab.cli import main as cli
    from llamalab.finetune.lora import load_adapter

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=3))
    run = tmp_path / "lora"
    args = ["dpo", "--base", str(align_base), "--data", str(data), "--max-len", "64", "--steps", "6", "--batch-size",
            "8", "--micro-batch-size", "4", "--optim.lr", "2e-2", "--lora.rank", "4", "--lora.dropout", "0",
            "--lora.targets", "wq,wv,w2", "--checkpoint-interval", "0", "--keep-last", "0", "--seed", "0"]
    assert cli(args + ["--run-dir", str(run)]) == 0, capsys.readouterr().err
    base = _state(align_base)
    ckpt = _state(run / "checkpoints" / "step_000006" / "model")
    lora_keys = {k for k in ckpt if ".lora_" in k}
    assert lora_keys and set(ckpt) - lora_keys == set(base)
    for k in base:  # the frozen base, bit for bit
        assert torch.equal(ckpt[k], base[k]), k
    assert any(not torch.equal(ckpt[k], torch.zeros_like(ckpt[k])) for k in lora_keys if "lora_B" in k)
    merged, meta = load_model(run / "model")
    assert meta["dpo"]["lora"]["rank"] == 4 and meta["chat_template"] == "llama2"
    plain, _ = load_model(align_base)
    load_adapter(run / "adapter", plain, base_sha256=meta["dpo"]["base"]["weights_sha256"])
    x = torch.randint(0, merged.cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain.eval()(x), atol=1e-4, rtol=1e-4)
    # live reference = the policy with its adapters switched off: the same losses as the cached base log-probs
    assert cli(args + ["--run-dir", str(tmp_path / "live"), "--reference-mode", "live"]) == 0
    cached, live = _rows(run), _rows(tmp_path / "live")
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in live], rel=1e-5, abs=1e-6)
    assert [r["margin"] for r in cached] == pytest.approx([r["margin"] for r in live], rel=1e-4, abs=1e-6)
    assert cached[-1]["margin"] != 0.0  # the adapters moved away from the reference


def test_live_frozen_copy_equals_the_cached_reference(tmp_path, align_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=4))
    common = {"steps": 4, "batch_size": 8, "optim": {"lr": 1e-2}, "heldout_fraction": 0.3, "eval_interval": 2}
    cached = dpo_main(_cfg(align_base, data, tmp_path / "cached", **common))
    live = dpo_main(_cfg(align_base, data, tmp_path / "live", reference_mode="live", **common))
    a, b = _rows(tmp_path / "cached"), _rows(tmp_path / "live")
    for key in ("loss", "margin", "val_loss", "val_accuracy", "val_logratio"):
        assert [r.get(key) for r in a] == pytest.approx([r.get(key) for r in b], rel=1e-5, abs=1e-6), key
    # before training: from the cached reference alone (no forward) == the live evaluation of the policy
    assert cached["heldout_before"] == pytest.approx(live["heldout_before"], rel=1e-5, abs=1e-6)
    assert live["heldout_before"]["accuracy"] == 0.5 and live["heldout_before"]["margin"] == 0.0
    assert a[-1]["loss"] < a[0]["loss"] and not (tmp_path / "live" / "dpo_reference.safetensors").exists()


def test_stop_and_resume_equals_straight_run_without_recomputing_the_reference(tmp_path, align_base, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=5))
    common = {"steps": 6, "batch_size": 4, "micro_batch_size": 2, "optim": {"lr": 1e-2}, "keep_last": 0,
              "heldout_fraction": 0.2, "eval_interval": 3}
    straight = dpo_main(_cfg(align_base, data, tmp_path / "straight", **common))
    part = dpo_main(_cfg(align_base, data, tmp_path / "split", stop_after=3, **common))
    assert part["steps"] == 3 and not (tmp_path / "split" / "model").exists()
    cache = tmp_path / "split" / "dpo_reference.safetensors"
    stamp = cache.stat().st_mtime_ns

    def no_recompute(*a, **k):
        raise AssertionError("the reference log-probs were recomputed on resume")

    monkeypatch.setattr("llamalab.commands.dpo.reference_logprobs", no_recompute)
    resumed = dpo_main(_cfg(align_base, data, tmp_path / "split", resume=True, **common))
    assert cache.stat().st_mtime_ns == stamp
    a, b = _state(tmp_path / "straight" / "model"), _state(tmp_path / "split" / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _rows(tmp_path / "straight")] == [r["loss"] for r in _rows(tmp_path / "split")]
    assert resumed["heldout_before"] == straight["heldout_before"]
    assert resumed["heldout_after"] == straight["heldout_after"]


def test_bad_settings_name_the_flag(tmp_path, align_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(4) + [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(LlamalabError, match="--max-len 512 exceeds the model's context"):
        dpo_main(_cfg(align_base, data, tmp_path / "r1", max_len=512))
    with pytest.raises(LlamalabError, match="leave out --reference"):
        dpo_main(_cfg(align_base, data, tmp_path / "r2", reference=str(align_base), lora={"rank": 4}))
    with pytest.raises(LlamalabError, match="--beta must be > 0"):
        dpo_main(_cfg(align_base, data, tmp_path / "r3", beta=0))
    with pytest.raises(LlamalabError, match="no usable training pairs"):
        dpo_main(_cfg(align_base, data, tmp_path / "r4", max_len=8))  # every prompt longer than the context
    ledger = json.loads((tmp_path / "r4" / "preference_data.json").read_text())
    assert ledger["dropped"] == {"identical": 1, "prompt_too_long": 4} and ledger["read"] == 5
