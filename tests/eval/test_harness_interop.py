"""lm-evaluation-harness interop: the same per-item results three ways.

1. ``llamalab eval run`` (our scoring);
2. lm-eval's ``local-completions`` model against a real ``llamalab serve`` subprocess: the requests it sends are
   built here exactly as lm-eval 0.4's ``TemplateAPI`` / ``LocalCompletionsAPI`` build them (HF tokenizer of the
   exported folder, ``_encode_pair``, left truncation to ``max_length - 1``, a batch of token-id prompts with
   ``echo: true, logprobs: 1, max_tokens: 1, temperature: 0``) and scored as its ``parse_logprobs`` does (the sum
   of ``token_logprobs[ctxlen:-1]``: it drops the last token, the generated one);
3. lm-eval's ``hf`` model on the exported HF folder: transformers' LlamaForCausalLM scoring the pairs HFLM encodes.

Each item's log-likelihoods, ``acc`` and ``acc_norm`` (lm-eval's rule: ``len(choice)``, the continuation minus its
leading space) must agree. lm_eval itself is heavy and not installed here; when it is, the last test runs its own
model classes on the same requests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llamalab.commands.eval.run import Config as EvalRunConfig
from llamalab.commands.eval.run import main as eval_run
from llamalab.eval.loglik import choice_text
from llamalab.eval.tasks import choice_pairs, get_task, load_items
from llamalab.interop.convert import convert
from llamalab.model.folder import save_model
from tests.conftest import shared_path
from tests.inference.conftest import small_model
from tests.interop.bpe_models import bpe_model_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

N_ARC, N_MMLU = 8, 4
MAX_LENGTH = 1024  # lm-eval's max_length model arg (the model's context)


def _tasks():
    return [("arc_easy", shared_path("eval/arc/ARC-Easy-Dev.jsonl"), N_ARC),
            ("mmlu", shared_path("eval/mmlu.jsonl.gz"), N_MMLU)]


@pytest.fixture(scope="module", params=["smollm", "spm"])
def setup(request, tmp_path_factory):
    """(model folder, its HF export, add_bos_token for lm-eval's model args) for a BPE (no BOS) and a SentencePiece
    (BOS) model; lm-eval adds no BOS unless told (``add_bos_token=True``), as its docs say for Llama models."""
    root = tmp_path_factory.mktemp(f"harness-{request.param}")
    if request.param == "smollm":
        folder = bpe_model_folder(root, "smollm", seed=7, max_seq_len=MAX_LENGTH)
    else:
        folder = save_model(root / "model-spm", small_model(7, max_seq_len=MAX_LENGTH), tokenizer_path=shared_path(
            "tokenizer/llama_spm/llama_tokenizer.model"))
    hf = convert(folder, root / "hf", to="hf")[2]
    return folder, hf, request.param == "spm"


@pytest.fixture(scope="module")
def ours(setup, tmp_path_factory):
    """`llamalab eval run` on the items -> {task: per-item records}."""
    folder, _, _ = setup
    out = tmp_path_factory.mktemp("ours")
    res = {}
    for name, path, n in _tasks():
        eval_run(EvalRunConfig(model=str(folder), task=[name], path=[str(path)], limit=n, output=str(out),
                               device="cpu", dtype="fp32", batch_size=4))
        res[name] = json.loads((out / f"{name}.json").read_text())["items"]
    return res


def _requests(name, path, n):
    """What lm-eval's multiple-choice task hands the model: per item, (context, continuation) per choice, the raw
    choices (for acc_norm) and the gold index. Our task formats are lm-eval's (tests/eval/test_tasks.py)."""
    task = get_task(name, -1)
    items = load_items(task, path, n)
    pool = load_items(task, path, 0)
    out = []
    for it in items:
        pairs, conts = choice_pairs(task, it, pool, str(path))
        out.append((pairs, [choice_text(c) for c in conts], it.fields["gold"]))
    return out


class LmEvalTokens:
    """lm-eval's TemplateLM tokenisation with an HF tokenizer (``tok_encode``, ``_encode_pair``, prefix token)."""

    def __init__(self, hf_dir, add_bos_token: bool) -> None:
        self.tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        self.add_bos_token = add_bos_token

    def tok_encode(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=self.add_bos_token)["input_ids"]

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            prefix = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            return [prefix], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]


def local_completions(url: str, lm: LmEvalTokens, pairs, max_length: int = MAX_LENGTH) -> list[tuple[float, bool]]:
    """lm-eval's ``local-completions`` loglikelihood for ``pairs`` (one batch), against the server at ``url``."""
    enc = [lm.encode(c, x) for c, x in pairs]
    limit = max_length - 1  # "max_length - 1 as we always have 1 token for generation"
    inputs, ctxlens = [], []
    for ctx, cont in enc:
        inputs.append((ctx + cont)[-limit:])
        ctxlens.append(len(ctx) - max(0, len(ctx) + len(cont) - limit))
    payload = {"model": "m", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    r = httpx.post(url + "/v1/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    res = []
    for choice, ctxlen, inp in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), ctxlens, inputs):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(inp) + 1  # the prompt, echoed, and the one generated token (EOS or not)
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        greedy = all(t == max(top.values()) for t, top in zip(lps[ctxlen:-1], tops))
        res.append((sum(lps[ctxlen:-1]), greedy))
    return res


def hf_loglikelihood(model, lm: LmEvalTokens, pairs) -> list[float]:
    """lm-eval's ``hf`` model: the continuation's summed log-probabilities under LlamaForCausalLM."""
    out = []
    for c, x in pairs:
        ctx, cont = lm.encode(c, x)
        inp = (ctx + cont)[-(MAX_LENGTH + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
        out.append(float(logp[len(inp) - len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def lm_eval_metrics(lls, choices, gold) -> tuple[float, float]:
    """lm-eval's multiple-choice acc and acc_norm (``ConfigurableTask.process_results``)."""
    lls = np.array(lls)
    completion_len = np.array([float(len(c)) for c in choices])
    return float(np.argmax(lls) == gold), float(np.argmax(lls / completion_len) == gold)


def test_same_items_three_ways(setup, ours):
    from llamalab.eval.loglik import encode_pair
    from llamalab.model.folder import load_tokenizer
    from tests.serve.conftest import ServeProcess

    folder, hf_dir, add_bos = setup
    lm = LmEvalTokens(hf_dir, add_bos)
    tok = load_tokenizer(folder)  # the HF tokenizer of the export splits every pair as llamalab does
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    server = ServeProcess(folder, "--slots", "4", name="m")
    try:
        for name, path, n in _tasks():
            for rec, (pairs, choices, gold) in zip(ours[name], _requests(name, path, n)):
                assert [lm.encode(c, x) for c, x in pairs] == [encode_pair(tok, c, x, bos=tok.add_bos)
                                                                for c, x in pairs]
                served = local_completions(server.url, lm, pairs)
                theirs_hf = hf_loglikelihood(hf_model, lm, pairs)
                np.testing.assert_allclose([s[0] for s in served], rec["loglik"], atol=2e-3, rtol=1e-4)
                np.testing.assert_allclose(theirs_hf, rec["loglik"], atol=2e-3, rtol=1e-4)
                assert [s[1] for s in served] == rec["is_greedy"]
                for lls in ([s[0] for s in served], theirs_hf):
                    assert lm_eval_metrics(lls, choices, gold) == (rec["acc"], rec["acc_norm"]), (name, rec["id"])
    finally:
        server.stop()


def test_echo_scoring_returns_a_generated_eos(tmp_path):
    """A model whose greedy next token is always EOS: `max_tokens: 1` with echo + logprobs still returns it (with
    its log-probability), as lm-eval needs; a plain request still stops there with no text."""
    from llamalab.model.folder import load
    from llamalab.tokenizer import BPETokenizer
    from tests.serve.conftest import LiveServer

    base = bpe_model_folder(tmp_path, "smollm", seed=1)
    loaded = load(base, device="cpu")
    spec = json.loads((base / "tokenizer.json").read_text())
    tok = BPETokenizer.from_spec(spec, bos="<|im_start|>", eos="<|endoftext|>")  # EOS id 0
    with torch.no_grad():
        loaded.model.output.weight.zero_()  # every logit 0: greedy takes the first id, EOS
    folder = save_model(tmp_path / "eos", loaded.model, tokenizer=tok)
    server = LiveServer(folder)
    try:
        prompt = tok.encode("Question: who?\nAnswer: Botchan")
        body = {"model": "tiny-chat", "prompt": [prompt], "max_tokens": 1, "logprobs": 1, "echo": True,
                "temperature": 0}
        choice = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(prompt) + 1 and lps[0] is None
        assert lps[-1] == pytest.approx(-float(np.log(loaded.model.cfg.vocab_size)), abs=1e-4)  # uniform: log 1/V
        plain = httpx.post(server.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "Botchan",
                                                                  "max_tokens": 5, "temperature": 0}, timeout=60)
        assert plain.json()["choices"][0]["text"] == "" and plain.json()["choices"][0]["finish_reason"] == "stop"
    finally:
        server.close()


def test_with_lm_eval_itself(setup, ours):
    """lm-eval's own ``local-completions`` and ``hf`` classes on the same requests (when lm_eval is installed)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from tests.serve.conftest import ServeProcess

    folder, hf_dir, add_bos = setup
    server = ServeProcess(folder, "--slots", "4", name="m")
    try:
        api = get_model("local-completions")(model="m", base_url=server.url + "/v1/completions",
                                             tokenizer_backend="huggingface", tokenizer=str(hf_dir),
                                             max_length=MAX_LENGTH, add_bos_token=add_bos, num_concurrent=1)
        hf = get_model("hf")(pretrained=str(hf_dir), device="cpu", dtype="float32", add_bos_token=add_bos)
        for name, path, n in _tasks():
            for rec, (pairs, choices, gold) in zip(ours[name], _requests(name, path, n)):
                reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
                for lm in (api, hf):
                    lls = [ll for ll, _ in lm.loglikelihood(reqs)]
                    np.testing.assert_allclose(lls, rec["loglik"], atol=2e-3, rtol=1e-4)
                    assert lm_eval_metrics(lls, choices, gold) == (rec["acc"], rec["acc_norm"])
    finally:
        server.stop()
