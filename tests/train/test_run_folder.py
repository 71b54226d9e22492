"""The run folder a pretraining leaves: the final model at RUN/model, stops on SIGTERM/SIGINT with a
checkpoint (and a bit-exact resume), leftovers of crashed writes removed, corrupt checkpoints refused
unless asked to start over, and a tokenizer found from any working folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamalab.cli import main as cli_main
from llamalab.commands.pretrain import main as pretrain
from llamalab.common import LlamalabError
from llamalab.config import to_dict
from llamalab.data.readers import Document
from llamalab.data.shards import ShardWriterConfig, TokenDataset, load_manifest, write_shards
from llamalab.model.folder import load, resolve_model_path
from llamalab.tokenizer import Tokenizer
from llamalab.train.setup import find_tokenizer
from llamalab.train.trainer import TrainingInterrupted
from tests.train.conftest import small_config
from tests.train.test_pretrain import read_log, read_metrics

QUICK = dict(eval_interval=0, report=False)  # these tests look at the run folder, not the curves


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_completed_schedule_publishes_final_model(botchan_shards, tmp_path):
    run = tmp_path / "run"
    out = pretrain(small_config(botchan_shards, run, steps=6, checkpoint_interval=4, **QUICK))
    final, last = run / "model", run / "checkpoints/step_000006/model"
    assert out["model"] == str(final) and (final / "config.json").exists()
    assert os.path.samefile(final / "model.safetensors", last / "model.safetensors")  # hard link: no second copy
    assert not os.path.samefile(final / "config.json", last / "config.json")  # editable without harming the ckpt
    assert json.loads((final / "config.json").read_text())["step"] == 6
    assert resolve_model_path(run) == final
    loaded = load(run, device="cpu")
    assert loaded.path == final and loaded.tokenizer is not None
    assert [e for e in read_log(run) if e["event"] == "final_model"][0]["step"] == 6
    assert not list(run.glob("*.tmp-*")) and not list(run.glob("*.old-*"))

    # more steps on the same run: the old model/ is not final any more, and goes at the start
    out = pretrain(small_config(botchan_shards, run, steps=8, checkpoint_interval=4, resume=True, stop_after=1,
                                **QUICK))
    assert out["model"] is None and not final.exists()
    assert resolve_model_path(run) == run / "checkpoints/step_000007/model"  # the newest checkpoint is the model
    assert [e for e in read_log(run) if e["event"] == "final_model_removed"][0]["model_step"] == 6
    out = pretrain(small_config(botchan_shards, run, steps=8, checkpoint_interval=4, resume=True, **QUICK))
    assert out["model"] == str(final) and json.loads((final / "config.json").read_text())["step"] == 8
    ref = weights(run / "checkpoints/step_000008/model")
    assert all(torch.equal(v, weights(final)[k]) for k, v in ref.items())


def test_stopped_run_has_no_final_model(botchan_shards, tmp_path, capsys):
    run = tmp_path / "run"
    out = pretrain(small_config(botchan_shards, run, steps=6, stop_after=2, **QUICK))
    assert out["model"] is None and not (run / "model").exists()
    assert "the newest checkpoint is the model" in capsys.readouterr().out
    assert resolve_model_path(run) == run / "checkpoints/step_000002/model"
    # a run folder that holds a model/ training did not write is not silently replaced
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps({"format": "llamalab", "model": {}}))
    with pytest.raises(LlamalabError, match="holds a model/ that training did not write"):
        pretrain(small_config(botchan_shards, run, steps=6, resume=True, **QUICK))


def test_sigint_writes_checkpoint_and_logbook(botchan_shards, tmp_path, monkeypatch):
    calls = []
    orig = TokenDataset.get_batch

    def interrupt_on_third(self, windows):
        if self.split == "train":
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # lands during step 3: the step finishes first
        return orig(self, windows)

    monkeypatch.setattr(TokenDataset, "get_batch", interrupt_on_third)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 3") as e:
        pretrain(small_config(botchan_shards, run, steps=12, checkpoint_interval=0, **QUICK))
    assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000003"]
    stop = [x for x in read_log(run) if x["event"] == "stop"]
    assert stop and stop[0]["reason"] == "signal SIGINT" and stop[0]["step"] == 3
    assert stop[0]["checkpoint"].endswith("step_000003")
    assert not (run / "model").exists()


def test_sigterm_then_resume_is_bit_exact(botchan_shards, tmp_path):
    """A real SIGTERM to a `python -m llamalab.commands.pretrain` process at whatever step it has reached:
    exit 143 with a checkpoint; --resume then gives the same losses as a run never interrupted."""
    steps = 2000  # the schedule; neither run gets near its end (so a slow test process cannot miss it)
    cfg = to_dict(small_config(botchan_shards, tmp_path / "killed", steps=steps, checkpoint_interval=0, **QUICK))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels as this process
    proc = subprocess.Popen([sys.executable, "-m", "llamalab.commands.pretrain", "--config",
                             str(tmp_path / "cfg.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped: pretrain: stopped by SIGTERM" in err and "Traceback" not in err
    run = tmp_path / "killed"
    k = max(r["step"] for r in read_metrics(run))
    assert 2 <= k < steps
    assert (run / f"checkpoints/step_{k:06d}/checksums.json").exists()
    assert [e for e in read_log(run) if e["event"] == "stop"][0]["reason"] == "signal SIGTERM"

    pretrain(small_config(botchan_shards, run, steps=steps, checkpoint_interval=0, resume=True, stop_after=2, **QUICK))
    straight = tmp_path / "straight"
    pretrain(small_config(botchan_shards, straight, steps=steps, checkpoint_interval=0, stop_after=k + 2, **QUICK))
    a, b = read_metrics(straight), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, k + 3))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical floats
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    last = f"checkpoints/step_{k + 2:06d}/model"
    wa, wb = weights(straight / last), weights(run / last)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def _signal_one_rank_worker(rank: int, world: int, data: str, run_dir: str) -> None:
    orig = TokenDataset.get_batch
    calls = []

    def term_rank1_on_third(self, windows):
        if self.split == "train" and rank == 1:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, windows)

    TokenDataset.get_batch = term_rank1_on_third
    try:
        pretrain(small_config(data, run_dir, steps=12, micro_batch_size=2, checkpoint_interval=0, **QUICK))
    except TrainingInterrupted as e:
        assert e.exit_code == 143 and "after step 3" in str(e), str(e)
        (Path(run_dir) / f"stopped_rank{rank}").write_text(str(e))
    finally:
        TokenDataset.get_batch = orig


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(botchan_shards, tmp_path, gloo_runner):
    """Only rank 1 gets SIGTERM: the ranks agree, stop after the same step (no rank left waiting in
    a collective) and the checkpoint is written."""
    run = tmp_path / "run"
    gloo_runner(_signal_one_rank_worker, 2, str(botchan_shards), str(run))
    assert (run / "stopped_rank0").exists() and (run / "stopped_rank1").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert (run / "checkpoints/step_000003/checksums.json").exists()
    assert [e for e in read_log(run) if e["event"] == "stop"][0]["reason"] == "signal SIGTERM"


def test_partial_writes_of_a_crash_are_removed(botchan_shards, tmp_path):
    run = tmp_path / "run"
    pretrain(small_config(botchan_shards, run, steps=6, stop_after=2, **QUICK))
    partial = run / "checkpoints" / "step_000003.tmp-99999"  # a kill inside a checkpoint write
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "model.safetensors").write_bytes(b"half")
    (run / "model.tmp-4242").mkdir()  # a kill inside the final model's publication
    keep = run / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    pretrain(small_config(botchan_shards, run, steps=6, resume=True, **QUICK))
    assert not partial.exists() and not (run / "model.tmp-4242").exists() and keep.exists()
    ev = [e for e in read_log(run) if e["event"] == "partial_writes_removed"]
    assert len(ev) == 1 and sorted(os.path.basename(p) for p in ev[0]["paths"]) == ["model.tmp-4242",
                                                                                   "step_000003.tmp-99999"]


def test_all_checkpoints_corrupt_needs_restart_flag(botchan_shards, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(small_config(botchan_shards, run, steps=6, checkpoint_interval=2, stop_after=4, **QUICK))
    for step in (2, 4):
        f = run / f"checkpoints/step_{step:06d}/model/model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    metrics_before = (run / "metrics.jsonl").read_text()
    cfg = to_dict(small_config(botchan_shards, run, steps=6, checkpoint_interval=2, resume=True, **QUICK))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert cli_main(["pretrain", "--config", str(tmp_path / "cfg.json")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint verifies" in err and "step_000004" in err and "--restart-if-corrupt" in err
    assert (run / "metrics.jsonl").read_text() == metrics_before  # nothing touched

    assert cli_main(["pretrain", "--config", str(tmp_path / "cfg.json"), "--restart-if-corrupt"]) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))  # a fresh metrics file, each step once
    assert (run / "checkpoints/step_000002.corrupt").is_dir() and (run / "checkpoints/step_000004.corrupt").is_dir()
    ev = [e for e in read_log(run) if e["event"] == "restart_from_scratch"]
    assert len(ev) == 1 and ev[0]["metrics_lines_dropped"] == 4 and len(ev[0]["set_aside"]) == 2
    straight = tmp_path / "straight"  # the restart is a genuine step-0 start
    pretrain(small_config(botchan_shards, straight, steps=6, checkpoint_interval=2, **QUICK))
    assert [r["loss"] for r in read_metrics(straight)] == [r["loss"] for r in read_metrics(run)]


def test_resume_before_any_checkpoint_starts_a_fresh_metrics_file(botchan_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # killed before a checkpoint
    pretrain(small_config(botchan_shards, run, steps=3, resume=True, **QUICK))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3] and read_metrics(run)[0]["loss"] != 9.0


def test_manifest_tokenizer_found_from_another_folder(tmp_path, monkeypatch, botchan_tokenizer, botchan_text):
    work = tmp_path / "work"
    (work / "tok").mkdir(parents=True)
    shutil.copyfile(botchan_tokenizer.path, work / "tok" / "tokenizer.model")
    monkeypatch.chdir(work)
    docs = [Document(id=str(i), text=botchan_text[i * 3000:(i + 1) * 3000], source="books",
                     provenance=f"botchan:{i}") for i in range(20)]
    write_shards(docs, Tokenizer("tok/tokenizer.model"), "shards", ShardWriterConfig(val_fraction=0.1))
    tok = load_manifest(work / "shards")["tokenizer"]
    assert tok["path"] == str(work / "tok" / "tokenizer.model") and tok["relative_path"] == "../tok/tokenizer.model"

    monkeypatch.chdir(tmp_path)  # a run started from elsewhere
    assert find_tokenizer(load_manifest(work / "shards"), work / "shards") == work / "tok" / "tokenizer.model"
    moved = tmp_path / "moved"  # both folders moved together: the absolute path is gone, the relative one holds
    shutil.move(str(work), str(moved))
    manifest = load_manifest(moved / "shards")
    assert find_tokenizer(manifest, moved / "shards") == moved / "shards" / "../tok/tokenizer.model"
    old = {**manifest, "tokenizer": {**manifest["tokenizer"], "path": "tok/tokenizer.model", "relative_path": None}}
    assert find_tokenizer(old, moved / "shards") is None  # an old manifest with a path relative to another cwd
    shutil.copyfile(moved / "tok" / "tokenizer.model", moved / "shards" / "tokenizer.model")
    assert find_tokenizer(old, moved / "shards") == moved / "shards" / "tokenizer.model"  # ... next to the shards
    (moved / "shards" / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(LlamalabError, match="tokenizer differs from the one the shards were made with"):
        find_tokenizer(old, moved / "shards")
