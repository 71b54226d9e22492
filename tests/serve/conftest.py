"""A live server on 127.0.0.1 (free port, background thread) around a small random model."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import free_port
from tests.inference.conftest import llama_tok, llama_tok_path, model_folder  # noqa: F401 (fixtures)


class LiveServer:
    def __init__(self, folder, api_key: str = "", slots: int = 4) -> None:
        import uvicorn

        from llamalab.inference.engine import Engine
        from llamalab.serve.api import build_server

        self.folder = folder
        self.engine = Engine.from_folder(folder, slots=slots)
        self.server = build_server(self.engine, "tiny-chat", api_key=api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.server.app(), host="127.0.0.1", port=self.port, log_level="warning")
        self.uv = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.uv.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=10)
        self.server.aengine.close()


@pytest.fixture(scope="session")
def live(model_folder):  # noqa: F811
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    s = LiveServer(model_folder)
    yield s
    s.close()
