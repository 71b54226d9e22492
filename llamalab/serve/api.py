"""The OpenAI-compatible HTTP API and web chat page behind ``llamalab serve`` (:mod:`llamalab.commands.serve`).

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``logprobs``, ``echo``: evaluation
harnesses that speak the OpenAI API score log-likelihoods with ``echo=true, max_tokens=0|1``),
``POST /v1/chat/completions``, both streaming by server-sent events (``stream=true``), ``GET /``
(the chat page, no external assets) and ``GET /health``.

One engine thread owns the model. HTTP handlers validate a request, hand it to that thread and
await its deltas on an asyncio queue; the thread admits new requests into free batch slots between
decode steps (continuous batching), so concurrent requests share every forward pass. A client that
disconnects has its request aborted. Every user error gets a 4xx JSON error in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) naming the field at fault, and the server
keeps serving: bad JSON, unknown model (404), a prompt longer than the context, out-of-range
parameters (400), a missing or wrong API key (401).

FastAPI and uvicorn are the ``serve`` extra; FastAPI is imported only here (in :meth:`Server.app`),
uvicorn only by the command.
"""

# NOTE: no `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations at runtime.
import asyncio
import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from llamalab.common import LlamalabError
from llamalab.inference.engine import Delta, Engine, TokenLogprob, token_text
from llamalab.inference.sampling import MAX_LOGPROBS, SamplingParams
from llamalab.tokenizer.templates import check_messages, render, resolve_template, stop_strings

STATIC = Path(__file__).parent / "static"
MAX_N = 8


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ----------------------------------------------------------------------------- engine thread


class AsyncEngine:
    """Runs ``Engine.step`` in one thread; asyncio handlers submit requests and await deltas."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="llamalab-engine", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        subs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        while not self.stopped:
            try:
                item = self.inbox.get(timeout=0.05) if not self.engine.has_work() else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                self._take(item, subs)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if not self.engine.has_work():
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # noqa: BLE001 - never let the engine thread die
                for rid, (loop, q) in list(subs.items()):
                    loop.call_soon_threadsafe(q.put_nowait, e)
                    self.engine.abort(rid)
                subs.clear()
                self.engine.waiting.clear()
                self.engine.active.clear()
                continue
            for d in deltas:
                target = subs.get(d.request_id)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, d)
                    if d.finished:
                        subs.pop(d.request_id, None)

    def _take(self, item: tuple, subs: dict) -> None:
        kind = item[0]
        if kind == "abort":
            self.engine.abort(item[1])
            subs.pop(item[1], None)
            return
        _, rid, ids, params, loop, q = item
        try:
            self.engine.add(ids, params, request_id=rid)
            subs[rid] = (loop, q)
        except LlamalabError as e:
            loop.call_soon_threadsafe(q.put_nowait, e)

    async def run(self, ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Submit one request; yield its deltas until it finishes (aborted if the consumer leaves)."""
        rid = f"r-{uuid.uuid4().hex[:12]}"
        q: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("add", rid, ids, params, asyncio.get_running_loop(), q))
        finished = False
        try:
            while True:
                d = await q.get()
                if isinstance(d, LlamalabError):
                    raise APIError(400, str(d), "prompt")
                if isinstance(d, Exception):
                    raise APIError(500, f"generation failed: {d}")
                yield d
                if d.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.inbox.put(("abort", rid))

    def close(self) -> None:
        self.stopped = True
        self.thread.join(timeout=5)


# ----------------------------------------------------------------------------- request parsing


def _field(body: dict, name: str, types: tuple, default: Any = None, check: Callable[[Any], bool] | None = None,
           want: str = "") -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types:
        raise APIError(400, f"'{name}' must be {want or types[0].__name__}, got {v!r}", name)
    if not isinstance(v, types):
        raise APIError(400, f"'{name}' must be {want or ' or '.join(t.__name__ for t in types)}, "
                            f"got {type(v).__name__}", name)
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' must be {want}, got {v!r}", name)
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    return stop


def sampling_from(body: dict, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    num = (int, float)
    p = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(_field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=_field(body, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
        repetition_penalty=float(_field(body, "repetition_penalty", num, 1.0, lambda v: 0 < v <= 10,
                                        "a number in (0, 10]")),
        presence_penalty=float(_field(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]")),
        frequency_penalty=float(_field(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]")),
        seed=_field(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
        stop=_stops(body), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        ignore_eos=bool(_field(body, "ignore_eos", (bool,), False)),
    )
    try:
        return p.validate()
    except LlamalabError as e:
        raise APIError(400, str(e)) from None


class Server:
    """The FastAPI app around an :class:`AsyncEngine` (see the module docstring)."""

    def __init__(self, engine: Engine, model_name: str, template: str, api_key: str = "") -> None:
        self.engine = engine
        self.aengine = AsyncEngine(engine)
        self.model_name = model_name
        self.template = template
        self.api_key = api_key
        self.created = int(time.time())
        self.tok = engine.tokenizer
        self.ctx = engine.max_seq_len

    # -------------------------------------------------------------- shared checks

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def n_of(self, body: dict) -> int:
        return _field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")

    def max_tokens(self, body: dict, n_prompt: int, default: int | None, *names: str) -> int:
        name = next((k for k in names if body.get(k) is not None), names[0])
        room = self.ctx - n_prompt
        if n_prompt >= self.ctx:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt has "
                                f"{n_prompt} tokens. Shorten the prompt.",
                           "prompt" if "max_tokens" in names[:1] else "messages",
                           "context_length_exceeded")
        mt = _field(body, name, (int,), None, lambda v: v >= 0, "an integer >= 0")
        if mt is None:
            return min(default, room) if default is not None else room
        if n_prompt + mt > self.ctx:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens. However, you requested "
                                f"{n_prompt + mt} tokens ({n_prompt} in the prompt, {mt} in '{name}'). "
                                f"Reduce the prompt or '{name}'.", name, "context_length_exceeded")
        return mt

    def token_ids_check(self, ids: list[int], where: str) -> None:
        v = self.engine.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < v:
                raise APIError(400, f"'{where}' holds token id {i!r}, outside the vocabulary [0, {v})", where)

    # -------------------------------------------------------------- completions

    def parse_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError(400, "'prompt' is required (a string, a list of strings, token ids, or lists of ids)",
                           "prompt")
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a non-empty string, list of strings, list of token ids, "
                                "or list of lists of token ids", "prompt")
        if len(prompts) > 64:
            raise APIError(400, f"'prompt' holds {len(prompts)} prompts; at most 64 per request", "prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "'prompt' must not be empty", "prompt")
                out.append(self.tok.encode(p, bos=True))
            else:
                if not p:
                    raise APIError(400, "'prompt' holds an empty token list", "prompt")
                self.token_ids_check(p, "prompt")
                out.append(list(p))
        return out

    def completion_params(self, body: dict, n_prompt: int) -> tuple[SamplingParams, bool, int]:
        echo = bool(_field(body, "echo", (bool,), False))
        lp = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS,
                    f"an integer in [0, {MAX_LOGPROBS}]")
        if body.get("suffix"):
            raise APIError(400, "'suffix' (insertion) is not supported", "suffix")
        mt = self.max_tokens(body, n_prompt, 16, "max_tokens")
        if mt == 0 and not echo:
            raise APIError(400, "'max_tokens' may be 0 only with echo=true (scoring the prompt)", "max_tokens")
        p = sampling_from(body, max(mt, 1), lp, lp if echo and lp is not None else None)
        return p, echo, mt

    def logprobs_block(self, prompt_ids: list[int], prompt_lps: list[TokenLogprob | None] | None,
                       lps: list[TokenLogprob], echo: bool, start_offset: int = 0) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        off = start_offset
        items: list[tuple[int, TokenLogprob | None]] = []
        if echo and prompt_lps is not None:
            items += list(zip(prompt_ids, prompt_lps))
        items += [(t.token_id, t) for t in lps]
        for tid, t in items:
            s = token_text(self.tok, tid)
            tokens.append(s)
            offsets.append(off)
            off += len(s)
            token_lps.append(None if t is None else t.logprob)
            tops.append(None if t is None else {token_text(self.tok, i): v for i, v in t.top} or
                        {s: t.logprob})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def completions(self, body: dict) -> Any:
        self.check_model(body)
        prompts = self.parse_prompts(body)
        n = self.n_of(body)
        stream = bool(_field(body, "stream", (bool,), False))
        jobs = []
        for pi, ids in enumerate(prompts):
            params, echo, mt = self.completion_params(body, len(ids))
            for k in range(n):
                p = params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + k})
                jobs.append((pi * n + k, ids, p, echo, mt))
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if stream:
            return self._stream_completions(cid, jobs, body)
        results = await asyncio.gather(*[self._collect(ids, p) for _, ids, p, _, _ in jobs])
        choices, n_prompt, n_gen = [], 0, 0
        for (index, ids, p, echo, mt), (text, out_ids, lps, plps, reason) in zip(jobs, results):
            if mt == 0:
                text, out_ids, lps, reason = "", [], [], "length"
            prefix = self.tok.decode(ids) if echo else ""
            choice: dict[str, Any] = {"index": index, "text": prefix + text, "finish_reason": reason,
                                      "logprobs": None}
            if p.logprobs is not None:
                choice["logprobs"] = self.logprobs_block(ids, plps, lps, echo)
            choices.append(choice)
            n_prompt += len(ids)
            n_gen += len(out_ids)
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(n_prompt, n_gen)}

    async def _collect(self, ids: list[int], p: SamplingParams) -> tuple[str, list[int], list[TokenLogprob], Any, str]:
        text, out_ids, lps, plps, reason = [], [], [], None, "length"
        async for d in self.aengine.run(ids, p):
            text.append(d.text)
            out_ids += d.token_ids
            lps += d.logprobs
            if d.prompt_logprobs is not None:
                plps = d.prompt_logprobs
            if d.finished:
                reason = d.finish_reason or "length"
        return "".join(text), out_ids, lps, plps, reason

    async def _stream_completions(self, cid: str, jobs: list, body: dict) -> AsyncIterator[str]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
            body.get("stream_options"), dict) else False
        n_prompt = sum(len(j[1]) for j in jobs)
        n_gen = 0
        async for index, d in _merge([(j[0], self.aengine.run(j[1], j[2])) for j in jobs]):
            n_gen += len(d.token_ids)
            job = next(j for j in jobs if j[0] == index)
            if not d.text and not d.finished and job[2].logprobs is None:
                continue
            choice: dict[str, Any] = {"index": index, "text": d.text,
                                      "finish_reason": d.finish_reason if d.finished else None, "logprobs": None}
            if job[2].logprobs is not None:
                choice["logprobs"] = self.logprobs_block([], None, d.logprobs, False)
            yield _sse({"id": cid, "object": "text_completion", "created": int(time.time()),
                        "model": self.model_name, "choices": [choice]})
        if include_usage:
            yield _sse({"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                        "choices": [], "usage": _usage(n_prompt, n_gen)})
        yield "data: [DONE]\n\n"

    # -------------------------------------------------------------- chat

    def chat_request(self, body: dict) -> tuple[list[int], SamplingParams, int]:
        try:
            msgs = check_messages(body.get("messages"))
        except LlamalabError as e:
            raise APIError(400, str(e), "messages") from None
        if msgs[-1]["role"] == "assistant":
            raise APIError(400, "messages: the last message must be from the user (or system)", "messages")
        ids, _ = render(msgs, self.template, self.tok, add_generation_prompt=True)
        want_lp = bool(_field(body, "logprobs", (bool,), False))
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_LOGPROBS,
                     f"an integer in [0, {MAX_LOGPROBS}]")
        mt = self.max_tokens(body, len(ids), None, "max_completion_tokens", "max_tokens")
        if mt == 0:
            raise APIError(400, "'max_tokens' must be >= 1 for chat", "max_tokens")
        p = sampling_from(body, mt, top if want_lp else None, None)
        p.stop = p.stop + stop_strings(self.template)
        return ids, p, self.n_of(body)

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            s = token_text(self.tok, tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in lps]}

    async def chat(self, body: dict) -> Any:
        self.check_model(body)
        ids, p, n = self.chat_request(body)
        stream = bool(_field(body, "stream", (bool,), False))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        params = [p if p.seed is None else SamplingParams(**{**p.__dict__, "seed": p.seed + k}) for k in range(n)]
        if stream:
            return self._stream_chat(cid, ids, params, body)
        results = await asyncio.gather(*[self._collect(ids, q) for q in params])
        choices = []
        n_gen = 0
        for k, (text, out_ids, lps, _, reason) in enumerate(results):
            c: dict[str, Any] = {"index": k, "message": {"role": "assistant", "content": text.strip()},
                                 "finish_reason": reason, "logprobs": None}
            if p.logprobs is not None:
                c["logprobs"] = self.chat_logprobs(lps)
            choices.append(c)
            n_gen += len(out_ids)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(len(ids) * n, n_gen)}

    async def _stream_chat(self, cid: str, ids: list[int], params: list[SamplingParams], body: dict
                           ) -> AsyncIterator[str]:
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and bool(so.get("include_usage"))
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_name}
        for k in range(len(params)):
            yield _sse({**base, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
        started = [False] * len(params)
        n_gen = 0
        async for k, d in _merge([(k, self.aengine.run(ids, q)) for k, q in enumerate(params)]):
            n_gen += len(d.token_ids)
            text = d.text if started[k] else d.text.lstrip()
            started[k] = started[k] or bool(text)
            if text or d.logprobs and params[k].logprobs is not None:
                c: dict[str, Any] = {"index": k, "delta": {"content": text}, "finish_reason": None, "logprobs": None}
                if params[k].logprobs is not None:
                    c["logprobs"] = self.chat_logprobs(d.logprobs)
                yield _sse({**base, "choices": [c]})
            if d.finished:
                yield _sse({**base, "choices": [{"index": k, "delta": {}, "finish_reason": d.finish_reason,
                                                 "logprobs": None}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(len(ids) * len(params), n_gen)})
        yield "data: [DONE]\n\n"

    # -------------------------------------------------------------- the app

    def app(self) -> Any:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

        app = FastAPI(title="llamalab", version="0.1.0", docs_url=None, redoc_url=None)

        def error(e: APIError) -> JSONResponse:
            kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status, "invalid_request_error")
            if e.status >= 500:
                kind = "server_error"
            return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                                status_code=e.status)

        async def handle(request: Request, fn: Callable) -> Any:
            try:
                if self.api_key:
                    auth = request.headers.get("authorization", "")
                    if auth != f"Bearer {self.api_key}":
                        raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                       None, "invalid_api_key")
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw else None
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise APIError(400, f"The request body is not valid JSON ({e})") from None
                if not isinstance(body, dict):
                    raise APIError(400, "The request body must be a JSON object")
                result = await fn(body)
                if hasattr(result, "__aiter__"):
                    gen = result
                    try:  # NOTE: pull the first chunk here so that a request error is still a 4xx, not a broken stream
                        first = await gen.__anext__()
                    except StopAsyncIteration:
                        first = ""

                    async def chain() -> AsyncIterator[str]:
                        yield first
                        try:
                            async for chunk in gen:
                                yield chunk
                        except APIError as e:
                            yield _sse({"error": {"message": e.message, "type": "invalid_request_error",
                                                  "param": e.param, "code": e.code}})

                    return StreamingResponse(chain(), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                return JSONResponse(result)
            except APIError as e:
                return error(e)
            except Exception as e:  # noqa: BLE001 - a bug in one request must not take the server down
                return error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await handle(request, self.completions)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await handle(request, self.chat)

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
                return error(APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      None, "invalid_api_key"))
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "llamalab", "max_model_len": self.ctx,
                                                "chat_template": self.template}]}

        @app.get("/health")
        async def health() -> Any:
            return {"status": "ok", "model": self.model_name, **self.engine.stats}

        @app.get("/")
        async def index() -> Any:
            return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

        @app.exception_handler(404)
        async def not_found(request: Request, exc: Exception) -> Any:
            return error(APIError(404, f"no route {request.method} {request.url.path}"))

        @app.exception_handler(405)
        async def bad_method(request: Request, exc: Exception) -> Any:
            return error(APIError(405, f"method {request.method} not allowed on {request.url.path}"))

        return app


async def _merge(streams: list[tuple[int, AsyncIterator[Delta]]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several delta streams as their items arrive."""
    if len(streams) == 1:
        k, s = streams[0]
        async for d in s:
            yield k, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, s: AsyncIterator[Delta]) -> None:
        try:
            async for d in s:
                await q.put((k, d))
        except Exception as e:  # noqa: BLE001
            await q.put((k, e))
        finally:
            await q.put((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in streams]
    live = len(tasks)
    try:
        while live:
            k, d = await q.get()
            if d is None:
                live -= 1
            elif isinstance(d, Exception):
                raise d
            else:
                yield k, d
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_server(engine: Engine, model_name: str = "llamalab", chat_template: str | None = None,
                 api_key: str = "") -> Server:
    return Server(engine, model_name, resolve_template(engine.meta, chat_template), api_key)
