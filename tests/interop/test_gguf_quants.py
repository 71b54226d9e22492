"""GGUF import of quantised files: every type the ``gguf`` package can write (``gguf.quants.quantize``: the legacy
q4_0, q4_1, q5_0, q5_1, q8_0 and f16/bf16) and the k-quants it can only read (q2_k .. q6_k, the types llama.cpp's
``Q4_K_M`` & co. files are made of). Expected weights are the gguf package's own dequantisation of the very
blocks written, so the test checks what llamalab adds: tensor placement, shapes, offsets and names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamalab.model.folder import load

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402


def _writable(name: str) -> bool:
    try:
        quantize(np.ones((1, 256), np.float32), Q[name])
        return True
    except NotImplementedError:
        return False


LEGACY = [t for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16") if _writable(t)]
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the f16 scale fields in one 256-value block (gguf/quants.py's block layouts)
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# relative logit error vs the unquantised model: a loose sanity bound (the exact check is against dequantize)
SANITY = {"Q4_0": 0.5, "Q4_1": 0.5, "Q5_0": 0.3, "Q5_1": 0.3, "Q8_0": 0.05, "F16": 0.01, "BF16": 0.05}


def _model():
    from llamalab.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=256, max_seq_len=32)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def _k_blocks(shape: tuple[int, int], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """k-quant blocks as a quantiser leaves them: random quants and sub-scales, small positive f16 super-scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    for off in K_SCALES[qtype.name]:
        raw[..., off:off + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.01)).tobytes(), np.uint8)
    return raw.reshape(shape[0], -1)


def _write(path, model, encode) -> dict[str, torch.Tensor]:
    """A LLaMA GGUF with every matrix stored by ``encode(array) -> (raw, qtype)``; returns the weights it should
    load as (our names), norms in f32."""
    from llamalab.interop.gguf import add_llama_keys, name_map

    w = gguf.GGUFWriter(str(path), "llama")
    add_llama_keys(w, model.cfg)
    sd = model.state_dict()
    want = {}
    for g, ours in name_map(model.cfg).items():
        arr = sd[ours].float().numpy()
        if arr.ndim == 1:
            w.add_tensor(g, arr)
            want[ours] = torch.from_numpy(arr.copy())
            continue
        raw, qtype = encode(arr)
        w.add_tensor(g, raw, raw_dtype=qtype)
        want[ours] = torch.from_numpy(np.asarray(dequantize(raw, qtype), np.float32).reshape(arr.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def _check(path, want):
    loaded = load(path, device="cpu", dtype="fp32", with_tokenizer=False)
    got = loaded.model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    return loaded.model


@pytest.mark.parametrize("qname", LEGACY)
def test_files_quantised_by_the_gguf_package(tmp_path, qname):
    model = _model()
    want = _write(tmp_path / "m.gguf", model, lambda a: (quantize(a, Q[qname]), Q[qname]))
    back = _check(tmp_path / "m.gguf", want)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        a, b = model(x), back(x)
    assert ((a - b).norm() / a.norm()).item() < SANITY[qname]


@pytest.mark.parametrize("qname", K_QUANTS)
def test_k_quant_blocks(tmp_path, qname):
    rng = np.random.default_rng(0)
    want = _write(tmp_path / "m.gguf", _model(), lambda a: (_k_blocks(a.shape, Q[qname], rng), Q[qname]))
    model = _check(tmp_path / "m.gguf", want)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 8)))).all()


def test_mixed_types_as_llama_cpp_writes_them(tmp_path):
    """A Q4_K_M-style file: k-quants for most matrices, q8_0 and f16 for some, f32 norms."""
    rng = np.random.default_rng(1)
    kinds = iter([Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16, Q.Q5_K, Q.Q4_0] * 4)

    def encode(a):
        t = next(kinds)
        return (_k_blocks(a.shape, t, rng), t) if t.name in K_SCALES else (quantize(a, t), t)

    want = _write(tmp_path / "m.gguf", _model(), encode)
    _check(tmp_path / "m.gguf", want)
