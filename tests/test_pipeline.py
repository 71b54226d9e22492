"""`llamalab run`: the whole pipeline end to end (short), its record and report, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamalab.commands.run import Config
from llamalab.commands.run import main as run_pipeline
from llamalab.config import from_dict
from llamalab.pipeline import load_corpus
from tests.conftest import shared_path


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llamalab", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_builtin_corpus_is_real_and_offline():
    docs, origin = load_corpus(Config().data)
    sources = {d.source for d in docs}
    assert sources == {"python-docs", "python-stdlib"}
    assert sum(len(d.text) for d in docs) > 2_000_000
    assert any("def " in d.text for d in docs if d.source == "python-stdlib")


def test_run_end_to_end_on_builtin_corpus(tmp_path, capsys):
    cfg = from_dict(Config, {"runs_dir": str(tmp_path), "name": "r", "steps": 40, "global_batch_tokens": 4096,
                             "seq_len": 128, "eval_interval": 20, "checkpoint_interval": 20, "samples": 2,
                             "sample_tokens": 16, "vocab_size": 1024})
    summary = run_pipeline(cfg)
    out = capsys.readouterr().out
    run = tmp_path / "r"
    assert "validation loss" in out and "unigram entropy" in out
    assert summary["val_loss"] < summary["unigram_entropy"]
    for f in ("meta.json", "metrics.jsonl", "logbook.jsonl", "data/manifest.json", "tokenizer/tokenizer.model",
              "checkpoints/step_000020/model/model.safetensors", "checkpoints/step_000040/state.json",
              "summary.json", "report.html"):
        assert (run / f).exists(), f
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # loss, lr, grad norm, throughput plots
    assert "python-stdlib" in page and "python-docs" in page and "kg CO2eq" in page
    assert len(summary["samples"]) == 2
    meta = json.loads((run / "meta.json").read_text())
    assert meta["git_sha"] is None or len(meta["git_sha"]) == 40
    assert summary["energy"]["kwh"] > 0 and summary["total_train_flops"] > 0


def test_run_on_user_data_jsonl(tmp_path):
    data = tmp_path / "data.jsonl"
    text = shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig").splitlines()
    with open(data, "w") as f:
        for i in range(0, len(text), 50):
            f.write(json.dumps({"id": i, "text": "\n".join(text[i:i + 50])}) + "\n")
    r = cli("run", "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--name", "u", "--steps", "6",
            "--seq-len", "64", "--global-batch-tokens", "1024", "--vocab-size", "600", "--samples", "1",
            "--sample-tokens", "8", "--eval-interval", "3", "--checkpoint-interval", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "report" in r.stdout and (tmp_path / "runs/u/report.html").exists()


@pytest.mark.parametrize("case", ["empty", "not_utf8", "bad_jsonl", "too_long"])
def test_bad_input_is_a_clear_error(tmp_path, case):
    args = ["run", "--runs-dir", str(tmp_path / "runs"), "--name", case, "--steps", "2", "--vocab-size", "400"]
    if case == "empty":
        (tmp_path / "empty.txt").write_text("   \n\n")
        args += ["--data", str(tmp_path / "empty.txt")]
        want = "the corpus is empty"
    elif case == "not_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
        args += ["--data", str(tmp_path / "latin1.txt")]
        want = "latin1.txt: not UTF-8"
    elif case == "bad_jsonl":
        (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": "oops"\n')
        args += ["--data", str(tmp_path / "d.jsonl")]
        want = "d.jsonl:2: not valid JSON"
    else:
        args += ["--data", str(shared_path("corpus/botchan.txt")), "--seq-len", "4096"]
        want = "seq_len (4096) is longer than the model's context model.max_seq_len (256)"
    r = cli(*args)
    assert r.returncode == 2
    assert want in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr
