"""`llamalab run`: the whole pipeline end to end (short), its record and report, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamalab.commands.run import Config
from llamalab.commands.run import main as run_pipeline
from llamalab.common import LlamalabError
from llamalab.config import from_dict
from llamalab.pipeline import CLOZE, CLOZE_TASK, HELDOUT, cloze_items, load_corpus
from llamalab.run_dir import RunDir
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
                             "sample_tokens": 16, "vocab_size": 1024, "cloze_items": 40, "heldout_bytes": 20000,
                             "mem_per_chunk": 4})
    summary = run_pipeline(cfg)
    out = capsys.readouterr().out
    run = tmp_path / "r"
    rd = RunDir(run)
    assert "validation loss" in out and "unigram entropy" in out
    # the sweep: both tasks at both checkpoints, curves over tokens seen, in the report
    for step in ("step_000020", "step_000040"):
        ppl = json.loads(rd.eval_result(step, "perplexity").read_text())
        assert ppl["metrics"]["bits_per_byte"] > 0 and ppl["step"] == int(step[5:])
        cloze = json.loads(rd.eval_result(step, "cloze").read_text())
        assert cloze["n"] == 40 and 0 <= cloze["metrics"]["acc_norm"] <= 1
    curves = json.loads(rd.eval_file("curves.json").read_text())
    assert [p["step"] for p in curves["perplexity"]["bits_per_byte"]] == [20, 40]
    # more training, lower held-out loss: the sweep sees the model learn
    nll = [p["value"] for p in curves["perplexity"]["nll_per_token"]]
    assert nll[1] < nll[0]
    assert len(curves["cloze"]["acc_norm"]) == 2
    assert all((rd.eval_file(f)).exists() for f in (HELDOUT, CLOZE, CLOZE_TASK, "memorization.json"))
    memo = json.loads(rd.eval_file("memorization.json").read_text())
    assert [c["step"] for c in memo["checkpoints"]] == [20, 40] and memo["n_sequences"] > 0
    assert "sweep             held-out text" in out and "benchmark         cloze" in out
    assert "memorization      " in out
    bundle = tmp_path / "r-release"
    assert summary["release"] == str(bundle) and (bundle / "checksums.sha256").is_file()
    assert out.rstrip().splitlines()[-2:] == [f"  release bundle    {bundle}",
                                              f"  verify it with    llamalab release verify {bundle} --steps 2"]
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
            "--sample-tokens", "8", "--eval-interval", "3", "--checkpoint-interval", "3", "--heldout-bytes", "8000",
            "--cloze-items", "20", "--mem-per-chunk", "2", "--release", "false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "report" in r.stdout and (tmp_path / "runs/u/report.html").exists()
    rd = RunDir(tmp_path / "runs/u")
    assert json.loads(rd.eval_result("step_000006", "perplexity").read_text())["metrics"]["bits_per_byte"] > 0
    assert rd.eval_file("memorization.json").exists()


def run_metrics_losses(runs, name):
    lines = [json.loads(x) for x in RunDir(runs / name).metrics.read_text().splitlines()]
    return [(m["step"], m["loss"], m.get("val_loss")) for m in lines if "loss" in m]


def test_same_seed_same_losses(tmp_path):
    """Re-running `llamalab run` with the same seed gives bit-identical losses (and weights); another seed does not."""
    data = shared_path("corpus/botchan.txt")
    runs = tmp_path / "runs"
    common = ["--data", str(data), "--runs-dir", str(runs), "--steps", "6", "--seq-len", "64",
              "--global-batch-tokens", "1024", "--vocab-size", "600", "--samples", "0", "--eval-interval", "3",
              "--checkpoint-interval", "3", "--sweep", "false", "--memorization", "false", "--release", "false"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        r = cli("run", *common, "--name", name, "--seed", seed)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b, c = (run_metrics_losses(runs, n) for n in "abc")
    assert len(a) == 6 and a == b  # exact float equality, step by step
    assert [x[1] for x in a] != [x[1] for x in c]
    wa, wb = ((RunDir(runs / n).model / "model.safetensors").read_bytes() for n in "ab")
    assert wa == wb


def test_cloze_items_are_well_formed():
    docs = [f"doc {d} starts here\n" + "\n".join(f"document {d} says line number {i} of text" for i in range(30))
            for d in range(5)]
    items, skipped = cloze_items(docs, 20, choices=4, seed=3)
    assert len(items) == 20 and sum(skipped.values()) == 0
    golds = set()
    for it in items:
        d, line = it["id"].split(":")
        d, line = int(d[3:]), int(line[4:]) - 1
        want = docs[d].split("\n")[line]
        assert it["choices"][it["answer"]] == want and len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert docs[d].split("\n")[line - 1] in it["question"] and it["question"].endswith("\n")
        # distractors come from other documents
        assert all(f"document {d} " not in c for i, c in enumerate(it["choices"]) if i != it["answer"])
        golds.add(it["answer"])
    assert len(golds) > 1  # the answer position varies
    assert cloze_items(docs, 5, seed=3) == cloze_items(docs, 5, seed=3)  # seeded
    with pytest.raises(LlamalabError, match="cloze: no held-out line"):
        cloze_items(["short\nx"], 5)


def test_stage_flags_turn_stages_off(tmp_path):
    r = cli("run", "--data", str(shared_path("corpus/botchan.txt")), "--runs-dir", str(tmp_path), "--name", "q",
            "--steps", "2", "--seq-len", "64", "--global-batch-tokens", "512", "--vocab-size", "400", "--samples", "0",
            "--checkpoint-interval", "2", "--sweep", "false", "--memorization", "false", "--release", "false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sweep off" in r.stdout and "memorization off" in r.stdout and "release off" in r.stdout
    assert not RunDir(tmp_path / "q").eval_file("curves.json").exists() and not (tmp_path / "q-release").exists()
    assert "llamalab release verify" not in r.stdout


@pytest.mark.parametrize("case", ["empty", "not_utf8", "bad_jsonl", "too_long", "mem_window"])
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
    elif case == "mem_window":
        args += ["--data", str(shared_path("corpus/botchan.txt")), "--seq-len", "32"]
        want = "mem_k + mem_l (32 + 32) is longer than a training window (seq_len + 1 = 33)"
    else:
        args += ["--data", str(shared_path("corpus/botchan.txt")), "--seq-len", "4096"]
        want = "seq_len (4096) is longer than the model's context model.max_seq_len (256)"
    r = cli(*args)
    assert r.returncode == 2
    assert want in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr
