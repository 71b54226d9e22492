"""One small chat client for every stage that makes or grades data with a model.

It speaks the OpenAI chat API (``POST {base_url}/chat/completions``), so one code path works against
``llamalab serve``, vLLM, llama.cpp's server or a hosted endpoint; ``base_url="local:PATH"`` runs a
llamalab model in-process through :class:`llamalab.inference.Engine` instead (no HTTP, no server).

- **Retries**: timeouts, connection errors, HTTP 429 and 5xx are retried ``retries`` times with
  exponential backoff and jitter; a ``Retry-After`` header (seconds or an HTTP date) is honoured.
  Other 4xx answers are not retried. A failed request never raises: its :class:`Reply` has
  ``text=""`` and ``error`` saying why ("HTTP 503 after 5 tries: ..."), and ``stats["failures"]`` counts it.
- **Concurrency**: :meth:`ChatClient.chat_many` keeps ``concurrency`` requests in flight (threads;
  a local engine decodes them together in one continuous batch) and returns replies in request order.
- **Cache**: successful replies are stored on disk keyed by the sha256 of the canonical JSON of
  (endpoint without credentials, model, messages, params), one small file per entry written
  atomically (temporary file, fsync, rename), so a crash never corrupts earlier entries and a
  resumed run sends no request it already has an answer to. The API key is never part of the key,
  the cache or :meth:`ChatClient.describe`.

httpx is the ``serve`` extra (imported when the first HTTP client is built).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from llamalab.common import LlamalabError, Progress

CACHE_VERSION = 1
RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
PARAM_NAMES = ("temperature", "top_p", "max_tokens", "seed", "stop", "n", "top_k", "presence_penalty",
               "frequency_penalty", "repetition_penalty")


@dataclass
class ClientConfig:
    """How to reach the model; commands subclass it (``class Config(ClientConfig)``) so the flags stay flat."""

    base_url: str = field(default="", metadata={
        "help": "OpenAI-compatible endpoint (http://host:port/v1), or local:PATH to run a llamalab model "
                "in-process; default env LLAMALAB_BASE_URL, then OPENAI_BASE_URL"})
    api_key: str = field(default="", metadata={
        "help": "bearer key (default env LLAMALAB_API_KEY, then OPENAI_API_KEY); never written to disk"})
    model: str = field(default="", metadata={"help": "the model name sent with each request (local: the served name)"})
    timeout: float = field(default=120.0, metadata={"help": "seconds per request"})
    retries: int = field(default=4, metadata={"help": "retries on timeouts, connection errors, 429 and 5xx"})
    concurrency: int = field(default=4, metadata={"help": "requests in flight at once"})
    cache: str = field(default="", metadata={"help": "reply cache folder (default: OUT/cache); 'off' disables it"})

    def validate(self) -> None:
        if self.timeout <= 0:
            raise LlamalabError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise LlamalabError(f"retries must be >= 0, got {self.retries}")
        if self.concurrency < 1:
            raise LlamalabError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass
class Reply:
    """One answer. ``error`` is None on success; a failed request has ``text == ""`` and the reason here."""

    text: str
    finish_reason: str | None
    cached: bool
    error: str | None
    usage: dict
    choices: list[str] = field(default_factory=list)  # every choice's text when n > 1 (choices[0] == text)

    @property
    def ok(self) -> bool:
        return self.error is None


def public_url(url: str) -> str:
    """``url`` without credentials (user:password@ and the query string, where keys sometimes travel)."""
    if url.startswith("local:"):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def canonical_params(params: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) parameters and ``n=1`` so equal requests hash equally; a bad name raises."""
    out = {}
    for k, v in params.items():
        if k not in PARAM_NAMES:
            raise LlamalabError(f"chat parameter {k!r} is not one of {', '.join(PARAM_NAMES)}")
        if v is None or (k == "n" and v == 1):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def request_key(endpoint: str, model: str, messages: list[dict], params: dict[str, Any]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "endpoint": public_url(endpoint), "model": model,
                       "messages": messages, "params": canonical_params(params)},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Successful replies on disk: ``DIR/ab/abcdef....json``, each written atomically."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.corrupt = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        try:
            with open(p, encoding="utf-8") as f:
                entry = json.load(f)
            return entry["reply"] if entry.get("key") == key else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.corrupt += 1  # unreadable entry: treated as a miss and rewritten by the next success
            return None

    def put(self, key: str, request: dict, reply: dict) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "request": request, "reply": reply}, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


def _excerpt(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def _error_message(resp: Any) -> str:
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        if msg:
            return _excerpt(str(msg))
    except (ValueError, AttributeError):
        pass
    return _excerpt(resp.text or resp.reason_phrase or "")


class _LocalBackend:
    """A llamalab model in this process: chat template, stops and sampling as ``llamalab serve`` applies them."""

    def __init__(self, path: str, slots: int) -> None:
        from llamalab.inference.engine import Engine
        from llamalab.tokenizer.jinja_template import chat_template_for

        self.path = path
        self.engine = Engine.from_folder(path, slots=slots)
        self.template = chat_template_for(self.engine.meta)
        self.lock = threading.Lock()

    def _prepare(self, messages: list[dict], params: dict[str, Any]) -> tuple[list[list[int]], list[Any]]:
        from llamalab.inference.sampling import SamplingParams
        from llamalab.tokenizer.jinja_template import SourceTemplate
        from llamalab.tokenizer.templates import check_messages, render, stop_strings, stop_token_ids

        tok, t = self.engine.tokenizer, self.template
        msgs = check_messages(messages)
        if isinstance(t, SourceTemplate):
            ids = t.render(msgs, tok, add_generation_prompt=True)
            stops, stop_ids = t.stop_strings(), t.stop_token_ids(tok)
        else:
            ids = render(msgs, t, tok, add_generation_prompt=True)[0]
            stops, stop_ids = stop_strings(t), stop_token_ids(t, tok)
        room = self.engine.max_seq_len - len(ids)
        if room < 1:
            raise LlamalabError(f"messages: {len(ids)} tokens, but the model's context is {self.engine.max_seq_len}")
        own = params.get("stop") or []
        own = [own] if isinstance(own, str) else list(own)
        n = int(params.get("n") or 1)
        base = dict(max_tokens=min(int(params.get("max_tokens") or room), room),
                    temperature=float(params.get("temperature", 1.0)), top_p=float(params.get("top_p", 1.0)),
                    top_k=int(params.get("top_k", 0)), stop=own + [s for s in stops if s not in own],
                    stop_token_ids=list(stop_ids))
        for k in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if k in params:
                base[k] = float(params[k])
        seed = params.get("seed")
        sps = [SamplingParams(**base, seed=None if seed is None else int(seed) + k).validate() for k in range(n)]
        self.engine.check_prompt(ids, sps[0])
        return [ids] * n, sps

    def run(self, batch: list[tuple[list[dict], dict[str, Any]]]) -> list[tuple[dict | None, str | None]]:
        """(reply dict, None) or (None, error) per request; the valid ones decode together."""
        prepared: list[tuple[int, list, list]] = []
        out: list[tuple[dict | None, str | None]] = [(None, None)] * len(batch)
        for i, (messages, params) in enumerate(batch):
            try:
                ids, sps = self._prepare(messages, params)
                prepared.append((i, ids, sps))
            except LlamalabError as e:
                out[i] = (None, f"local request refused: {e}")
        if not prepared:
            return out
        prompts = [p for _, ids, _ in prepared for p in ids]
        sps = [s for _, _, ss in prepared for s in ss]
        with self.lock:
            try:
                results = self.engine.generate(prompts, sps)
            except Exception as e:  # noqa: BLE001 - reported per request, never raised
                for i, _, _ in prepared:
                    out[i] = (None, f"local generation failed: {type(e).__name__}: {e}")
                return out
        k = 0
        for i, ids, _ in prepared:
            res = results[k:k + len(ids)]
            k += len(ids)
            if any(r.finish_reason == "error" for r in res):
                out[i] = (None, "local generation failed")
                continue
            texts = [r.text.strip() for r in res]
            usage = {"prompt_tokens": len(ids[0]) * len(ids), "completion_tokens": sum(len(r.token_ids) for r in res)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            out[i] = ({"text": texts[0], "finish_reason": res[0].finish_reason, "usage": usage, "choices": texts}, None)
        return out


class ChatClient:
    """Chat completions with retries, a concurrency limit and a disk cache (see the module docstring)."""

    BACKOFF = 0.5  # seconds before the first retry; doubled each time, with jitter, capped at MAX_BACKOFF
    MAX_BACKOFF = 30.0
    MAX_RETRY_AFTER = 300.0

    def __init__(self, cfg: ClientConfig, cache_dir: str | Path | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        url = cfg.base_url or os.environ.get("LLAMALAB_BASE_URL", "") or os.environ.get("OPENAI_BASE_URL", "")
        if not url:
            raise LlamalabError("base_url: no endpoint; pass --base-url http://HOST:PORT/v1 (or local:MODEL_PATH), "
                                "or set LLAMALAB_BASE_URL")
        self._key = cfg.api_key or os.environ.get("LLAMALAB_API_KEY", "") or os.environ.get("OPENAI_API_KEY", "")
        self.model = cfg.model
        self._local: _LocalBackend | None = None
        self._http: Any = None
        if url.startswith("local:"):
            path = url[len("local:"):]
            if not path or not Path(path).exists():
                raise LlamalabError(f"base_url: local model not found: {path!r} (local:PATH names a model folder, "
                                    f"run folder, HF folder or .gguf file)")
            self.base_url = "local:" + str(Path(path).resolve())
            self._local = _LocalBackend(path, slots=cfg.concurrency)
            self.model = cfg.model or Path(path).resolve().name
        else:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise LlamalabError(f"base_url: {public_url(url)!r} is not an http(s) URL or local:PATH")
            if parts.path in ("", "/"):
                url = url.rstrip("/") + "/v1"  # the OpenAI API lives under /v1
            self.base_url = url.rstrip("/")
        self.endpoint = public_url(self.base_url)
        if cfg.cache == "off":
            self.cache: ReplyCache | None = None
        elif cfg.cache or cache_dir is not None:
            self.cache = ReplyCache(cfg.cache or cache_dir)  # type: ignore[arg-type]
        else:
            self.cache = None
        self.stats = {"sent": 0, "cache_hits": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def describe(self) -> dict:
        """What meta.json records: endpoint (no credentials), model, limits, cache folder; never the key."""
        return {"endpoint": self.endpoint, "kind": "local" if self._local else "http", "model": self.model,
                "timeout": self.cfg.timeout, "retries": self.cfg.retries, "concurrency": self.cfg.concurrency,
                "cache": str(self.cache.folder) if self.cache else None, "api_key_set": bool(self._key)}

    def chat(self, messages: list[dict], **params: Any) -> Reply:
        """One chat completion (from the cache when it holds this exact request)."""
        return self.chat_many([(messages, params)])[0]

    def chat_many(self, requests: list[tuple[list[dict], dict]], desc: str = "") -> list[Reply]:
        """Every request, ``concurrency`` at a time; replies in request order; failures are Replies, not raises."""
        replies: list[Reply | None] = [None] * len(requests)
        requests = [(messages, canonical_params(params)) for messages, params in requests]
        keys = []
        todo: list[int] = []
        for i, (messages, params) in enumerate(requests):
            key = request_key(self.base_url, self.model, messages, params)
            keys.append(key)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                replies[i] = Reply(hit["text"], hit.get("finish_reason"), True, None, hit.get("usage") or {},
                                   hit.get("choices") or [hit["text"]])
                self.stats["cache_hits"] += 1
            else:
                todo.append(i)
        bar = Progress(len(requests), desc, "req") if desc and len(requests) > 1 else None
        if bar:
            bar.update(len(requests) - len(todo), self._bar_extra())

        def done(i: int, reply: Reply) -> None:
            replies[i] = reply
            if reply.ok and self.cache:
                messages, params = requests[i]
                self.cache.put(keys[i], {"endpoint": self.endpoint, "model": self.model, "messages": messages,
                                         "params": params},
                               {"text": reply.text, "finish_reason": reply.finish_reason, "usage": reply.usage,
                                "choices": reply.choices})
            if bar:
                bar.update(1, self._bar_extra())

        if self._local is not None:
            step = max(1, self.cfg.concurrency * 4)
            for s in range(0, len(todo), step):
                chunk = todo[s:s + step]
                with self._lock:
                    self.stats["sent"] += len(chunk)
                for i, (rep, err) in zip(chunk, self._local.run([requests[i] for i in chunk])):
                    done(i, self._reply(rep, err))
        elif len(todo) == 1:
            done(todo[0], self._http_one(*requests[todo[0]]))
        elif todo:
            with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(todo)),
                                    thread_name_prefix="llamalab-chat") as pool:
                futures = {i: pool.submit(self._http_one, *requests[i]) for i in todo}
                for i in todo:
                    done(i, futures[i].result())
        if bar:
            bar.close()
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _bar_extra(self) -> str:
        s = self.stats
        return f"sent {s['sent']} cached {s['cache_hits']} retries {s['retries']} failed {s['failures']}"

    def _reply(self, rep: dict | None, err: str | None) -> Reply:
        if rep is None:
            with self._lock:
                self.stats["failures"] += 1
            return Reply("", None, False, err or "failed", {})
        return Reply(rep["text"], rep.get("finish_reason"), False, None, rep.get("usage") or {},
                     rep.get("choices") or [rep["text"]])

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                import httpx

                headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
                self._http = httpx.Client(timeout=self.cfg.timeout, headers=headers,
                                          limits=httpx.Limits(max_connections=self.cfg.concurrency))
            return self._http

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = min(retry_after, self.MAX_RETRY_AFTER)
        else:
            delay = min(self.BACKOFF * 2 ** attempt, self.MAX_BACKOFF)
            delay *= 0.5 + random.random()  # jitter: concurrent clients do not retry in lockstep
        with self._lock:
            self.stats["retries"] += 1
        time.sleep(delay)

    def _http_one(self, messages: list[dict], params: dict[str, Any]) -> Reply:
        import httpx

        client = self._client()
        body = {**({"model": self.model} if self.model else {}), "messages": messages, **params}
        url = self.base_url + "/chat/completions"
        tries = self.cfg.retries + 1
        kind, last = "", ""
        for attempt in range(tries):
            with self._lock:
                self.stats["sent"] += 1
            retry_after = None
            try:
                resp = client.post(url, json=body)
            except httpx.TimeoutException:
                kind, last = "timeout", f"no reply within {self.cfg.timeout:g} s"
            except httpx.TransportError as e:
                kind, last = "connection error", f"{type(e).__name__}: {_excerpt(str(e))}"
            else:
                if resp.status_code == 200:
                    try:
                        return self._reply(self._parse(resp.json()), None)
                    except (ValueError, KeyError, TypeError, IndexError) as e:
                        return self._reply(None, f"bad reply from {self.endpoint}: {type(e).__name__}: {e}: "
                                                 f"{_excerpt(resp.text)}")
                kind, last = f"HTTP {resp.status_code}", _error_message(resp)
                if resp.status_code not in RETRY_STATUS:
                    return self._reply(None, f"{kind}: {last}")
                retry_after = _retry_after(resp.headers.get("retry-after"))
            if attempt + 1 < tries:
                self._sleep_before_retry(attempt, retry_after)
        return self._reply(None, f"{kind} after {tries} tr{'y' if tries == 1 else 'ies'}: {last}")

    @staticmethod
    def _parse(body: dict) -> dict:
        choices = body["choices"]
        if not choices:
            raise ValueError("no choices")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        texts = [(c["message"].get("content") or "") for c in choices]
        return {"text": texts[0], "finish_reason": choices[0].get("finish_reason"), "usage": body.get("usage") or {},
                "choices": texts}


def reply_dict(reply: Reply) -> dict:
    """A Reply as plain JSON (for ledgers and reports)."""
    return asdict(reply)
