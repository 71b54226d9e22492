"""GGUF export/import: logits survive the round trip (f32 exactly, f16 and q8_0 within stated
tolerances), both tokenizer kinds import, and the real LLaMA vocab GGUF rebuilds the same tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamalab.common import LlamalabError
from tests.conftest import shared_path

gguf = pytest.importorskip("gguf")

TOK = "tokenizer/llama_spm/llama_tokenizer.model"


def _model(tie: bool):
    from llamalab.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16,
                      max_seq_len=64, tie_embeddings=tie)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


# rel = ||logits_imported - logits|| / ||logits||; q8_0 rounds each weight to 1/254 of its block's max
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 2e-2}


@pytest.mark.parametrize("gtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tie", [False, True])
def test_export_import_reproduces_logits(tmp_path, gtype, tie):
    from llamalab.commands.convert import Config, main
    from llamalab.model.folder import load_model, save_model

    model = _model(tie)
    src = save_model(tmp_path / "src", model, tokenizer_path=shared_path(TOK), extra={"chat_template": "chatml"})
    out = main(Config(src=str(src), dst=str(tmp_path / "m.gguf"), to="gguf", gguf_type=gtype))
    back = main(Config(src=str(out), dst=str(tmp_path / "back")))
    m2, meta = load_model(back)
    assert meta["chat_template"] == "chatml"
    x = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204]])
    with torch.no_grad():
        a, b = model(x), m2(x)
    rel = ((a - b).norm() / a.norm()).item()
    if gtype == "f32":
        assert torch.equal(a, b)
    else:
        assert rel < TOLERANCE[gtype], rel
    from llamalab.model.folder import load_tokenizer

    assert load_tokenizer(back).encode("Hello world") == load_tokenizer(src).encode("Hello world")


def test_real_llama_vocab_gguf_rebuilds_the_tokenizer(tmp_path):
    import sentencepiece as spm

    from llamalab.interop.gguf import read_gguf, spm_model_bytes

    kv = read_gguf(shared_path("tokenizer/llama_spm/ggml-vocab-llama-spm.gguf")).kv
    sp = spm.SentencePieceProcessor(model_proto=spm_model_bytes(kv))
    ref = spm.SentencePieceProcessor(model_file=str(shared_path(TOK)))
    for text in ["Hello world", " leading space", "numbers 12345 and émojis 🦙", "東京タワー", "a\n\nb\tc"]:
        assert sp.encode(text) == ref.encode(text), text


def _write_gpt2_gguf(path, model) -> list[str]:
    """A LLaMA GGUF whose tokenizer is byte-level BPE ('gpt2'), with a few merges, as llama.cpp writes."""
    from llamalab.interop.gguf import add_llama_keys, name_map
    from llamalab.tokenizer.bpe import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r"]
    tokens = ["<|begin|>", "<|end|>"] + byte_tokens + ["Ġt", "he", "Ġthe", "Ġw", "or"]
    tokens += [f"<|unused{i}|>" for i in range(model.cfg.vocab_size - len(tokens))]
    types = [3, 3] + [1] * (len(tokens) - 2)
    w = gguf.GGUFWriter(str(path), "llama")
    cfg = model.cfg
    add_llama_keys(w, cfg)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    sd = model.state_dict()
    for g, ours in name_map(cfg).items():
        arr = sd[ours].float().numpy()
        if arr.ndim == 2 and arr.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_import_gpt2_bpe_tokenizer_and_generate(tmp_path):
    from llamalab.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=16, max_seq_len=64)
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    tokens = _write_gpt2_gguf(tmp_path / "bpe.gguf", model)
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams
    from llamalab.interop.gguf import import_gguf

    out = import_gguf(tmp_path / "bpe.gguf", tmp_path / "bpe")
    engine = Engine.from_folder(out, slots=1)
    tok = engine.tokenizer
    ids = tok.encode("the world", bos=True)
    assert ids[0] == 0
    assert tok.decode(ids) == "the world"
    assert tokens.index("Ġw") in ids and tokens.index("or") in ids  # merges applied
    text = "naïve café 🦙"
    assert tok.decode(tok.encode(text)) == text  # every byte round-trips
    o = engine.generate(["the world"], SamplingParams(max_tokens=5, temperature=0))[0]
    assert len(o.token_ids) >= 1
    with torch.no_grad():  # q8_0 weights were dequantised on load: close to the original
        x = torch.tensor([ids])
        a = model(x)
        b = engine.runner.prefill(0, ids, all_logits=True)[None]
    assert ((a - b).norm() / a.norm()).item() < TOLERANCE["q8_0"]


def test_bad_gguf_files(tmp_path):
    from llamalab.interop.gguf import import_gguf

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LlamalabError, match="GGUF"):
        import_gguf(bad, tmp_path / "o")
    with pytest.raises(LlamalabError, match="vocabulary-only|token_embd"):
        import_gguf(shared_path("tokenizer/llama_spm/ggml-vocab-llama-spm.gguf"), tmp_path / "o2")
