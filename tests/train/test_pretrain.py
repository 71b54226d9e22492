"""Pretraining: loss falls on real text, resume is bit-exact, bad checkpoints are skipped, the data
record matches what was fed, the schedule follows its formula, and the NaN guard acts and logs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llamalab.commands.pretrain import main as pretrain
from llamalab.common import LlamalabError
from llamalab.data.order import step_windows, which_step
from llamalab.data.shards import TokenDataset
from llamalab.train.optim import lr_at
from tests.train.conftest import small_config


def read_metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def read_log(run):
    return [json.loads(x) for x in (run / "logbook.jsonl").read_text().splitlines()]


def test_loss_decreases_on_real_text(botchan_shards, tmp_path):
    run = tmp_path / "run"
    out = pretrain(small_config(botchan_shards, run, steps=40, checkpoint_interval=0, eval_interval=20,
                                optim={"lr": 3e-3, "warmup_steps": 4}))
    rows = read_metrics(run)
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert first > math.log(1000) - 0.5  # starts near uniform over 1000 pieces
    assert last < first - 1.0, (first, last)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0]
    assert out["steps"] == 40 and (run / "meta.json").exists()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["data"]["manifest_sha256"] and meta["versions"]["torch"] and "plan" in meta
    page = (run / "report.html").read_text()  # a standalone pretrain run ends with its report
    assert page.count("<img") >= 4 and "Data mixture" in page and "Logbook" in page


def test_resume_is_bit_exact(botchan_shards, tmp_path):
    straight = tmp_path / "straight"
    pretrain(small_config(botchan_shards, straight))
    chunked = tmp_path / "chunked"
    pretrain(small_config(botchan_shards, chunked, stop_after=5))  # "killed" after step 5 (checkpoint at 4 and 5)
    assert max(r["step"] for r in read_metrics(chunked)) == 5
    # simulate the kill landing before the step-5 checkpoint: remove it, metrics keep step 5 (to be dropped)
    import shutil

    shutil.rmtree(chunked / "checkpoints" / "step_000005")
    pretrain(small_config(botchan_shards, chunked, resume=True))
    a, b = read_metrics(straight), read_metrics(chunked)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical floats
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa = load_file(str(straight / "checkpoints/step_000012/model/model.safetensors"))
    wb = load_file(str(chunked / "checkpoints/step_000012/model/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    events = [e["event"] for e in read_log(chunked)]
    assert "restart" in events and "stop" in events


def test_truncated_checkpoint_is_skipped(botchan_shards, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(small_config(botchan_shards, run, steps=12, stop_after=8))
    f = run / "checkpoints/step_000008/model/model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = pretrain(small_config(botchan_shards, run, steps=12, resume=True))
    msg = capsys.readouterr().out
    assert "skipping step_000008" in msg and "resumed from" in msg and "step_000004" in msg
    bad = [e for e in read_log(run) if e["event"] == "bad_checkpoint"]
    assert bad and "checksum mismatch" in bad[0]["reason"]
    assert out["steps"] == 12
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))


def test_which_step_matches_what_was_fed(botchan_shards, tmp_path, monkeypatch):
    fed = []
    orig = TokenDataset.get_batch

    def spy(self, windows):
        x, y = orig(self, windows)
        if self.split == "train":
            fed.append(x.clone())
        return x, y

    monkeypatch.setattr(TokenDataset, "get_batch", spy)
    run = tmp_path / "run"
    pretrain(small_config(botchan_shards, run, steps=6, eval_interval=0))
    assert len(fed) == 6
    for step in (1, 4, 6):
        ds, windows = step_windows(run, step)
        x = torch.stack([torch.from_numpy(ds.tokens(ds.window(i))[:-1]) for i in windows])
        assert torch.equal(x, fed[step - 1])
    info = which_step(run, 4)
    assert len(info["windows"]) == 8
    doc = info["windows"][0]["documents"][0]
    assert doc["source"] == "books" and "botchan_" in doc["provenance"]


def test_schedule_follows_formula(botchan_shards, tmp_path):
    run = tmp_path / "run"
    pretrain(small_config(botchan_shards, run, steps=40, optim={"lr": 1e-3, "warmup_steps": 2000},
                          checkpoint_interval=0, eval_interval=0))
    rows = read_metrics(run)
    warmup = 4  # 2000 scaled down to a tenth of 40 steps
    for r in rows:
        s = r["step"] - 1
        expect = 1e-3 * (s + 1) / warmup if s < warmup else \
            1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (40 - warmup))))
        assert r["lr"] == pytest.approx(expect, rel=1e-12)
        assert r["lr"] == pytest.approx(lr_at(s, 1e-3, warmup, 40, 0.1))
    assert rows[warmup - 1]["lr"] == pytest.approx(1e-3)
    assert lr_at(40, 1e-3, warmup, 40) == pytest.approx(1e-4)  # ends at 10% of the peak


def test_nan_guard_skips_and_logs(botchan_shards, tmp_path):
    run = tmp_path / "run"
    out = pretrain(small_config(botchan_shards, run, steps=8, fault_nan_steps=[3], checkpoint_interval=0,
                                eval_interval=0))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["batch"] for r in rows] == [0, 1, 3, 4, 5, 6, 7, 8]  # batch 2 skipped
    ev = [e for e in read_log(run) if e["event"] == "nan"]
    assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["batch"] == 2 and ev[0]["action"] == "skip"
    assert out["skipped_batches"] == [2]


def test_nan_guard_rollback(botchan_shards, tmp_path):
    run = tmp_path / "run"
    pretrain(small_config(botchan_shards, run, steps=8, fault_nan_steps=[6], checkpoint_interval=4,
                          eval_interval=0, guard={"nan_action": "rollback"}))
    events = [e["event"] for e in read_log(run)]
    assert "nan" in events and "rollback" in events
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["batch"] for r in rows][4:] == [4, 6, 7, 8]  # batch 5 (step 6) never read again


def test_clear_errors(botchan_shards, tmp_path):
    with pytest.raises(LlamalabError, match=r"seq_len \(128\) is longer than the model's context "
                                            r"model.max_seq_len \(64\)"):
        pretrain(small_config(botchan_shards, tmp_path / "a", seq_len=128))
    with pytest.raises(LlamalabError, match="does not divide by world size 1 x micro_batch_size 3"):
        pretrain(small_config(botchan_shards, tmp_path / "b", micro_batch_size=3))
    pretrain(small_config(botchan_shards, tmp_path / "c", steps=4))
    with pytest.raises(LlamalabError, match="already holds checkpoints: pass --resume"):
        pretrain(small_config(botchan_shards, tmp_path / "c", steps=4))
