"""`release verify`'s format check: an f16 GGUF is held to a tolerance relative to the logits' size (f16 rounds
each weight by up to 2^-11 relative, so a real model's logits of ~30 move by ~0.03), while a wrong file still fails."""

from __future__ import annotations

import pytest
import torch

from llamalab.release.verify import VerifyReport, check_formats

pytest.importorskip("gguf")


def _bundle(root, cfg, tok_path, scale: float, other_seed: int | None = None):
    from llamalab.interop.gguf import export_gguf
    from llamalab.interop.hf import export_hf
    from llamalab.model import Transformer
    from llamalab.model.folder import save_model

    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.output.weight.mul_(scale)  # large logits, as a trained model has
    save_model(root / "model", model, tok_path)
    export_hf(model, root / "hf")
    if other_seed is not None:  # a GGUF of some other model: must fail whatever the scale
        torch.manual_seed(other_seed)
        model = Transformer(cfg)
        with torch.no_grad():
            model.output.weight.mul_(scale)
    export_gguf(model, root / "model.gguf", "f16", tok_file=tok_path)
    return {"formats": {"llamalab": "model", "hf": "hf", "gguf": "model.gguf", "gguf_type": "f16"}}


def _gguf_row(report: VerifyReport):
    return next(r for r in report.rows if r[0] == "format gguf f16")


def test_f16_gguf_tolerance_scales_with_the_logits(tmp_path, tiny_config, botchan_tokenizer):
    tiny_config.vocab_size = botchan_tokenizer.vocab_size
    tiny_config.tie_embeddings = False
    index = _bundle(tmp_path / "a", tiny_config, botchan_tokenizer.path, scale=400.0)
    report = VerifyReport()
    check_formats(tmp_path / "a", index, report)
    check, status, detail = _gguf_row(report)
    assert "x max |logit|" in detail
    diff = float(detail.split("max |logit diff| ")[1].split(" ")[0])
    assert diff > 1e-2 and status == "PASS", detail  # f16 of large logits: beyond the old absolute 0.01
    index = _bundle(tmp_path / "b", tiny_config, botchan_tokenizer.path, scale=400.0, other_seed=1)
    report = VerifyReport()
    check_formats(tmp_path / "b", index, report)
    assert _gguf_row(report)[1] == "FAIL"
