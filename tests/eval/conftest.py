"""Fixtures for evaluation tests: a random tiny model folder with the Botchan tokenizer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine can be 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_model_folder(tmp_path_factory, botchan_tokenizer):
    """A saved llamalab model folder: random weights (seed 0), vocabulary of the Botchan tokenizer."""
    from llamalab.model import ModelConfig, Transformer
    from llamalab.model.folder import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=botchan_tokenizer.vocab_size,
                      multiple_of=16, max_seq_len=256)
    model = Transformer(cfg).eval()
    folder = tmp_path_factory.mktemp("evalmodel") / "model"
    save_model(folder, model, botchan_tokenizer.path)
    return folder


@pytest.fixture(scope="session")
def eval_model(eval_model_folder):
    from llamalab.model.folder import load

    loaded = load(eval_model_folder, "cpu", "fp32")
    return loaded.model, loaded.tokenizer
