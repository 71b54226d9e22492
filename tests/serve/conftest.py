"""A live server on 127.0.0.1 (free port, background thread) around a small random model."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import free_port
from tests.inference.conftest import llama_tok, llama_tok_path, model_folder  # noqa: F401 (fixtures)


class LiveServer:
    def __init__(self, folder, api_key: str = "", slots: int = 4, **options) -> None:
        import uvicorn

        from llamalab.inference.engine import Engine
        from llamalab.serve.api import ServeOptions, build_server

        self.folder = folder
        self.engine = Engine.from_folder(folder, slots=slots)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        opts = ServeOptions(api_key=api_key, host="127.0.0.1", port=self.port, **options)
        self.server = build_server(self.engine, "tiny-chat", options=opts)
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
        self.server.close()


@pytest.fixture(scope="session")
def live(model_folder):  # noqa: F811
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    s = LiveServer(model_folder)
    yield s
    s.close()


# ----------------------------------------------------------------------------- `llamalab serve` in a subprocess


class ServeProcess:
    """``llamalab serve FOLDER --port P ...`` as users start it; ``stop()`` sends SIGTERM and returns the output."""

    def __init__(self, folder, *flags: str, name: str = "tiny-chat", start_timeout: float = 120) -> None:
        import os
        import subprocess
        import sys
        import tempfile

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LLAMALAB_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "llamalab", "serve", str(folder), "--port", str(self.port),
                                      "--model-name", name, *flags], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llamalab serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise RuntimeError(f"llamalab serve did not start in {start_timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def health(self, key: str = "") -> dict:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url + "/health", headers=headers, timeout=10).json()

    def stop(self, timeout: float = 30) -> str:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()


@pytest.fixture(scope="session")
def long_folder(tmp_path_factory, llama_tok_path):  # noqa: F811
    """The small random model with a 4096-token context: room for streams that outlast a test's actions."""
    from llamalab.model.folder import save_model
    from tests.inference.conftest import small_model

    d = tmp_path_factory.mktemp("long") / "tiny-chat"
    save_model(d, small_model(max_seq_len=4096), tokenizer_path=llama_tok_path, extra={"chat_template": "llama2"})
    return d


@pytest.fixture(scope="session")
def served(long_folder):
    """One keyless ``llamalab serve`` subprocess shared by the hardening tests."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    s = ServeProcess(long_folder, "--slots", "4")
    yield s
    s.stop()
