"""The web chat page in headless Chromium: it loads offline, sends a message and shows a streamed answer.

Skipped when no chromium binary is installed (Debian: ``apt-get install -y chromium``). Chromium is
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on file
descriptors 3 and 4), so no websocket client or Node is needed. The page reads ``?q=...`` and sends it
on load; the test polls the page until the streamed answer is complete, checks that it appeared in
pieces, and saves a screenshot (to ``$LLAMALAB_SCREENSHOT`` when set, e.g. docs/img/chat.png).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,700", "--remote-debugging-pipe"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


class CDP:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, exe: str, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def fds() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=fds,
                                     close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        raise TimeoutError(method)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._cmd_w)
        os.close(self._res_r)


def test_page_streams_an_answer(live, tmp_path):
    exe = chromium()
    q = urllib.parse.urlencode({"q": "Tell me a story", "system": "Be brief.", "temperature": "0"})
    before = live.engine.stats["requests"]
    cdp = CDP(exe, tmp_path / "profile")
    try:
        target = cdp.call("Target.createTarget", {"url": f"{live.url}/?{q}"})["targetId"]
        sid = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expr: str):
            return cdp.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, sid)["result"].get("value")

        seen_lengths = set()
        state = None
        for _ in range(300):  # bounded: at most ~30 s
            state = js("document.body.dataset.state")
            n = js("(document.querySelector('.msg.assistant .content') || {textContent: ''}).textContent.length")
            seen_lengths.add(n)
            if state == "done":
                break
            time.sleep(0.1)
        assert state == "done", js("document.body.innerText")
        answer = js("document.querySelector('.msg.assistant .content').textContent")
        assert answer.strip(), js("document.body.innerText")
        assert js("document.querySelectorAll('.msg.error').length") == 0, js("document.body.innerText")
        assert js("document.querySelector('.msg.user .content').textContent") == "Tell me a story"
        assert "tiny-chat" in js("document.getElementById('model').textContent")
        assert int(js("document.getElementById('stats').textContent").split()[0]) > 1  # streamed in chunks
        assert live.engine.stats["requests"] > before  # the page really called the server
        png = base64.b64decode(cdp.call("Page.captureScreenshot", {"format": "png"}, sid)["data"])
        shot = Path(os.environ.get("LLAMALAB_SCREENSHOT") or tmp_path / "chat.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    finally:
        cdp.close()
