"""The OpenAI-compatible server, driven by the official ``openai`` client and raw HTTP on loopback."""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]


def test_completion_greedy_equals_engine(client, live):
    from llamalab.inference.engine import Engine
    from llamalab.inference.sampling import SamplingParams
    from llamalab.model.folder import load_model

    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=12, temperature=0)
    ids = live.engine.tokenizer.encode("Once upon a time", bos=True)
    ref = Engine(load_model(live.folder)[0], live.engine.tokenizer, slots=1).generate(
        [ids], SamplingParams(max_tokens=12, temperature=0))[0]
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_completion_streaming_equals_non_streaming(client):
    kw = dict(model="tiny-chat", prompt="The capital of France is", max_tokens=16, temperature=0.7, seed=11)
    full = client.completions.create(**kw).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(chunks) > 1 and "".join(chunks) == full


def test_chat_and_chat_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    r = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0, seed=1)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    stream = client.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts).strip() == text
    assert reasons[-1] in ("stop", "length") and usage.completion_tokens == r.usage.completion_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy picks the top token


def test_echo_logprobs_score_the_prompt(client, live):
    """What lm-evaluation-harness sends for log-likelihoods: echo=True, logprobs=1, max_tokens 0 or 1."""
    import torch

    from llamalab.model.folder import load_model

    tok = live.engine.tokenizer
    ids = tok.encode("The cat sat on the mat", bos=True)
    model, _ = load_model(live.folder)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    want = [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    for mt in (0, 1):
        r = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=mt, temperature=0, echo=True,
                                      logprobs=1)
        lps = r.choices[0].logprobs
        assert lps.token_logprobs[0] is None and len(lps.tokens) == len(ids) + mt
        assert lps.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert r.choices[0].text.startswith(tok.decode(ids))
        assert lps.text_offset[1] == len(lps.tokens[0])


def test_batched_prompts_and_n(client):
    r = client.completions.create(model="tiny-chat", prompt=["Hello", "Goodbye"], max_tokens=4, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    r = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=6, temperature=1.0, n=3, seed=4)
    assert len(r.choices) == 3 and len({c.text for c in r.choices}) > 1


def test_concurrent_requests_are_batched(live):
    steps0 = live.engine.stats["decode_steps"]
    body = {"model": "tiny-chat", "max_tokens": 20, "temperature": 0, "ignore_eos": True}

    def one(i: int) -> str:
        r = httpx.post(live.url + "/v1/completions", json={**body, "prompt": f"Story number {i}:"}, timeout=60)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    with cf.ThreadPoolExecutor(4) as ex:
        texts = list(ex.map(one, range(4)))
    steps = live.engine.stats["decode_steps"] - steps0
    assert len(texts) == 4 and all(texts)
    assert steps < 4 * 19, f"{steps} decode steps for 4x20 tokens: requests were not batched"


BAD = [
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", b"[1, 2]", 400, "object"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "gpt-9"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "context length"),
    ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 1}, 400, "context length"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 7}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "'n'"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 500}, 400, "logprobs"),
    ("/v1/completions", {"prompt": [1, 2, 99999999]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "echo"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True, "top_k": -2},
     400, "top_k"),
    ("/v1/nothing", {"prompt": "hi"}, 404, "no route"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx_then_good_ones_work(live, path, body, status, needle):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower()
    ok = httpx.post(live.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_api_key(model_folder):
    from tests.serve.conftest import LiveServer

    s = LiveServer(model_folder, api_key="sekret", slots=1)
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny-chat", prompt="hi", max_tokens=2).choices
    finally:
        s.close()


def test_page_is_served_self_contained(live):
    r = httpx.get(live.url + "/", timeout=10)
    assert r.status_code == 200 and "<title>llamalab chat</title>" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: works offline
