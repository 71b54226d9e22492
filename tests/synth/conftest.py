"""Fixtures for the synth tests: a scripted OpenAI-compatible fake endpoint (deterministic replies,
delays, 5xx, 429) and the live ``llamalab serve`` of tests/serve around a small random model."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from tests.inference.conftest import llama_tok, llama_tok_path, model_folder  # noqa: F401 (fixtures)
from tests.serve.conftest import live  # noqa: F401 (fixture)

# A script answers one request: (status, headers, body dict or text, delay seconds).
Script = Callable[[dict, int], tuple[int, dict, Any, float]]


def echo_reply(body: dict, n: int = 0) -> tuple[int, dict, Any, float]:
    """200 with the last user message reversed (a reply that depends on the request)."""
    text = body["messages"][-1]["content"][::-1]
    return 200, {}, {"id": "x", "object": "chat.completion", "model": body.get("model", ""),
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}, 0.0


class FakeChat:
    """``POST /v1/chat/completions`` answered by ``script(body, k)`` (k: this server's request count so far)."""

    def __init__(self, script: Script = echo_reply) -> None:
        self.script = script
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                body = json.loads(raw)
                with fake.lock:
                    k = len(fake.bodies)
                    fake.bodies.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, headers, out, delay = fake.script(body, k)
                    if delay:
                        time.sleep(delay)
                    data = (json.dumps(out) if isinstance(out, dict) else str(out)).encode()
                    self.send_response(status)
                    for h, v in headers.items():
                        self.send_header(h, v)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def count(self) -> int:
        return len(self.bodies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_chat():
    """``fake_chat(script=echo_reply) -> FakeChat``; every server made is shut down after the test."""
    made: list[FakeChat] = []

    def make(script: Script = echo_reply) -> FakeChat:
        made.append(FakeChat(script))
        return made[-1]

    yield make
    for f in made:
        f.close()
