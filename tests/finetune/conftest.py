"""Fixtures for SFT tests: a tiny base model folder with the Botchan tokenizer, data-file writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def sft_tok(botchan_tokenizer):
    return botchan_tokenizer


@pytest.fixture
def tiny_base(tmp_path, tiny_config, sft_tok) -> Path:
    """A randomly initialised tiny model folder (vocab of the Botchan tokenizer, 128-token context)."""
    from llamalab.model import Transformer
    from llamalab.model.folder import save_model

    tiny_config.vocab_size = sft_tok.vocab_size
    tiny_config.max_seq_len = 128
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    return save_model(tmp_path / "base", model, sft_tok.path)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path
