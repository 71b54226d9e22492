"""ChatClient against a scripted fake endpoint (deterministic replies and failures) and a real ``llamalab serve``."""

from __future__ import annotations

import json
import threading
import time

import pytest

from llamalab.common import LlamalabError
from llamalab.synth.client import ChatClient, ClientConfig, _retry_after, public_url, request_key
from tests.conftest import free_port
from tests.synth.conftest import echo_reply

pytest.importorskip("httpx")

MSG = [{"role": "user", "content": "hello there"}]


def client(url: str, tmp_path=None, **kw) -> ChatClient:
    cache = kw.pop("cache", "off" if tmp_path is None else str(tmp_path / "cache"))
    c = ChatClient(ClientConfig(base_url=url, model="m", cache=cache, **kw))
    c.BACKOFF = 0.01  # fast retries in tests
    return c


def test_reply_fields_and_request_body(fake_chat):
    f = fake_chat()
    r = client(f.url).chat(MSG, temperature=0.5, max_tokens=7, seed=3)
    assert (r.text, r.finish_reason, r.cached, r.error) == ("ereht olleh", "stop", False, None)
    assert r.usage["total_tokens"] == 8 and r.choices == ["ereht olleh"]
    assert f.bodies == [{"model": "m", "messages": MSG, "temperature": 0.5, "max_tokens": 7, "seed": 3}]


def test_cache_makes_a_resumed_run_send_nothing_twice(fake_chat, tmp_path):
    f = fake_chat()
    reqs = [([{"role": "user", "content": f"task {i}"}], {"temperature": 0.7, "seed": i}) for i in range(8)]
    first = client(f.url, tmp_path).chat_many(reqs[:5])  # an "interrupted" run: only the first 5 done
    assert f.count == 5 and not any(r.cached for r in first)
    c2 = client(f.url, tmp_path)
    again = c2.chat_many(reqs)
    assert f.count == 8  # only the 3 new ones were sent
    assert [r.cached for r in again] == [True] * 5 + [False] * 3
    assert [r.text for r in again] == [f"{i} ksat" for i in range(8)]  # order kept, cached text identical
    assert c2.stats == {"sent": 3, "cache_hits": 5, "retries": 0, "failures": 0}
    assert client(f.url, tmp_path).chat_many(reqs) and f.count == 8
    # unset parameters and n=1 do not change the key; any real parameter does
    assert request_key(f.url, "m", MSG, {"seed": None, "n": 1}) == request_key(f.url, "m", MSG, {})
    assert request_key(f.url, "m", MSG, {"seed": 1}) != request_key(f.url, "m", MSG, {"seed": 2})
    assert request_key(f.url, "m", MSG, {}) != request_key(f.url, "other", MSG, {})


def test_cache_off_and_corrupt_entries(fake_chat, tmp_path):
    f = fake_chat()
    c = client(f.url, cache="off")
    c.chat(MSG)
    c.chat(MSG)
    assert f.count == 2 and c.cache is None
    c = client(f.url, tmp_path)
    c.chat(MSG)
    entry = next((tmp_path / "cache").rglob("*.json"))
    entry.write_text('{"key": "trunc')  # a torn file (cannot happen with atomic writes, but never trusted)
    c2 = client(f.url, tmp_path)
    r = c2.chat(MSG)
    assert r.ok and not r.cached and f.count == 4 and c2.cache.corrupt == 1
    assert client(f.url, tmp_path).chat(MSG).cached  # rewritten by the success


def test_5xx_then_success_is_retried(fake_chat, tmp_path):
    f = fake_chat(lambda body, k: (503, {}, {"error": {"message": "busy"}}, 0) if k < 2 else echo_reply(body))
    c = client(f.url, tmp_path, retries=4)
    r = c.chat(MSG)
    assert r.ok and r.text == "ereht olleh" and f.count == 3
    assert c.stats == {"sent": 3, "cache_hits": 0, "retries": 2, "failures": 0}


def test_5xx_forever_is_reported_not_raised_and_not_cached(fake_chat, tmp_path):
    f = fake_chat(lambda body, k: (500, {}, {"error": {"message": "model crashed"}}, 0))
    c = client(f.url, tmp_path, retries=2)
    rs = c.chat_many([(MSG, {}), ([{"role": "user", "content": "x"}], {})])
    assert all(r.text == "" and not r.ok for r in rs)
    assert rs[0].error == "HTTP 500 after 3 tries: model crashed"
    assert f.count == 6 and c.stats["failures"] == 2 and c.stats["retries"] == 4
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached: a rerun asks again
    client(f.url, tmp_path, retries=0).chat(MSG)
    assert f.count == 7


def test_4xx_is_not_retried(fake_chat):
    f = fake_chat(lambda body, k: (400, {}, {"error": {"message": "'temperature' must be in [0, 2]"}}, 0))
    c = client(f.url, retries=4)
    r = c.chat(MSG, temperature=9)
    assert f.count == 1 and r.error == "HTTP 400: 'temperature' must be in [0, 2]" and c.stats["retries"] == 0


def test_429_honours_retry_after(fake_chat):
    f = fake_chat(lambda body, k: (429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}, 0) if k == 0
                  else echo_reply(body))
    c = client(f.url, retries=2)
    t0 = time.perf_counter()
    r = c.chat(MSG)
    assert r.ok and f.count == 2 and c.stats["retries"] == 1
    assert time.perf_counter() - t0 >= 0.95  # waited the server's 1 s, not the 0.01 s backoff


def test_retry_after_forms():
    assert _retry_after("2.5") == 2.5 and _retry_after(None) is None and _retry_after("soon") is None
    import email.utils

    assert 8 <= _retry_after(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10


def test_timeouts_are_retried_then_reported(fake_chat):
    f = fake_chat(lambda body, k: (*echo_reply(body)[:3], 1.5 if k == 0 else 0))
    c = client(f.url, timeout=0.4, retries=2)
    r = c.chat(MSG)
    assert r.ok and c.stats["retries"] == 1 and f.count == 2
    f2 = fake_chat(lambda body, k: (*echo_reply(body)[:3], 1.5))
    c2 = client(f2.url, timeout=0.3, retries=1)
    r2 = c2.chat(MSG)
    assert r2.error == "timeout after 2 tries: no reply within 0.3 s" and r2.text == ""


def test_connection_refused_is_reported():
    c = client(f"http://127.0.0.1:{free_port()}/v1", retries=1)
    r = c.chat(MSG)
    assert r.error.startswith("connection error after 2 tries: ConnectError") and c.stats["failures"] == 1


def test_concurrency_limit_and_order(fake_chat):
    f = fake_chat(lambda body, k: (*echo_reply(body)[:3], 0.2))
    reqs = [([{"role": "user", "content": f"r{i}"}], {}) for i in range(10)]
    rs = client(f.url, concurrency=3).chat_many(reqs, desc="test")
    assert [r.text for r in rs] == [f"{i}r" for i in range(10)]
    assert f.max_in_flight == 3


def test_api_key_from_env_is_sent_but_never_stored(fake_chat, tmp_path, monkeypatch):
    f = fake_chat()
    monkeypatch.setenv("LLAMALAB_API_KEY", "sk-secret-123")
    monkeypatch.setenv("LLAMALAB_BASE_URL", f.url)
    c = ChatClient(ClientConfig(model="m", cache=str(tmp_path / "cache")))
    c.chat(MSG)
    assert f.headers[0].get("Authorization") == "Bearer sk-secret-123"
    assert "sk-secret" not in json.dumps(c.describe()) and c.describe()["endpoint"] == f.url
    assert not any("sk-secret" in p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert public_url("https://user:pw@api.example.com/v1/?key=abc") == "https://api.example.com/v1"


def test_config_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMALAB_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LlamalabError, match="base_url: no endpoint"):
        ChatClient(ClientConfig())
    with pytest.raises(LlamalabError, match="local model not found"):
        ChatClient(ClientConfig(base_url=f"local:{tmp_path}/nope"))
    with pytest.raises(LlamalabError, match="not an http"):
        ChatClient(ClientConfig(base_url="ftp://x/v1"))
    with pytest.raises(LlamalabError, match="concurrency"):
        ChatClient(ClientConfig(base_url="http://x/v1", concurrency=0))
    with pytest.raises(LlamalabError, match="not one of"):
        ChatClient(ClientConfig(base_url="http://x/v1", cache="off")).chat(MSG, temprature=1)
    assert ChatClient(ClientConfig(base_url="http://x:9", cache="off")).base_url == "http://x:9/v1"


def test_against_real_llamalab_serve_equals_local_engine(live, model_folder, tmp_path):  # noqa: F811
    """The served reply (server-side template + engine) equals the in-process local: backend's, greedy."""
    http = ChatClient(ClientConfig(base_url=live.url + "/v1", model="tiny-chat", cache=str(tmp_path / "h")))
    local = ChatClient(ClientConfig(base_url=f"local:{model_folder}", cache=str(tmp_path / "l"), concurrency=2))
    reqs = [([{"role": "user", "content": f"Tell me about number {i}."}], {"temperature": 0, "max_tokens": 12})
            for i in range(3)]
    a = http.chat_many(reqs)
    b = local.chat_many(reqs)
    assert all(r.ok for r in a + b), [r.error for r in a + b]
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    assert any(r.text for r in a)
    assert local.describe()["kind"] == "local" and local.model == "tiny-chat"
    # a context overflow on the server is a 400: reported, not retried, not raised
    r = http.chat([{"role": "user", "content": "word " * 400}], max_tokens=4)
    assert r.error.startswith("HTTP 400") and http.stats["retries"] == 0
    r = local.chat([{"role": "user", "content": "word " * 400}], max_tokens=4)
    assert r.error.startswith("local request refused")


def test_client_is_thread_safe_under_parallel_callers(fake_chat, tmp_path):
    f = fake_chat()
    c = client(f.url, tmp_path)
    out: list = []
    ts = [threading.Thread(target=lambda i=i: out.append(c.chat([{"role": "user", "content": f"t{i}"}])))
          for i in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(out) == 8 and all(r.ok for r in out) and c.stats["sent"] == 8
