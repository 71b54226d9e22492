"""`llamalab eval sweep`: every checkpoint evaluated once (resumable), curves vs tokens seen."""

from __future__ import annotations

import json

import torch

from llamalab.cli import main as cli_main
from tests.conftest import shared_path


def _checkpoint(run, step, tokenizer, seed):
    from llamalab.model import ModelConfig, Transformer
    from llamalab.model.folder import save_model

    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tokenizer.vocab_size, multiple_of=16, max_seq_len=128)
    d = run / "checkpoints" / f"step_{step:06d}"
    save_model(d / "model", Transformer(cfg), tokenizer.path)
    (d / "state.json").write_text(json.dumps({"step": step, "tokens_seen": step * 1000}))


def test_sweep_resumable_with_curves(tmp_path, botchan_tokenizer, capsys):
    run = tmp_path / "runs" / "demo"
    for step, seed in ((100, 1), (200, 2)):
        _checkpoint(run, step, botchan_tokenizer, seed)
    (run / "checkpoints" / "step_000300.tmp-123" / "model").mkdir(parents=True)  # a checkpoint being written
    held = tmp_path / "heldout.txt"
    held.write_text(shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig")[-2000:], encoding="utf-8")
    args = ["eval", "sweep", str(run), "--task", "arc_easy,perplexity",
            "--path", f"{shared_path('eval/arc/ARC-Easy-Dev.jsonl')},{held}", "--limit", "3", "--device", "cpu"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "4 result(s) computed, 0 already done, 2 checkpoint(s)" in out
    res = json.loads((run / "eval" / "step_000200" / "arc_easy.json").read_text())
    assert res["step"] == 200 and res["tokens_seen"] == 200_000 and res["n"] == 3
    curves = json.loads((run / "eval" / "curves.json").read_text())
    pts = curves["perplexity"]["bits_per_byte"]
    assert [p["tokens_seen"] for p in pts] == [100_000, 200_000]
    assert pts[1]["value"] == json.loads(
        (run / "eval" / "step_000200" / "perplexity.json").read_text())["metrics"]["bits_per_byte"]
    assert len(curves["arc_easy"]["acc_norm"]) == 2
    assert (run / "eval" / "curve_arc_easy.png").stat().st_size > 1000
    figs = json.loads((run / "eval" / "figures.json").read_text())["curves"]
    assert {f["path"] for f in figs} == {"curve_arc_easy.png", "curve_perplexity.png"}

    # second pass: nothing recomputed; a new checkpoint: only it is evaluated
    mtime = (run / "eval" / "step_000100" / "arc_easy.json").stat().st_mtime_ns
    _checkpoint(run, 300, botchan_tokenizer, 3)
    (run / "checkpoints" / "step_000300.tmp-123" / "model").rmdir()
    assert cli_main(args) == 0
    assert "2 result(s) computed, 4 already done, 3 checkpoint(s)" in capsys.readouterr().out
    assert (run / "eval" / "step_000100" / "arc_easy.json").stat().st_mtime_ns == mtime
    assert len(json.loads((run / "eval" / "curves.json").read_text())["arc_easy"]["acc"]) == 3
    # a different limit is a different result: recomputed
    assert cli_main(args[:-4] + ["--limit", "2", "--device", "cpu"]) == 0
    assert "6 result(s) computed" in capsys.readouterr().out


def test_sweep_errors(tmp_path, capsys):
    assert cli_main(["eval", "sweep", str(tmp_path / "nope"), "--task", "mc", "--path", "x"]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert cli_main(["eval", "sweep", str(tmp_path / "empty"), "--task", "mc", "--path", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    ck = tmp_path / "bad" / "checkpoints" / "step_000001" / "model"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{}")
    (ck.parent / "state.json").write_text('{"step": 1}')
    assert cli_main(["eval", "sweep", str(tmp_path / "bad"), "--task", "mc", "--path", "x"]) == 2
    assert "state.json: needs integer fields 'step' and 'tokens_seen'" in capsys.readouterr().err
