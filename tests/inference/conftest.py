"""Fixtures for the engine and server tests: a small random LLaMA with the real LLaMA tokenizer."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import shared_path


@pytest.fixture(scope="session")
def llama_tok_path():
    return shared_path("tokenizer/llama_spm/llama_tokenizer.model")


@pytest.fixture(scope="session")
def llama_tok(llama_tok_path):
    from llamalab.tokenizer import Tokenizer

    return Tokenizer(llama_tok_path)


def small_model(seed: int = 0, n_kv_heads: int = 2, max_seq_len: int = 128, tie: bool = False):
    from llamalab.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=32000, multiple_of=16,
                      max_seq_len=max_seq_len, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    # NOTE: std 0.02 weights give near-uniform next-token distributions; sharpen them so greedy decoding
    # has clear winners (ties would make token-by-token comparisons flaky) and text is not all noise.
    with torch.no_grad():
        model.output.weight.mul_(25.0) if not tie else model.tok_embeddings.weight.mul_(5.0)
    return model


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory, llama_tok_path):
    from llamalab.model.folder import save_model

    d = tmp_path_factory.mktemp("m") / "tiny-chat"
    save_model(d, small_model(), tokenizer_path=llama_tok_path, extra={"chat_template": "llama2"})
    return d
