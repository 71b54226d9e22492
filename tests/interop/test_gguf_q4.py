"""GGUF q4_0 / q4_1 / q8_0: we export them (the layers in the named type, the embedding/head in q8_0), the ``gguf``
package's reader reads back the values we hold, and a quantised engine runs the file's own blocks (no
re-quantisation) with the greedy tokens of the same weights dequantised to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import shared_path

gguf = pytest.importorskip("gguf")

TOK = "tokenizer/llama_spm/llama_tokenizer.model"


def _folder(tmp_path, tie: bool):
    from llamalab.model import ModelConfig, Transformer
    from llamalab.model.folder import save_model

    # multiple_of=32: every matrix has whole 32-blocks (hidden 192), so every one is quantised
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                      max_seq_len=64, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions: greedy decoding has clear winners (no near-ties)
        (model.tok_embeddings.weight if tie else model.output.weight).mul_(8.0 if tie else 25.0)
    return save_model(tmp_path / "src", model, tokenizer_path=shared_path(TOK), extra={"chat_template": "chatml"})


@pytest.mark.parametrize("gtype,tie", [("q4_0", False), ("q4_1", True), ("q8_0", False)])
def test_quantised_gguf_runs_its_own_blocks(tmp_path, gtype, tie):
    from llamalab.commands.convert import Config, main
    from llamalab.inference.engine import Engine
    from llamalab.inference.quantize import BlockLinear, ExactTop, Int4Linear
    from llamalab.inference.sampling import SamplingParams
    from llamalab.interop.gguf import block_weight
    from llamalab.model.folder import load

    path = main(Config(src=str(_folder(tmp_path, tie)), dst=str(tmp_path / "m.gguf"), to="gguf", gguf_type=gtype))
    loaded = load(path, device="cpu")
    model = loaded.model
    r = gguf.GGUFReader(str(path))
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == Q[gtype.upper()]
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.0.attn_norm.weight"] == Q.F32
    assert ("output.weight" in types) == (not tie) and types.get("output.weight", Q.Q8_0) == Q.Q8_0
    # the gguf package reads back exactly the values llamalab loaded, and the blocks we keep hold them
    from llamalab.interop.gguf import name_map

    names = name_map(model.cfg)
    params = dict(model.named_parameters())
    for t in r.tensors:
        ours = names[t.name]
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
        assert torch.equal(params[ours].detach(), theirs.reshape(params[ours].shape)), t.name
        if len(t.shape) == 2:
            qw = model.quant_weights[ours]
            assert qw.kind == ("q8" if t.tensor_type == Q.Q8_0 else "q4")
            torch.testing.assert_close(qw.dequantize(), params[ours].detach(), atol=1e-6, rtol=1e-6)
            assert block_weight(t.data, int(t.tensor_type), tuple(params[ours].shape)).q.equal(qw.q)
    assert len(model.quant_weights) == 7 * 2 + 1 + (not tie)

    # a quantised engine runs the file's blocks: q4 files stay q4 even under int8 (nothing re-quantised)
    fp32 = Engine(model, loaded.tokenizer, slots=1)
    want_kind = "q8" if gtype == "q8_0" else "q4"
    for quantize in ("int4", "int8"):
        eng = Engine(model, loaded.tokenizer, slots=1, quantize=quantize)
        layer = eng.runner.layers[0]
        for lin in (layer.wqkv, layer.wo, layer.w13, layer.w2):
            assert isinstance(lin, (BlockLinear, Int4Linear)) and lin.kind == want_kind
        assert isinstance(eng.runner.output, ExactTop) and eng.runner.output.lin.kind == "q8"
        ids = loaded.tokenizer.encode("The capital of France is", bos=True)
        a = fp32.runner.prefill(0, ids, all_logits=True)
        b = eng.runner.prefill(0, ids, all_logits=True)
        assert ((a - b).norm() / a.norm()).item() < 1e-2  # 8-bit activations only: the weights are the same
        p = SamplingParams(max_tokens=16, temperature=0)
        assert eng.generate([ids], p)[0].token_ids == fp32.generate([ids], p)[0].token_ids

    # weights changed after loading (trained, say) are no longer the file's: they are quantised afresh
    with torch.no_grad():
        model.layers[0].attention.wq.weight.add_(0.01)
    eng = Engine(model, loaded.tokenizer, slots=1, quantize="int8")
    assert eng.runner.layers[0].wqkv.kind == "q8" and eng.runner.layers[1].wqkv.kind == want_kind


def test_rows_not_whole_blocks_are_written_f16(tmp_path):
    from llamalab.interop.gguf import export_gguf
    from llamalab.model import ModelConfig, Transformer
    from llamalab.model.folder import load

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    path = export_gguf(Transformer(cfg).eval(), tmp_path / "m.gguf", "q4_0")  # hidden 176: ffn_down rows 176
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    model = load(path, device="cpu", with_tokenizer=False).model
    assert "layers.0.feed_forward.w2.weight" not in model.quant_weights
    assert "layers.0.feed_forward.w3.weight" in model.quant_weights


@pytest.mark.parametrize("style", ["smollm", "llama3"])
def test_q4_0_file_of_a_bpe_model_keeps_its_vocabulary(tmp_path, style):
    """A byte-level BPE model (SmolLM2 / Llama 3 style) written as q4_0: the gguf reader finds the tokens in id
    order, their types (special tokens CONTROL), the merges; llamalab reads back the same encodings and rule."""
    import json

    from llamalab.interop.convert import convert
    from llamalab.model.folder import load
    from tests.interop.bpe_models import bpe_model_folder
    from tests.tokenizer.cases import varied_strings

    src = bpe_model_folder(tmp_path, style, seed=2)
    path = convert(src, tmp_path / "m.gguf", to="gguf", gguf_type="q4_0")[2]
    ref = load(src, device="cpu").tokenizer
    spec = json.loads((src / "tokenizer.json").read_text())
    r = gguf.GGUFReader(str(path))

    def field(key):
        return r.fields[key].contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert field("tokenizer.ggml.model") == "gpt2"
    assert tokens[:ref.vocab_size] == [ref.tk.id_to_token(i) for i in range(ref.vocab_size)]
    specials = {a["id"] for a in spec["added_tokens"] if a["special"]}
    assert {i for i, t in enumerate(types) if t == 3} == specials and types[5] == 1  # 3 CONTROL, 1 NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field("tokenizer.ggml.merges") == merges
    assert field("tokenizer.ggml.add_bos_token") == ref.add_bos
    back = load(path, device="cpu").tokenizer
    strings = varied_strings()
    assert [back.encode(s, bos=back.add_bos) for s in strings] == [ref.encode(s, bos=ref.add_bos) for s in strings]
    assert back.add_bos == ref.add_bos and back.stop_ids == ref.stop_ids
