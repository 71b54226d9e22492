"""What ``llamalab serve`` checks before a request reaches a handler: Host, Origin, content type, size.

:class:`Guard` is a plain ASGI middleware (no ``BaseHTTPMiddleware``: that one breaks streaming and
disconnect detection) that answers, without reading the body:

- **Host** (DNS rebinding): a page on ``evil.example`` whose name the attacker re-points at
  127.0.0.1 would reach a keyless local server as "same origin". The ``Host`` header must name the
  bound address: for a loopback bind (``127.0.0.1``, ``localhost``, ``::1``) any of ``localhost``,
  ``127.0.0.1`` or ``[::1]`` with the bound port; for a wildcard bind (``0.0.0.0``, ``::``) any IP
  literal or ``localhost`` with that port (a rebinding attack needs a DNS *name*); otherwise the
  bound name itself. ``--allowed-hosts`` adds names (``name`` or ``name:port``; ``*`` turns the check
  off). Refused with 400 ``invalid_host``.
- **Origin** (cross-site requests from a browser): a request that carries an ``Origin`` header must
  come from the server's own origin (its ``host:port`` equals the ``Host`` header) or from one listed
  in ``--allowed-origins`` (``*`` = any). Refused with 403 ``cross_origin``. Listed origins also get
  CORS headers and preflight answers, so a page served elsewhere can use the API.
- **Content type**: a POST must say ``Content-Type: application/json``; anything else (``text/plain``
  is what a cross-site HTML form or a "simple" fetch can send without a preflight) is refused with
  415 ``unsupported_media_type``.
- **Size**: a declared ``Content-Length`` beyond ``--max-body-bytes`` is refused with 413 before a
  byte of the body is read; handlers count the bytes of a chunked body as they read it
  (:func:`read_body`).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass
class ServeOptions:
    """Limits and access rules of one server (the ``serve`` flags of the same names)."""
    api_key: str = ""
    host: str = "127.0.0.1"  # the bound address: what the Host header must name
    port: int | None = None  # None: any port (an app not started by `llamalab serve`)
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 8 << 20
    max_prompt_chars: int = 0  # 0: 32 x the model's context
    max_messages: int = 512


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 415: "invalid_request_error"}


def error_body(e: APIError) -> bytes:
    kind = "server_error" if e.status >= 500 else ERROR_TYPES.get(e.status, "invalid_request_error")
    msg = e.message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate echoed back
    return json.dumps({"error": {"message": msg, "type": kind, "param": e.param, "code": e.code}}).encode()


def _split_hostport(value: str) -> tuple[str, int | None] | None:
    """'name:port', '[v6]:port', 'name' -> (lower-case host without brackets, port or None); None if malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_s = rest[1:] if rest else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    elif ":" in value:  # a bare IPv6 literal
        host, port_s = value, ""
    else:
        host, port_s = value, ""
    if port_s:
        if not port_s.isdigit() or len(port_s) > 5:
            return None
        return host, int(port_s)
    return host, None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostRule:
    """Which ``Host`` header values this server answers (see the module docstring)."""

    def __init__(self, bound: str, port: int | None, allowed: tuple[str, ...] = ()) -> None:
        self.port = port
        self.any = "*" in allowed
        self.bound = bound.strip("[]").lower()
        self.extra = [hp for hp in (_split_hostport(a) for a in allowed if a != "*") if hp is not None]

    def ok(self, value: str | None) -> bool:
        if self.any:
            return True
        hp = _split_hostport(value or "")
        if hp is None:
            return False
        host, port = hp
        for name, p in self.extra:
            if host == name and (p is None or p == port):
                return True
        if self.port is not None and (port or 80) != self.port:
            return False
        if self.bound in WILDCARDS:
            return host == "localhost" or _is_ip(host)
        if _is_loopback(self.bound):
            return _is_loopback(host)
        return host == self.bound


def _origin_netloc(origin: str) -> str | None:
    try:
        u = urlsplit(origin)
        if u.scheme not in ("http", "https") or not u.hostname:
            return None
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{host}:{port}"


def _host_netloc(host_header: str) -> str | None:
    hp = _split_hostport(host_header)
    if hp is None:
        return None
    host, port = hp
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port or 80}"


class Guard:
    """ASGI middleware: Host, Origin, content type and declared size (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], opts: ServeOptions) -> None:
        self.app = app
        self.opts = opts
        self.hosts = HostRule(opts.host, opts.port, opts.allowed_hosts)
        self.any_origin = "*" in opts.allowed_origins
        self.origins = {o.rstrip("/").lower() for o in opts.allowed_origins if o != "*"}

    def origin_ok(self, origin: str, host: str) -> bool:
        if self.any_origin or origin.rstrip("/").lower() in self.origins:
            return True
        own = _origin_netloc(origin)
        return own is not None and own == _host_netloc(host)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        refusal = None
        if not self.hosts.ok(host):
            refusal = APIError(400, f"Host header {host[:100]!r} is not an address of this server (DNS rebinding "
                                    f"guard); start the server with --allowed-hosts NAME to accept it",
                               None, "invalid_host")
        elif "origin" in headers and not self.origin_ok(headers["origin"], host):
            refusal = APIError(403, f"cross-origin request from {headers['origin'][:100]!r} refused; start the "
                                    f"server with --allowed-origins ORIGIN to accept it", None, "cross_origin")
        elif scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            length = headers.get("content-length", "")
            if ctype != "application/json":
                refusal = APIError(415, f"Content-Type must be application/json, got {ctype[:60] or 'none'!r}",
                                   None, "unsupported_media_type")
            elif length and (not length.isdigit() or int(length) > self.opts.max_body_bytes):
                refusal = APIError(413, f"request body of {length[:20]} bytes is over this server's limit of "
                                        f"{self.opts.max_body_bytes} bytes (--max-body-bytes)", None,
                                   "request_too_large")
        if refusal is None:
            return await self.app(scope, receive, send)
        body = error_body(refusal)
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (chunked bodies too)."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                           None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
