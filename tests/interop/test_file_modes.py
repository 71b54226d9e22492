"""Model files get the user's umask mode, not safetensors' 0600: model folders, checkpoints, exports, adapters."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from llamalab.model import ModelConfig, Transformer


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


def test_written_files_follow_the_umask(tmp_path, umask):
    from llamalab.finetune.lora import LoRAConfig, apply_lora, save_adapter
    from llamalab.interop.convert import convert
    from llamalab.model.folder import file_mode, save_model
    from llamalab.train.checkpoint import TrainState, save_checkpoint
    from tests.conftest import shared_path

    want = 0o666 & ~umask
    assert file_mode() == want
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=16, max_seq_len=32))
    folder = save_model(tmp_path / "m", model, tokenizer_path=shared_path("tokenizer/llama_spm/llama_tokenizer.model"))
    opt = torch.optim.AdamW(model.parameters())
    ck = save_checkpoint(tmp_path / "ck", model, opt, TrainState(step=1, tokens_seen=10), {})
    hf = convert(folder, tmp_path / "hf", to="hf")[2]
    written = {"model": _modes(folder), "checkpoint": _modes(ck), "hf": _modes(hf)}
    pytest.importorskip("gguf")
    g = convert(folder, tmp_path / "m.gguf", to="gguf", gguf_type="f32")[2]
    written["gguf"] = {"m.gguf": stat.S_IMODE(g.stat().st_mode)}
    written["gguf-import"] = _modes(convert(g, tmp_path / "back")[2])
    lora = LoRAConfig(rank=2, targets=["wq"])
    apply_lora(model, lora)
    written["adapter"] = _modes(save_adapter(tmp_path / "adapter", model, lora, {}))
    for what, modes in written.items():
        assert modes and set(modes.values()) == {want}, (what, {k: oct(v) for k, v in modes.items()})
    assert "model.safetensors" in written["model"] and "optimizer.safetensors" in written["checkpoint"]
