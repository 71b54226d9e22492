"""Engine correctness: the fused runner equals Transformer.forward, batching equals one-at-a-time,
greedy equals Hugging Face generate, streaming equals non-streaming, stop strings and EOS cut."""

from __future__ import annotations

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.inference.engine import Engine, IncrementalDetokenizer, stop_hold
from llamalab.inference.runner import Runner
from llamalab.inference.sampling import SamplingParams
from tests.inference.conftest import small_model

PROMPTS = ["Once upon a time", "The capital of France is", "a", "In 1492, Columbus sailed the ocean blue and then",
           "Hello"]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("n_kv,tie", [(2, False), (4, True)])
def test_runner_matches_transformer(n_kv, tie, native):
    """``native``: each decode layer's RoPE, cache write and attention as one call (llamalab.model.fused), else
    PyTorch's ops."""
    from llamalab.model import fused

    model = small_model(1, n_kv_heads=n_kv, tie=tie)
    r = Runner(model, slots=3)
    assert r._native_attn == (fused.load() is not None)
    if native and not r._native_attn:
        pytest.skip(f"fused ops not built: {fused.why_not()}")
    r._native_attn = native
    ids = [list(range(5, 5 + n)) for n in (7, 3, 12)]
    with torch.inference_mode():
        for s, x in enumerate(ids):
            ref = model(torch.tensor([x]))[0]
            torch.testing.assert_close(r.prefill(s, x, all_logits=True), ref, atol=1e-4, rtol=1e-4)
        nxt = [11, 12, 13]
        for step in range(3):  # three decode steps, rows at different positions
            lg = r.decode(torch.tensor(nxt))
            for s, x in enumerate(ids):
                x.append(nxt[s])
                ref = model(torch.tensor([x]))[0, -1]
                torch.testing.assert_close(lg[s], ref, atol=1e-4, rtol=1e-4)
    # slot moves keep the cache: move slot 2 into 0 and decode slot 0 alone
    r.move_slot(2, 0)
    lg = r.decode(torch.tensor([99]))
    ref = model(torch.tensor([ids[2] + [99]]))[0, -1]
    torch.testing.assert_close(lg[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_compiled_decode_matches_eager(quantize):
    """``compile=True`` traces the whole decode step as one graph (real-arithmetic rotation, no graph breaks; the
    native quantised kernel as the custom op ``llamalab::qgemm``) and gives eager's logits for rows at different
    positions; the growing length does not recompile it."""
    import torch._dynamo

    from llamalab.inference import kernels

    if quantize != "none" and kernels.load() is None:
        pytest.skip(f"native kernel not built: {kernels.why_not()}")
    model = small_model(2, n_kv_heads=2)
    if quantize != "none":  # the native kernel needs whole 32-blocks: a hidden size of 192
        from llamalab.model import ModelConfig, Transformer

        torch.manual_seed(2)
        model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000,
                                        multiple_of=32, max_seq_len=128)).eval()
    eager = Runner(model, slots=2, quantize=quantize)
    comp = Runner(model, slots=2, quantize=quantize, compile=True)
    if quantize != "none":
        from llamalab.inference.quantize import BlockLinear

        assert isinstance(comp.layers[0].w2, BlockLinear) and eager._fuse and not comp._fuse
    torch._dynamo.reset()
    for r in (eager, comp):
        r.prefill(0, list(range(5, 12)))
        r.prefill(1, list(range(20, 23)))
    for step in range(4):
        toks = torch.tensor([30 + step, 40 + step])
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            torch.testing.assert_close(comp.decode(toks), eager.decode(toks), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0),
    SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7, logprobs=2),
], ids=["greedy", "sampled"])
def test_batched_equals_one_at_a_time(llama_tok, params):
    model = small_model()
    batched = Engine(model, llama_tok, slots=3).generate(PROMPTS, params)  # 5 prompts, 3 slots: slots get reused
    for prompt, out in zip(PROMPTS, batched):
        single = Engine(model, llama_tok, slots=1).generate([prompt], params)[0]
        assert out.token_ids == single.token_ids, prompt
        assert out.text == single.text
    assert len({tuple(o.token_ids) for o in batched}) > 1


def test_greedy_matches_hf_generate(llama_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llamalab.interop.hf import export_hf

    model = small_model(2)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    engine = Engine(model, llama_tok, slots=2)
    for prompt in PROMPTS[:3]:
        ids = llama_tok.encode(prompt, bos=True)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
        ours = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids
        assert ours == ref, prompt


def test_streaming_equals_non_streaming(llama_tok):
    model = small_model()
    p = SamplingParams(max_tokens=24, temperature=0.8, seed=3)
    engine = Engine(model, llama_tok, slots=2)
    full = engine.generate([PROMPTS[0]], p)[0]
    deltas = list(engine.stream(PROMPTS[0], p))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == full.finish_reason
    assert full.text == llama_tok.decode(llama_tok.encode(PROMPTS[0], bos=True) + full.token_ids)[len(PROMPTS[0]):]


def test_stop_strings_cut(llama_tok):
    model = small_model()
    engine = Engine(model, llama_tok, slots=2)
    base = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=30, temperature=0))[0].text
    assert len(base) > 12
    stop = base[6:9]
    cut = base[:base.index(stop)]
    p = SamplingParams(max_tokens=30, temperature=0, stop=[stop, "never-appears-xyz"])
    out = engine.generate([PROMPTS[1]], p)[0]
    assert out.text == cut and out.finish_reason == "stop"
    streamed = "".join(d.text for d in engine.stream(PROMPTS[1], p))
    assert streamed == cut


def test_stop_hold():
    assert stop_hold("hello wor", ["world"]) == 3
    assert stop_hold("hello", ["xyz"]) == 0
    assert stop_hold("abc\n", ["\n\n", "c\nX"]) == 2


def test_eos_stop_token_and_max_tokens(llama_tok):
    model = small_model()
    engine = Engine(model, llama_tok, slots=2)
    base = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert len(base.token_ids) == 10 and base.finish_reason == "length"
    third = base.token_ids[2]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[third]))[0]
    first = base.token_ids.index(third)
    assert out.token_ids == base.token_ids[:first] and out.finish_reason == "stop"
    engine.tokenizer.eos_id, eos = third, engine.tokenizer.eos_id
    try:
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0))[0]
        assert out.token_ids == base.token_ids[:first] and out.finish_reason == "stop"
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == base.token_ids
    finally:
        engine.tokenizer.eos_id = eos


def test_context_limit_finishes_with_length(llama_tok):
    model = small_model(max_seq_len=32)
    engine = Engine(model, llama_tok, slots=1)
    ids = llama_tok.encode(PROMPTS[3], bos=True)
    out = engine.generate([ids], SamplingParams(max_tokens=100, temperature=0))[0]
    assert len(ids) + len(out.token_ids) == 32 and out.finish_reason == "length"
    with pytest.raises(LlamalabError, match="context"):
        engine.generate([list(range(3, 40))], SamplingParams(max_tokens=1))


def test_logprobs_match_model(llama_tok):
    model = small_model()
    engine = Engine(model, llama_tok, slots=2)
    ids = llama_tok.encode(PROMPTS[1], bos=True)
    out = engine.generate([ids], SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=1))[0]
    full = ids + out.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full]))[0], -1)
    for t, tl in enumerate(out.logprobs):
        pos = len(ids) - 1 + t
        assert tl.token_id == full[pos + 1]
        assert abs(tl.logprob - lp[pos, tl.token_id].item()) < 1e-4
        assert tl.top[0][0] == tl.token_id  # greedy: the chosen token is the most likely
        assert len(tl.top) == 3
    assert out.prompt_logprobs[0] is None
    for t in range(1, len(ids)):
        assert abs(out.prompt_logprobs[t].logprob - lp[t - 1, ids[t]].item()) < 1e-4


def test_seed_reproducible_and_different(llama_tok):
    engine = Engine(small_model(), llama_tok, slots=2)
    p = lambda s: SamplingParams(max_tokens=16, temperature=1.0, seed=s)  # noqa: E731
    a, b, c = engine.generate([PROMPTS[0]] * 3, [p(1), p(1), p(2)])
    assert a.token_ids == b.token_ids != c.token_ids


def test_top_k_one_is_greedy(llama_tok):
    engine = Engine(small_model(), llama_tok, slots=1)
    g = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0))[0]
    k1 = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=5))[0]
    p0 = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=5))[0]
    assert g.token_ids == k1.token_ids == p0.token_ids


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0),
                                         ("top_k", -3), ("repetition_penalty", 0.0), ("logprobs", 99)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(LlamalabError, match=field):
        SamplingParams(**{field: value}).validate()


def test_int8_close_to_fp32(llama_tok):
    model = small_model()
    ids = llama_tok.encode(PROMPTS[3], bos=True)
    ref = Runner(model, slots=1).prefill(0, ids, all_logits=True)
    for q, tol in (("int8", 0.05), ("int8-wo", 0.05)):
        got = Runner(model, slots=1, quantize=q).prefill(0, ids, all_logits=True)
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < tol, (q, rel)
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree > 0.8, (q, agree)


def test_incremental_detokenizer_multibyte(llama_tok):
    text = " héllo 🦙 world, 東京 ok"
    ids = llama_tok.encode(text)
    d = IncrementalDetokenizer(llama_tok, [llama_tok.bos_id])
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == llama_tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
