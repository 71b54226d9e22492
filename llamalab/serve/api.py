"""The OpenAI-compatible HTTP API and web chat page behind ``llamalab serve`` (:mod:`llamalab.commands.serve`).

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``logprobs``, ``echo``: evaluation
harnesses that speak the OpenAI API score log-likelihoods with ``echo=true, max_tokens=0|1``),
``POST /v1/chat/completions``, both streaming by server-sent events (``stream=true``), ``GET /``
(the chat page, no external assets), ``GET /health`` and ``GET /openapi.json``.

One engine thread owns the model. HTTP handlers read the body (at most ``--max-body-bytes``), then
parse, validate and tokenise it in a small thread pool, so the event loop never waits on a big
request; they hand the request to the engine thread and await its deltas on an asyncio queue. The
thread admits new requests into free batch slots between decode steps (continuous batching), so
concurrent requests share every forward pass.

Isolation: a request that fails inside the engine (see :mod:`llamalab.inference.engine`) ends alone
with a 500 (or an error event in its stream); the others go on. A client that disconnects has its
request aborted, streaming or not. On SIGTERM/SIGINT the server stops accepting, lets in-flight
requests run for ``--drain-seconds``, aborts what is left and prints its summary line.

Every client mistake gets a 4xx JSON error in OpenAI's shape (``{"error": {"message", "type",
"param", "code"}}``) naming the field at fault, and the server keeps serving: bad JSON, integers of
more than 30 digits, nesting beyond the parser's depth, lone surrogates, NaN, too many messages or
characters (400), an unknown model (404), a prompt longer than the context, out-of-range
parameters (400), a missing or wrong API key (401), a foreign Origin (403), a body over the limit
(413), a non-JSON content type (415). Host, Origin, content type and size are checked by
:class:`llamalab.serve.guard.Guard` before a handler runs; docs/security.md has the threat model.

FastAPI and uvicorn are the ``serve`` extra; FastAPI is imported only here (in :meth:`Server.app`),
uvicorn only by :func:`run_server`.
"""

# NOTE: no `from __future__ import annotations`: FastAPI reads the handlers' `Request` annotations at runtime.
import asyncio
import hmac
import json
import math
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from llamalab.common import LlamalabError, print0
from llamalab.inference.engine import Delta, Engine, TokenLogprob, token_text
from llamalab.inference.sampling import MAX_LOGPROBS, SamplingParams
from llamalab.serve.guard import APIError, Guard, ServeOptions, error_body, read_body
from llamalab.tokenizer.jinja_template import SourceTemplate, chat_template_for
from llamalab.tokenizer.templates import check_messages, render, stop_strings, stop_token_ids

STATIC = Path(__file__).parent / "static"
MAX_N = 8
MAX_PROMPTS = 64
MAX_INT_DIGITS = 30
CHARS_PER_TOKEN_LIMIT = 32  # the default --max-prompt-chars is this many characters per context token
_SURROGATE = re.compile("[\ud800-\udfff]")

__all__ = ["APIError", "AsyncEngine", "Server", "ServeOptions", "build_server", "parse_json", "run_server"]


# ----------------------------------------------------------------------------- engine thread


class AsyncEngine:
    """Runs ``Engine.step`` in one thread; asyncio handlers submit requests and await deltas."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.stopped = False
        self.subs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # owned by the thread
        self.thread = threading.Thread(target=self._loop, name="llamalab-engine", daemon=True)
        self.thread.start()

    @staticmethod
    def _send(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: Any) -> None:
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the handler's loop is gone (shutdown): nobody to tell
            pass

    def _loop(self) -> None:
        while not self.stopped:
            try:
                item = self.inbox.get(timeout=0.05) if not self.engine.has_work() else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                self._take(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if not self.engine.has_work():
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a scheduler bug no single request owns; never let the thread die
                traceback.print_exc(file=sys.stderr)
                self._reset(e)
                continue
            for d in deltas:
                target = self.subs.get(d.request_id)
                if target is not None:
                    self._send(target, d)
                    if d.finished:
                        self.subs.pop(d.request_id, None)

    def _reset(self, e: Exception) -> None:
        """Last resort when ``Engine.step`` itself raised: end what is in flight, free the slots, keep serving."""
        for target in self.subs.values():
            self._send(target, e)
        self.subs.clear()
        self.engine.waiting.clear()
        for i in range(len(self.engine.active)):
            self.engine.runner.free_slot(i)
        self.engine.active.clear()

    def _take(self, item: tuple) -> None:
        kind = item[0]
        if kind == "abort":
            self.engine.abort(item[1])
            self.subs.pop(item[1], None)
            return
        if kind == "abort_all":  # the engine frees an aborted request's slot without a last delta: send it here
            for rid in list(self.subs):
                self.engine.abort(rid)
                self._send(self.subs.pop(rid), Delta(rid, "", [], [], True, "abort"))
            return
        _, rid, ids, params, loop, q = item
        try:
            self.engine.add(ids, params, request_id=rid)
            self.subs[rid] = (loop, q)
        except Exception as e:  # noqa: BLE001 - LlamalabError: the request is invalid (400); else this request fails
            self._send((loop, q), e)

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
                    finished = True
                    raise APIError(400, str(d), "prompt")
                if isinstance(d, Exception):
                    finished = True
                    raise APIError(500, f"generation failed: {type(d).__name__}: {d}", None, "generation_failed")
                if d.finish_reason == "error":
                    finished = True
                    raise APIError(500, f"generation failed: {d.error}", None, "generation_failed")
                yield d
                if d.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.inbox.put(("abort", rid))

    def abort_all(self) -> None:
        """End every request in flight with finish_reason "abort" (the end of a graceful shutdown)."""
        self.inbox.put(("abort_all",))

    def close(self) -> None:
        self.stopped = True
        self.thread.join(timeout=5)


# ----------------------------------------------------------------------------- request parsing


def _parse_int(s: str) -> int:
    digits = len(s.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(s)


def _no_constant(s: str) -> float:
    raise ValueError(f"{s} is not a JSON number")


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; every malformation is a 400 (never a RecursionError or a 500)."""
    if not raw:
        raise APIError(400, "The request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"The request body is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply for the JSON parser") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"The request body is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # our hooks, or Python's own integer-string limit
        raise APIError(400, f"The request body is refused: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object")
    return body


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _text(s: str, where: str) -> str:
    """A string from the request that we tokenise or compare: valid Unicode (no lone surrogate)."""
    m = _SURROGATE.search(s)
    if m is not None:
        raise APIError(400, f"'{where}' holds a lone surrogate (U+{ord(m.group()):04X} at character {m.start()}); "
                            f"send valid Unicode", where)
    return s


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
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{name}' must be {want or 'a finite number'}, got {v!r}", name)
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' must be {want}, got {_short(v)}", name)
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 16
            or not all(isinstance(s, str) and s and len(s) <= 256 for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 16 non-empty strings "
                            "(of at most 256 characters)", "stop")
    return [_text(s, "stop") for s in stop]


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


def _stream_usage(body: dict) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and bool(so.get("include_usage"))


class Server:
    """The FastAPI app around an :class:`AsyncEngine` (see the module docstring)."""

    def __init__(self, engine: Engine, model_name: str, template: "str | SourceTemplate",
                 options: ServeOptions | None = None) -> None:
        self.engine = engine
        self.aengine = AsyncEngine(engine)
        self.model_name = model_name
        self.template = template
        self.opts = options or ServeOptions()
        self.api_key = self.opts.api_key
        self.created = int(time.time())
        self.tok = engine.tokenizer
        self.ctx = engine.max_seq_len
        self.max_chars = self.opts.max_prompt_chars or CHARS_PER_TOKEN_LIMIT * self.ctx
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamalab-prepare")
        self.stops = stop_strings(template) if isinstance(template, str) else template.stop_strings()
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        """Turn closers that are one special token (decoding drops those from the text, so stop on the id)."""
        if isinstance(self.template, SourceTemplate):
            return self.template.stop_token_ids(self.tok)
        return stop_token_ids(self.template, self.tok)

    def close(self) -> None:
        self.aengine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- shared checks

    def authorized(self, request: Any) -> bool:
        if not self.api_key:
            return True
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                                  self.api_key.encode("utf-8"))

    def check_auth(self, request: Any) -> None:
        if not self.authorized(request):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {_short(model, 100)} does not exist; this server serves "
                                f"'{self.model_name}'", "model", "model_not_found")

    def check_chars(self, n: int, where: str) -> None:
        if n > self.max_chars:
            raise APIError(400, f"'{where}' holds {n} characters, over this server's limit of {self.max_chars} "
                                f"(--max-prompt-chars; the model's context is {self.ctx} tokens)", where,
                           "prompt_too_long")

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
                raise APIError(400, f"'{where}' holds token id {_short(i)}, outside the vocabulary [0, {v})", where)
        if len(ids) >= self.ctx:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt has "
                                f"{len(ids)} tokens. Shorten the prompt.", where, "context_length_exceeded")

    def with_stops(self, p: SamplingParams) -> SamplingParams:
        """The chat template's turn closers added to the request's own stops (strings and special-token ids)."""
        stops = p.stop + [s for s in self.stops if s not in p.stop]
        if len(stops) > 16:
            raise APIError(400, f"'stop' holds {len(p.stop)} strings; with this template's {len(self.stops)} own "
                                f"stop strings at most 16 fit", "stop")
        p.stop = stops
        p.stop_token_ids = p.stop_token_ids + self.stop_ids
        return p

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
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", "prompt")
        self.check_chars(sum(len(p) for p in prompts if isinstance(p, str)), "prompt")  # before any tokenising
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "'prompt' must not be empty", "prompt")
                out.append(self.tok.encode(_text(p, "prompt"), bos=getattr(self.tok, "add_bos", True)))
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
        if echo and lp is not None and mt == 1:  # scoring: lm-eval drops the last token returned, the generated
            p.ignore_eos, p.stop_token_ids, p.stop = True, [], []  # one, so it comes back even when it is EOS
        return p, echo, mt

    def prepare_completions(self, body: dict) -> dict[str, Any]:
        """Everything before generation (validation, tokenising): runs in the thread pool."""
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
        return {"jobs": jobs, "stream": stream, "usage": _stream_usage(body)}

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

    async def completions(self, job: dict[str, Any]) -> Any:
        jobs = job["jobs"]
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if job["stream"]:
            return self._stream_completions(cid, jobs, job["usage"])
        results = await _gather([self._collect(ids, p) for _, ids, p, _, _ in jobs])
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

    async def _stream_completions(self, cid: str, jobs: list, include_usage: bool) -> AsyncIterator[str]:
        n_prompt = sum(len(j[1]) for j in jobs)
        n_gen = 0
        by_index = {j[0]: j for j in jobs}
        async for index, d in _merge([(j[0], self.aengine.run(j[1], j[2])) for j in jobs]):
            n_gen += len(d.token_ids)
            job = by_index[index]
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

    def chat_messages(self, body: dict) -> list[dict[str, str]]:
        """Cheap checks first (count, characters, Unicode), then roles and order; nothing is tokenised yet."""
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > self.opts.max_messages:
            raise APIError(400, f"'messages' holds {len(messages)} messages; this server accepts at most "
                                f"{self.opts.max_messages} (--max-messages)", "messages", "too_many_messages")
        if isinstance(messages, list):
            self.check_chars(sum(len(m["content"]) for m in messages
                                 if isinstance(m, dict) and isinstance(m.get("content"), str)), "messages")
            for i, m in enumerate(messages):
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    _text(m["content"], f"messages[{i}].content")
        try:
            msgs = check_messages(messages)
        except LlamalabError as e:
            raise APIError(400, str(e), "messages") from None
        if msgs[-1]["role"] == "assistant":
            raise APIError(400, "messages: the last message must be from the user (or system)", "messages")
        return msgs

    def render_chat(self, msgs: list[dict[str, str]]) -> list[int]:
        if isinstance(self.template, SourceTemplate):
            try:
                return self.template.render(msgs, self.tok, add_generation_prompt=True)
            except LlamalabError as e:
                raise APIError(400, str(e), "messages") from None
        return render(msgs, self.template, self.tok, add_generation_prompt=True)[0]

    def prepare_chat(self, body: dict) -> dict[str, Any]:
        """Everything before generation (validation, template, tokenising): runs in the thread pool."""
        self.check_model(body)
        ids = self.render_chat(self.chat_messages(body))
        want_lp = bool(_field(body, "logprobs", (bool,), False))
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= MAX_LOGPROBS,
                     f"an integer in [0, {MAX_LOGPROBS}]")
        mt = self.max_tokens(body, len(ids), None, "max_completion_tokens", "max_tokens")
        if mt == 0:
            raise APIError(400, "'max_tokens' must be >= 1 for chat", "max_tokens")
        p = self.with_stops(sampling_from(body, mt, top if want_lp else None, None))
        n = self.n_of(body)
        params = [p if p.seed is None else SamplingParams(**{**p.__dict__, "seed": p.seed + k}) for k in range(n)]
        return {"ids": ids, "params": params, "stream": bool(_field(body, "stream", (bool,), False)),
                "usage": _stream_usage(body)}

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            s = token_text(self.tok, tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in lps]}

    async def chat(self, job: dict[str, Any]) -> Any:
        ids, params = job["ids"], job["params"]
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if job["stream"]:
            return self._stream_chat(cid, ids, params, job["usage"])
        results = await _gather([self._collect(ids, q) for q in params])
        choices = []
        n_gen = 0
        for k, (text, out_ids, lps, _, reason) in enumerate(results):
            c: dict[str, Any] = {"index": k, "message": {"role": "assistant", "content": text.strip()},
                                 "finish_reason": reason, "logprobs": None}
            if params[k].logprobs is not None:
                c["logprobs"] = self.chat_logprobs(lps)
            choices.append(c)
            n_gen += len(out_ids)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(len(ids) * len(params), n_gen)}

    async def _stream_chat(self, cid: str, ids: list[int], params: list[SamplingParams], include_usage: bool
                           ) -> AsyncIterator[str]:
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

    def health(self, full: bool) -> dict[str, Any]:
        if not full:
            return {"status": "ok"}
        return {"status": "ok", "model": self.model_name, **self.engine.stats,
                "active": len(self.engine.active), "waiting": len(self.engine.waiting)}

    def app(self) -> Any:
        """The ASGI app: FastAPI routes inside :class:`~llamalab.serve.guard.Guard` (and CORS for listed origins)."""
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

        app = FastAPI(title="llamalab", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)

        def error(e: APIError) -> Response:
            return Response(error_body(e), status_code=e.status, media_type="application/json")

        async def offload(fn: Callable, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

        async def until_done_or_gone(request: Request, coro: Any) -> Any:
            """Await ``coro``; if the client disconnects first, cancel it (its engine requests are aborted)."""
            task = asyncio.ensure_future(coro)
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=0.2)
                    if done:
                        return task.result()
                    if await request.is_disconnected():
                        task.cancel()
                        raise APIError(499, "client closed the request", None, "client_closed")
            finally:
                if not task.done():
                    task.cancel()

        async def handle(request: Request, prepare: Callable, respond: Callable) -> Any:
            try:
                self.check_auth(request)
                raw = await read_body(request, self.opts.max_body_bytes)
                job = await offload(lambda: prepare(parse_json(raw)))
                if not job["stream"]:
                    return JSONResponse(await until_done_or_gone(request, respond(job)))
                gen = await respond(job)
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
                        yield "data: " + error_body(e).decode() + "\n\n"

                return StreamingResponse(chain(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            except APIError as e:
                return error(e)
            except Exception as e:  # noqa: BLE001 - a bug in one request must not take the server down
                traceback.print_exc(file=sys.stderr)
                return error(APIError(500, f"internal error ({type(e).__name__}); the server log has the details"))

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await handle(request, self.prepare_completions, self.completions)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await handle(request, self.prepare_chat, self.chat)

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            if not self.authorized(request):
                return error(APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      None, "invalid_api_key"))
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "llamalab", "max_model_len": self.ctx,
                                                "chat_template": str(self.template)}]}

        @app.get("/health")
        async def health(request: Request) -> Any:
            return self.health(self.authorized(request))

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> Any:
            if not self.authorized(request):
                return error(APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      None, "invalid_api_key"))
            return app.openapi()

        @app.get("/")
        async def index() -> Any:  # static, no model details: with a key set, the page asks for it
            return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

        @app.exception_handler(404)
        async def not_found(request: Request, exc: Exception) -> Any:
            return error(APIError(404, f"no route {request.method} {request.url.path[:100]}"))

        @app.exception_handler(405)
        async def bad_method(request: Request, exc: Exception) -> Any:
            return error(APIError(405, f"method {request.method} not allowed on {request.url.path[:100]}"))

        if self.opts.allowed_origins:
            from starlette.middleware.cors import CORSMiddleware

            origins = ["*"] if "*" in self.opts.allowed_origins else list(self.opts.allowed_origins)
            app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                               allow_headers=["authorization", "content-type"])
        return Guard(app, self.opts)


async def _gather(coros: list) -> list:
    """``asyncio.gather`` that cancels the siblings when one fails (their engine requests are aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


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
                 api_key: str = "", options: ServeOptions | None = None) -> Server:
    """The server around ``engine``: the template is the override, the folder's, or the imported source's."""
    opts = options or ServeOptions(api_key=api_key)
    if api_key and not opts.api_key:
        opts.api_key = api_key
    return Server(engine, model_name, chat_template_for(engine.meta, chat_template), opts)


def run_server(server: Server, host: str, port: int, drain_seconds: float = 10.0, log_level: str = "warning") -> None:
    """Serve under uvicorn until SIGTERM/SIGINT; then drain for ``drain_seconds``, abort the rest, return.

    uvicorn re-raises the signal it caught once it has stopped; a no-op handler for that moment
    lets the caller print its summary line instead of dying by the signal. A second Ctrl-C exits at once.
    """
    import signal

    import uvicorn

    timer: list[threading.Timer] = []

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                n = len(server.aengine.subs)
                print0(f"serve: {signal.Signals(sig).name}: no new connections; draining {n} request(s) for up to "
                       f"{drain_seconds:g} s, then aborting the rest")
                t = threading.Timer(drain_seconds, server.aengine.abort_all)
                t.daemon = True
                t.start()
                timer.append(t)

    cfg = uvicorn.Config(server.app(), host=host, port=port, log_level=log_level,
                         timeout_graceful_shutdown=int(math.ceil(drain_seconds)) + 5)
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, lambda *_: None) for s in handled} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        _Uvicorn(cfg).run()
    finally:
        for t in timer:
            t.cancel()
        for s, h in previous.items():
            signal.signal(s, h)
        server.close()
