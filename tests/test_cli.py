"""The CLI: dispatch, flags from dataclasses, and user errors printed without a traceback."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from llamalab.cli import main
from llamalab.model import ModelConfig


@dataclass
class C:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 10
    names: list[str] = field(default_factory=list)
    flag: bool = False


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamalab", *args], capture_output=True, text=True, timeout=120)


def test_info_70b_prints_costs_without_allocating(capsys):
    assert main(["info", "--preset", "llama2-70b"]) == 0
    out = capsys.readouterr().out
    assert "68,976,648,192" in out and "KV cache" in out and "327,680 bytes per token" in out
    assert "training compute" in out


def test_info_table(capsys):
    assert main(["info", "--all"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "stories15m", "stories110m", "llama-65b", "llama2-34b"):
        assert name in out


def test_user_error_has_no_traceback(tmp_path):
    r = run_cli("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode == 2
    assert "error: model not found" in r.stderr and "missing" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("tokenizer", "encode", str(tmp_path / "none.model"), "--text", "x", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr  # --debug shows it


def test_unknown_command_and_flag(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err
    r = run_cli("info", "--preset", "gpt5")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_nested_flags_and_json_config(tmp_path):
    from llamalab.config import parse_config

    p = tmp_path / "c.json"
    p.write_text('{"steps": 5, "model": {"dim": 64, "n_heads": 4}}')
    cfg, _ = parse_config(C, ["--config", str(p), "--model.n-layers", "3", "--names", "a,b", "--flag"])
    assert (cfg.steps, cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers, cfg.names, cfg.flag) == \
        (5, 64, 4, 3, ["a", "b"], True)
    p.write_text('{"stepz": 5}')
    import pytest

    from llamalab.common import LlamalabError

    with pytest.raises(LlamalabError, match=r"unknown field\(s\) \['stepz'\]"):
        parse_config(C, ["--config", str(p)])


def test_list_fields_take_several_words():
    """A shell glob gives several words: positional lists take them all (commas still split), list flags
    take them in commands without a positional, and only the comma form where one would be swallowed."""
    from llamalab.commands.data.clean import Config as Clean
    from llamalab.commands.data.mix import Config as Mix
    from llamalab.commands.data.shard import Config as Shard
    from llamalab.commands.data.stats import Config as Stats
    from llamalab.commands.eval.run import Config as EvalRun
    from llamalab.commands.sft import Config as Sft
    from llamalab.commands.tokenizer.train import Config as TokTrain
    from llamalab.config import build_parser, parse_config

    cfg, _ = parse_config(TokTrain, ["a.txt", "b.txt,c.txt", "--vocab-size", "300"])
    assert cfg.inputs == ["a.txt", "b.txt", "c.txt"] and cfg.vocab_size == 300
    cfg, _ = parse_config(TokTrain, ["--vocab-size", "300", "a.txt", "b.txt"])
    assert cfg.inputs == ["a.txt", "b.txt"]
    for cls, name in ((Shard, "inputs"), (Stats, "paths"), (Mix, "inputs")):
        cfg, _ = parse_config(cls, ["x/1.jsonl", "x/2.jsonl", "y/"])
        assert getattr(cfg, name) == ["x/1.jsonl", "x/2.jsonl", "y/"], cls
    cfg, _ = parse_config(Clean, ["--inputs", "a.html", "b.html", "--kind", "web"])
    assert cfg.inputs == ["a.html", "b.html"] and cfg.kind == "web" and cfg.spec == ""
    cfg, _ = parse_config(Sft, ["--data", "a.json", "b.json,c.jsonl", "--base", "m", "--lora.targets", "wq", "wv"])
    assert cfg.data == ["a.json", "b.json", "c.jsonl"] and cfg.base == "m" and cfg.lora.targets == ["wq", "wv"]
    cfg, _ = parse_config(Sft, ["--data", "a.json", "--base", "m", "--data", "b.json"])  # a repeated flag adds
    assert cfg.data == ["a.json", "b.json"]
    ns = build_parser(EvalRun, "eval run").parse_args(["--task", "arc_easy,hellaswag", "runs/x"])
    assert ns.model == "runs/x" and ns.task == ["arc_easy", "hellaswag"]  # MODEL is not swallowed


def test_tokenizer_train_with_a_glob(tiny_corpus, tmp_path):
    """The README's own `llamalab tokenizer train corpus/*.txt --vocab-size ...`, as the shell passes it."""
    files = sorted(str(p) for p in tiny_corpus.glob("*.txt"))
    assert len(files) == 4
    r = run_cli("tokenizer", "train", *files, "--vocab-size", "500", "--output", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.model").exists()
    import json

    stats = json.loads((tmp_path / "tok" / "stats.json").read_text())
    total = sum(1 for f in files for line in open(f, encoding="utf-8") if line.strip())
    assert stats["lines_seen"] + stats["heldout_lines"] == total  # every file was read, not only the first


def _tiny_run(tmp_path, botchan_tokenizer, steps=(2, 4), final=False):
    """A run folder as pretraining leaves it: checkpoints/step_N/model (and model/ when complete)."""
    from llamalab.model.folder import save_model
    from llamalab.model.transformer import Transformer

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=botchan_tokenizer.vocab_size,
                      max_seq_len=32)
    run = tmp_path / "run"
    for s in steps:
        m = Transformer(cfg)
        m.init_weights(seed=s)
        save_model(run / "checkpoints" / f"step_{s:06d}" / "model", m, botchan_tokenizer.path, extra={"step": s})
    if final:
        save_model(run / "model", m, botchan_tokenizer.path, extra={"step": steps[-1]})
    return run


def test_a_folder_holding_a_model_resolves_to_it(tmp_path, botchan_tokenizer, capsys):
    import pytest

    from llamalab.common import LlamalabError
    from llamalab.model.folder import load, resolve_model_path

    run = _tiny_run(tmp_path, botchan_tokenizer)
    newest = run / "checkpoints" / "step_000004" / "model"
    assert resolve_model_path(run) == newest  # a run stopped early: its newest checkpoint
    assert "using the newest checkpoint" in capsys.readouterr().err
    assert resolve_model_path(run / "checkpoints") == newest
    assert resolve_model_path(run / "checkpoints" / "step_000002") == run / "checkpoints" / "step_000002" / "model"
    assert resolve_model_path(newest) == newest
    assert load(run / "checkpoints", device="cpu").meta["step"] == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlamalabError, match=r"RUN/model or RUN/checkpoints/step_N/model"):
        resolve_model_path(tmp_path / "empty")
    # every command that takes a model goes through the loader: convert, given the checkpoints folder
    assert main(["convert", str(run / "checkpoints"), str(tmp_path / "hf")]) == 0
    import json

    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 1
    final = _tiny_run(tmp_path / "done", botchan_tokenizer, final=True)
    assert resolve_model_path(final) == final / "model"  # a completed run: its final model/
