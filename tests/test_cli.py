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
