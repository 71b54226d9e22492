"""Sweep and memorization on a real (tiny) pretraining run made by `llamalab pretrain`."""

from __future__ import annotations

import json

import pytest

from llamalab.cli import main as cli_main
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, botchan_tokenizer):
    pretrain = pytest.importorskip("llamalab.train.pretrain")
    from llamalab.config import from_dict
    from llamalab.data.readers import read_documents
    from llamalab.data.shards import ShardWriterConfig, write_shards

    tmp = tmp_path_factory.mktemp("evalrun")
    lines = shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig").splitlines()
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(0, len(lines), 100):
        (docs / f"b{i // 100:03d}.txt").write_text("\n".join(lines[i:i + 100]), encoding="utf-8")
    write_shards(list(read_documents([docs], source="books")), botchan_tokenizer, tmp / "shards",
                 ShardWriterConfig(shard_tokens=30_000, val_fraction=0.1))
    cfg = from_dict(pretrain.Config, dict(
        data=str(tmp / "shards"), run_dir=str(tmp / "run"), preset="tiny",
        model_overrides={"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}, seq_len=64,
        global_batch_tokens=64 * 8, micro_batch_size=4, steps=12, checkpoint_interval=4, eval_interval=4,
        eval_batches=2, peak_flops=1e11, seed=7))
    pretrain.main(cfg)
    return tmp / "run"


def test_memorization_cli_on_a_run(tiny_run):
    from llamalab.data.order import step_windows

    rc = cli_main(["eval", "memorization", str(tiny_run), "--k", "16", "--l", "16", "--chunks", "3",
                   "--per-chunk", "4", "--device", "cpu"])
    assert rc == 0
    summary = json.loads((tiny_run / "eval" / "memorization.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [4, 8, 12]
    assert [(c["first_step"], c["last_step"]) for c in summary["chunks"]] == [(1, 4), (5, 8), (9, 12)]
    assert summary["n_sequences"] == 12
    per = json.loads((tiny_run / "eval" / "step_000008" / "memorization.json").read_text())
    assert [pc["seen"] for pc in per["per_chunk"]] == [True, True, False]
    # every sampled sequence is one the trainer read at its step (prefix of one of that batch's windows)
    from llamalab.eval.memorization import run_sequence_source, sample_sequences

    steps, at = run_sequence_source(tiny_run)
    samples, _ = sample_sequences(steps, at, 3, 4, 0, 32)
    for s in samples:
        ds, windows = step_windows(tiny_run, s.step)
        assert any(ds.tokens(ds.window(w))[:32].tolist() == s.ids for w in windows)


def test_sweep_cli_on_a_run(tiny_run, tmp_path):
    held = tmp_path / "heldout.txt"
    held.write_text(shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig")[-1500:], encoding="utf-8")
    assert cli_main(["eval", "sweep", str(tiny_run), "--task", "perplexity", "--path", str(held),
                     "--device", "cpu"]) == 0
    pts = json.loads((tiny_run / "eval" / "curves.json").read_text())["perplexity"]["bits_per_byte"]
    assert [p["step"] for p in pts] == [4, 8, 12] and pts[0]["tokens_seen"] == 4 * 8 * 64
    assert pts[-1]["value"] < pts[0]["value"]  # training lowers held-out bits per byte
    page = (tiny_run / "report.html").read_text()  # the sweep refreshed the run's report with its curves
    assert "Evaluations of every checkpoint" in page and "perplexity" in page
