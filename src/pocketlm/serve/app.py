"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of the batching engine.

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming as SSE ending in `data: [DONE]`, or
not), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text), GET / (the chat page)
and GET /static/{name} (its scripts, styles and vendored libraries: the files of serve/static/ by name, no paths).

Robustness (RELIABILITY.md §3, §6 items 13-17):
- Every error is the OpenAI envelope with the right status (errors.py); FastAPI's 422 and Starlette's plain
  404/405 bodies are replaced; an unexpected exception is a 500 with a request id and no traceback.
- Body limit: a Content-Length above `max_body_bytes` is answered 413 before the body is read; a chunked body
  is counted while read and refused at the limit, before JSON parsing or tokenization.
- `--api-key`: /v1/* and /metrics need `Authorization: Bearer KEY` (constant-time compare), else 401. The page
  and /health stay open (the page asks for the key). No CORS headers are sent: only same-origin pages may call.
- Backpressure: past `max_slots` running and `max_queue` waiting sequences, 429 with `Retry-After: 1` (chosen
  over uvicorn's 503 because the openai clients honour Retry-After on 429).
- Browsers (RELIABILITY.md §3; issue 23): the Host header must name this machine (localhost, a loopback address,
  the bound address, or `allowed_hosts`), else 403 -- a DNS-rebinding page cannot drive the API; a body POST
  must be `Content-Type: application/json`, else 415 -- a cross-site `text/plain` or form POST (a CORS "simple
  request") never runs a generation; every response carries `X-Frame-Options: DENY`,
  `Content-Security-Policy: frame-ancestors 'none'` (merged into the page's policy) and
  `X-Content-Type-Options: nosniff`.
- Connections (GuardedH11Protocol): request headers within `header_timeout` s, the body within `body_timeout`
  s of its headers, else 408 and the connection closes; idle kept-alive connections close after
  `keep_alive_timeout` s; past `max_connections` open connections a new one is answered 503 at once. Trickling
  clients therefore cannot hold file descriptors or slots, and service goes on for the others.
- A client that disconnects while sending its body is one log line, not a traceback.
- Disconnects: a streaming response races the body against `http.disconnect` (not `request.is_disconnected`,
  which does not work behind middleware -- vLLM's `with_cancellation`), and a non-streaming request waits on
  the same message next to its result; either way `engine.cancel` frees the slot before the next decode step.

Echo (/v1/completions `echo: true`, OpenAI legacy): each choice's text starts with its prompt's text and, with
`logprobs: N`, its logprobs list the prompt tokens first (`token_logprobs[0]` and `top_logprobs[0]` null,
`text_offset` from schemas.echo_text_offsets), then the generated tokens (offsets continue after the prompt
text). The scores come from the engine thread's prefill (batching.py), never from a forward here. Streaming
with echo sends the prompt text (and its logprobs) as the first chunk of each choice.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from pocketlm.errors import ConfigError
from pocketlm.serve.batching import Engine, fix_longrope_policy
from pocketlm.serve.errors import APIError
from pocketlm.serve.metrics import Metrics
from pocketlm.serve.schemas import GenRequest, Limits, parse_request
from pocketlm.serve import vision_route

log = logging.getLogger("pocketlm.serve")
MiB = 2**20


@dataclass
class ServerConfig:
    model_name: str = "pocketlm"
    api_key: str | None = None
    max_slots: int = 8  # sequences decoded together
    max_queue: int = 64  # sequences waiting beyond those
    max_n: int = 8
    max_body_bytes: int = 4 * MiB
    context_length: int | None = None  # default: the model's max_position_embeddings
    chat_format: str | None = None  # default: the model's
    aliases: list[str] = field(default_factory=list)  # more names that reach the same model
    # Host header names accepted besides localhost and loopback addresses ("*" = any, "*.example.com" = its
    # subdomains); against DNS rebinding, see HostPolicy
    allowed_hosts: list[str] = field(default_factory=list)
    bind_host: str = "127.0.0.1"  # the address served: a specific one is an accepted Host too
    header_timeout: float = 10.0  # seconds for a request line and headers, else 408
    body_timeout: float = 60.0  # seconds for a request body after its headers, else 408
    keep_alive_timeout: float = 5.0  # seconds an idle kept-alive connection stays open
    max_connections: int | None = None  # open connections; past it 503 (default: default_max_connections())
    modelfile: dict | None = None  # a store model's Modelfile: its SYSTEM and PARAMETERs fill what requests omit
    prefill_chunk: int = 512  # prompt tokens prefilled per scheduler step, between decode steps
    prefix_cache: bool = True  # reuse the keys/values of shared prompt prefixes (serve/kvpool.py)
    prefix_cache_tokens: int | None = None  # positions the prefix cache keeps (None: 8192, at most 512 MiB)
    kv_pool_tokens: int | None = None  # KV positions admitted sequences may reserve; then 429 (None: no limit)
    image_dir: str | None = None  # local image paths in image_url parts are read only inside it (None: refused)


def default_max_connections() -> int:
    """256, or half the process's open-file limit when that is lower: the cap must bite before accept() fails."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no `resource` (Windows): the usual limits are far above 512
        return 256
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(8, min(256, soft // 2))


_WILDCARD_BINDS = {"", "0.0.0.0", "::", "*"}
_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _host_name(value: str) -> str:
    """The name in a Host header value, lowercased, without port, IPv6 brackets or trailing dot.

    A malformed value comes back whole (with its colon or bracket), so it matches no allowed name.
    """
    v = value.strip().lower()
    if v.startswith("["):  # "[::1]" or "[::1]:8000"
        end = v.find("]")
        rest = v[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return v
        return v[1:end]
    if v.count(":") == 1:
        name, _, port = v.partition(":")
        if port and not port.isdigit():
            return v
        v = name
    return v[:-1] if v.endswith(".") and v.count(":") == 0 else v


def _is_loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class HostPolicy:
    """Which Host header values the server answers: its defence against DNS rebinding.

    A rebinding page is served from the attacker's name, which later resolves to 127.0.0.1, so the browser sends
    `Host: evil.example`; answering only names of this machine stops it. Accepted: `localhost`, loopback addresses
    (127.0.0.0/8, ::1, bracketed, any port), the bound address when it is a specific one, and `allowed` names
    (exact, `*.example.com` for subdomains, or `*` for anything). Bound to a wildcard address (0.0.0.0, ::), any IP
    address literal is accepted too: a browser sends an address literal only for a page served from that address,
    so no rebinding is possible through one, and LAN clients reach the server by address. A request without a Host
    header (HTTP/1.0) is accepted: browsers always send one.
    """

    def __init__(self, allowed=(), bind_host: str = "127.0.0.1"):
        self.any = False
        self.names: set[str] = set()
        self.ips: set = set()
        self.suffixes: list[str] = []
        for raw in allowed:
            entry = str(raw).strip().lower()
            if entry == "*":
                self.any = True
                continue
            ip = _ip(entry.strip("[]"))
            if ip is not None:
                self.ips.add(ip)
            elif _HOST_NAME.fullmatch(entry):
                if entry.startswith("*."):
                    self.suffixes.append(entry[1:].rstrip("."))
                else:
                    self.names.add(entry.rstrip("."))
            else:
                raise ConfigError(f"allowed host {str(raw)[:100]!r} is not a host name, an IP address, "
                                  "'*.domain' or '*' (give it without scheme, port or path)")
        bind = bind_host.strip().lower()
        self.wildcard_bind = bind in _WILDCARD_BINDS
        if not self.wildcard_bind:
            ip = _ip(bind.strip("[]"))
            if ip is not None:
                self.ips.add(ip)
            else:
                self.names.add(bind.rstrip("."))

    def allows(self, value: str | None) -> bool:
        if self.any or value is None:
            return True
        name = _host_name(value)
        if name == "localhost" or name in self.names or any(name.endswith(s) for s in self.suffixes):
            return True
        ip = _ip(name)
        return ip is not None and (_is_loopback(ip) or ip in self.ips or self.wildcard_bind)


def _envelope(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# sent with every response: no page may frame this one (clickjacking), no content sniffing
_SECURITY_HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff")]
_FRAME_ANCESTORS = b"frame-ancestors 'none'"


def _with_security_headers(headers) -> list[tuple[bytes, bytes]]:
    """`headers` plus _SECURITY_HEADERS and `frame-ancestors 'none'`, merged into a Content-Security-Policy."""
    out = list(headers)
    names = {k.lower() for k, _ in out}
    out += [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
    csp = [i for i, (k, _) in enumerate(out) if k.lower() == b"content-security-policy"]
    if not any(b"frame-ancestors" in out[i][1].lower() for i in csp):
        if csp:
            k, v = out[csp[0]]
            out[csp[0]] = (k, v.rstrip(b"; ") + b"; " + _FRAME_ANCESTORS)
        else:
            out.append((b"content-security-policy", _FRAME_ANCESTORS))
    return out


# the chat page runs only its own same-origin files: no inline script or style, no plugins, no <base> rewrites
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; "
             "img-src 'self' data:")  # data: for attached images (vision models); never a foreign image
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".txt": "text/plain; charset=utf-8"}


def _static_assets() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of serve/static/ files with a known suffix, read once at startup."""
    out = {}
    for f in resources.files("pocketlm.serve").joinpath("static").iterdir():
        suffix = "." + f.name.rsplit(".", 1)[-1]
        if f.is_file() and suffix in _STATIC_TYPES:
            out[f.name] = (f.read_bytes(), _STATIC_TYPES[suffix])
    return out


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


class _Guard:
    """Outermost ASGI layer: the Host check (403), 413 on a declared oversize body, 401 without the API key,
    415 on a body that is not JSON, the security headers on every response, status metrics."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics, hosts: HostPolicy):
        self.app, self.config, self.metrics, self.hosts = app, config, metrics, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                    "/metrics", "/", "/api/chat", "/api/generate", "/api/tags", "/api/show",
                                    "/api/ps", "/api/version") else "other"
        status_seen = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
                message = {**message, "headers": _with_security_headers(message.get("headers", []))}
            await send(message)

        err = self._check(scope, path)
        try:
            if err is not None:  # the Ollama API (/api/*) answers errors in its own shape, {"error": "message"}
                response = (JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)
                            if path.startswith("/api/") else _envelope(err))
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(endpoint, status_seen.get("status", 499))

    def _check(self, scope, path: str) -> APIError | None:
        raw = scope.get("headers", [])
        for k, v in raw:  # every Host header (a duplicate must not smuggle a second name past the check)
            if k.lower() == b"host" and not self.hosts.allows(v.decode("latin-1")):
                host = v.decode("latin-1")[:100]
                return APIError(403, f"Host {host!r} is not allowed: this server answers to localhost and loopback "
                                     "addresses (DNS-rebinding protection); to reach it under this name, start it "
                                     f"with --allowed-host {_host_name(host)}", code="host_not_allowed")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return APIError(400, f"Content-Length {length[:40]!r} is not a number")
            if int(length) > self.config.max_body_bytes:
                return APIError(413, f"the request body has {int(length)} bytes; the limit is "
                                     f"{self.config.max_body_bytes}", code="request_too_large")
        if self.config.api_key and (path.startswith("/v1/") or path == "/metrics"):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.config.api_key.encode()):
                return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        if scope.get("method") in _BODY_METHODS and not _is_json(headers.get("content-type")):
            given = headers.get("content-type")
            shown = "no Content-Type" if given is None else f"Content-Type {given[:100]!r}"
            return APIError(415, f"{shown} is not supported: send the body as JSON with "
                                 "'Content-Type: application/json'", code="unsupported_media_type")
        return None


class _Throttled:
    """A log call that writes at most one line per `period` seconds; the lines left out are counted in the next."""

    def __init__(self, level: int, period: float = 10.0):
        self.level, self.period, self.last, self.skipped = level, period, float("-inf"), 0

    def __call__(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.period:
            self.skipped += 1
            return
        if self.skipped:
            msg, args = msg + " (and %d more in the last %g s)", (*args, self.skipped, self.period)
        log.log(self.level, msg, *args)
        self.last, self.skipped = now, 0


class _OutOfDescriptors:
    """Event-loop exception handler: asyncio's "socket.accept() out of system resource" (EMFILE, ...) becomes
    one warning per 10 s instead of a traceback per pending connection (thousands a second under a flood).

    asyncio then stops accepting for a second and tries again, so the server recovers by itself once
    connections close; anything else goes to the previous handler (or asyncio's default).
    """

    def __init__(self, previous=None):
        self.previous = previous
        self.warn = _Throttled(logging.WARNING)

    def __call__(self, loop, context: dict) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            self.warn("cannot accept connections: %s; retrying in 1 s -- lower --max-connections or raise "
                      "`ulimit -n`", context.get("exception") or "out of system resources")
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (and call `on_disconnect`) as soon as the client goes away."""

    def __init__(self, events, on_disconnect):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as tg:
            async def stream():
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                try:
                    async for chunk in self.events:
                        await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the socket went away under us
                    self.on_disconnect()
                tg.cancel_scope.cancel()

            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.on_disconnect()
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(watch)


async def _read_json(request: Request, limit: int):
    size, chunks = 0, []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        request.state.body_received = size  # for the one-line log in create_app's handler
        raise
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"malformed JSON in the request body: {str(e)[:200]}") from None
    try:  # "\ud800" escapes parse to lone surrogates, which are not text (and crash tokenizers)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"the request body contains invalid Unicode (a lone surrogate): {e.reason}") from None
    return body


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole_reply(request: Request, engine, req, collect) -> Response:
    """A non-streamed reply: await `collect` (the coroutine that reads `req`'s events into one JSON body) unless the
    client disconnects first; then the request is cancelled in the engine and the answer is a 499 nobody reads."""
    consumer = asyncio.ensure_future(collect)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not consumer.done():
            engine.cancel(req)
            consumer.cancel()
        watcher.cancel()
    if consumer not in done:
        return Response(status_code=499)  # nobody reads it: the client has gone
    return JSONResponse(consumer.result())


def create_app(model, tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """Build the app; starts the engine's scheduler thread (stopped by the app's shutdown)."""
    config = config or ServerConfig()
    ctx = config.context_length or model.config.max_position_embeddings
    if not 0 < ctx <= model.config.max_position_embeddings:
        raise ConfigError(f"context_length {ctx} is outside [1, {model.config.max_position_embeddings}]")
    if config.max_slots < 1 or config.max_queue < 0 or config.max_n < 1 or config.max_body_bytes < 1:
        raise ConfigError(f"invalid server limits: max_slots {config.max_slots} (>= 1), max_queue "
                          f"{config.max_queue} (>= 0), max_n {config.max_n} (>= 1), max_body_bytes "
                          f"{config.max_body_bytes} (>= 1)")
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        if not 0 < getattr(config, name) <= 3600:
            raise ConfigError(f"{name} {getattr(config, name)} must be in (0, 3600] seconds")
    if config.max_connections is None:
        config.max_connections = default_max_connections()
    if config.max_connections < 1:
        raise ConfigError(f"max_connections {config.max_connections} must be >= 1")
    hosts = HostPolicy(config.allowed_hosts, config.bind_host)
    if config.max_n > config.max_slots:
        config.max_n = config.max_slots  # a request must fit the slots at once
    declared = getattr(model, "declared_repetition_penalty", None)
    if declared is not None:  # the model file's own default fills requests that name none, below a Modelfile's
        mf = dict(config.modelfile or {})
        mf["parameters"] = {"repeat_penalty": declared} | dict(mf.get("parameters") or {})
        config.modelfile = mf
    policy = fix_longrope_policy(model, ctx)
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_slots=config.max_slots, max_queue=config.max_queue, context_length=ctx,
                    metrics=metrics, prefill_chunk_size=config.prefill_chunk, prefix_cache=config.prefix_cache,
                    prefix_cache_tokens=config.prefix_cache_tokens, kv_pool_tokens=config.kv_pool_tokens)
    limits = Limits(max_n=config.max_n, context_length=ctx)
    names = [config.model_name] + list(config.aliases)
    chat_format = config.chat_format or model.config.chat_format
    started = int(time.time())
    page = resources.files("pocketlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    assets = _static_assets()

    async def lifespan(app):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_OutOfDescriptors(loop.get_exception_handler()))
        yield
        engine.shutdown()

    app = FastAPI(title="pocketlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.state.longrope_policy = policy
    app.add_middleware(_Guard, config=config, metrics=metrics, hosts=hosts)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _envelope(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _envelope(APIError(404, f"no route {request.method} {request.url.path[:200]}", code="not_found"))
        if exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path[:200]}",
                           code="method_not_allowed")
            err.headers = dict(exc.headers or {})
            return _envelope(err)
        return _envelope(APIError(exc.status_code, str(exc.detail)[:500]))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _envelope(APIError(400, f"invalid request: {str(exc)[:300]}"))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request, exc):
        """The client went away mid-request: one log line (it is not a server error), and nobody to answer."""
        if not request.scope.get(_TIMED_OUT):  # else GuardedH11Protocol has logged the timeout
            client = request.client
            who = f"{client.host}:{client.port}" if client else "a client"
            got = getattr(request.state, "body_received", None)
            length = request.headers.get("content-length", "?")
            log.info("client %s disconnected while sending %s %s%s", who, request.method, request.url.path[:200],
                     f" ({got} of {length} body bytes received)" if got is not None else "")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        rid = uuid.uuid4().hex[:12]
        log.exception("unhandled error, request id %s", rid)
        return _envelope(APIError(500, f"internal server error (request id {rid})", code="internal_error"))

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_asset(name: str):
        """The page's scripts, styles and vendored libraries: only names in `assets` (no paths, no listing)."""
        if name not in assets:
            raise APIError(404, f"no static file {name[:100]!r}", code="not_found")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, **engine.stats()}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    def model_card(name):
        return {"id": name, "object": "model", "created": started, "owned_by": "pocketlm",
                "context_length": ctx}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in names:
            raise APIError(404, f"The model '{name[:100]}' does not exist", param="model", code="model_not_found")
        return model_card(name)

    def parse(body, kind):
        from pocketlm.store.defaults import apply_to_request
        body = apply_to_request(body, kind, config.modelfile)
        return parse_request(body, kind, tokenizer=tokenizer, model_names=names, limits=limits,
                             vocab_size=model.config.vocab_size, chat_format=chat_format)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, config.max_body_bytes)
        if vision_route.has_images(body):  # image_url parts: phi-3.5-vision, outside the batching engine
            return await vision_route.chat_with_images(request, body, model=model, tokenizer=tokenizer,
                                                       config=config, parse=parse, chat_format=chat_format)
        gen = await anyio.to_thread.run_sync(parse, body, "chat")  # tokenizing a 4 MiB body must not block
        return await _generate(request, gen)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, config.max_body_bytes)
        gen = await anyio.to_thread.run_sync(parse, body, "completion")
        return await _generate(request, gen)

    async def _generate(request: Request, gen: GenRequest):
        queue: asyncio.Queue = asyncio.Queue()
        req = engine.submit(gen, asyncio.get_running_loop(), queue)
        metrics.prompt(sum(len(p) for p in gen.prompts))
        rid = ("chatcmpl-" if gen.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        fmt = _Formatter(gen, tokenizer, rid, gen.model)
        if gen.stream:
            return SSEResponse(_sse(req, queue, fmt, engine), on_disconnect=lambda: engine.cancel(req))
        return await _whole_reply(request, engine, req, _collect(queue, fmt))

    from pocketlm.serve.ollama import register_ollama_routes  # here: ollama.py imports this module
    register_ollama_routes(app, engine=engine, model=model, tokenizer=tokenizer, config=config, names=names,
                           limits=limits, chat_format=chat_format, metrics=metrics, started=started)
    return app


class _Formatter:
    """Turns engine events into OpenAI chat/completions JSON (final objects and stream chunks)."""

    def __init__(self, gen: GenRequest, tokenizer, rid: str, model_name: str):
        self.gen, self.tok, self.rid, self.model = gen, tokenizer, rid, model_name
        self.created = int(time.time())
        self.chat = gen.kind == "chat"
        self.completion_tokens = 0
        self.offsets = [0] * gen.num_sequences
        self.echo: dict[int, tuple[str, dict | None]] = {}  # choice -> (prompt text, prompt logprobs)
        # with tools that may be called: each choice's reply parser (serve/tools.py), streaming deltas and calls
        self.tools = gen.tools if gen.tools is not None and gen.tools.calls_possible else None
        self.tool_replies: dict = {}
        if gen.echo:
            self.offsets = [len(gen.echo_texts[i // gen.n]) for i in range(gen.num_sequences)]

    def prompt_event(self, ev: dict) -> tuple[str, dict | None]:
        """The echo of one choice's prompt: its text and (with logprobs) the prompt tokens' logprobs object."""
        p = ev["index"] // self.gen.n
        text, ids = self.gen.echo_texts[p], self.gen.prompts[p]
        lp = None
        if self.gen.logprobs:
            scores = ev["scores"]
            assert len(scores) == len(ids) - 1, (len(scores), len(ids))
            lp = {"tokens": [self.token_str(t)[0] for t in ids],
                  "token_logprobs": [None] + [v for v, _ in scores],
                  "top_logprobs": [None] + [{self.token_str(t)[0]: x for t, x in top} or None for _, top in scores],
                  "text_offset": list(self.gen.echo_offsets[p])}
        self.echo[ev["index"]] = (text, lp)
        return text, lp

    @staticmethod
    def join_logprobs(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {k: a[k] + b[k] for k in a}

    def token_str(self, tid: int) -> tuple[str, list[int]]:
        piece = self.tok.id_to_token(tid)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            b = int(piece[3:5], 16)
            return (chr(b) if b < 0x80 else piece), [b]
        text = piece if tid in self.tok.special_ids else piece.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))

    def logprobs(self, events: list[dict]):
        """The logprobs object for one choice's token events (stop tokens left out, as OpenAI does)."""
        events = [e for e in events if "logprob" in e and e["token"] not in self.gen.stop_token_ids]
        if self.chat:
            content = []
            for e in events:
                s, b = self.token_str(e["token"])
                content.append({"token": s, "logprob": e["logprob"], "bytes": b, "top_logprobs": [
                    dict(zip(("token", "bytes"), self.token_str(t)), logprob=lp) for t, lp in e.get("top", [])]})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in events:
            out["tokens"].append(self.token_str(e["token"])[0])
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({self.token_str(t)[0]: lp for t, lp in e.get("top", [])} or None)
            out["text_offset"].append(e.get("offset", 0))
        return out

    def usage(self) -> dict:
        p = sum(len(x) for x in self.gen.prompts)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens}

    def note(self, ev: dict) -> None:
        ev["offset"] = self.offsets[ev["index"]]
        self.offsets[ev["index"]] += len(ev["text"])
        if ev["finish_reason"] is not None:
            self.completion_tokens += ev["completion_tokens"]

    def final(self, texts: dict, finish: dict, events: dict) -> dict:
        choices = []
        for i in range(self.gen.num_sequences):
            lp = self.logprobs(events.get(i, [])) if self.gen.logprobs else None
            if i in self.echo:
                texts = {**texts, i: [self.echo[i][0]] + texts.get(i, [])}
                lp = self.join_logprobs(self.echo[i][1], lp)
            if self.chat and self.tools is not None:
                from pocketlm.serve.tools import parse_reply
                message, reason = parse_reply(self.tools, "".join(texts.get(i, [])), finish.get(i))
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            elif self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": "".join(texts.get(i, []))},
                                "logprobs": lp, "finish_reason": finish.get(i)})
            else:
                choices.append({"index": i, "text": "".join(texts.get(i, [])), "logprobs": lp,
                                "finish_reason": finish.get(i)})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices, "system_fingerprint": None}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def event_choice(self, ev: dict) -> dict | None:
        """One event's stream choice; None when there is nothing to send yet (tool-call text held back)."""
        lp = self.logprobs([ev]) if self.gen.logprobs else None
        if self.chat and self.tools is not None:
            from pocketlm.serve.tools import ToolReply
            reply = self.tool_replies.setdefault(ev["index"], ToolReply(self.tools))
            delta = reply.push(ev["text"])
            reason = ev["finish_reason"]
            if reason is not None:
                held = reply.finish()
                if held:
                    delta["content"] = delta.get("content", "") + held["content"]
                reason = reply.stream_finish_reason(reason)
            if not delta and reason is None and lp is None:
                return None
            return {"index": ev["index"], "delta": delta, "logprobs": lp, "finish_reason": reason}
        if self.chat:
            return {"index": ev["index"], "delta": {"content": ev["text"]} if ev["text"] else {}, "logprobs": lp,
                    "finish_reason": ev["finish_reason"]}
        return {"index": ev["index"], "text": ev["text"], "logprobs": lp, "finish_reason": ev["finish_reason"]}


def _error_payload(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "internal_error"}}


async def _collect(queue: asyncio.Queue, fmt: _Formatter) -> dict:
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    events: dict[int, list[dict]] = {}
    while True:
        ev = await queue.get()
        if ev["type"] == "error":
            raise APIError(500, ev["message"], code="internal_error")
        if ev["type"] == "done":
            return fmt.final(texts, finish, events)
        if ev["type"] == "prompt":
            fmt.prompt_event(ev)
            continue
        fmt.note(ev)
        texts.setdefault(ev["index"], []).append(ev["text"])
        events.setdefault(ev["index"], []).append(ev)
        if ev["finish_reason"] is not None:
            finish[ev["index"]] = ev["finish_reason"]


async def _sse(req, queue: asyncio.Queue, fmt: _Formatter, engine: Engine):
    """The stream's server-sent events. The events already queued when one arrives go out in one write (the
    same `data:` messages, joined): under load the event loop falls behind the engine, and one socket write per
    token per stream is then most of its work."""
    try:
        if fmt.chat:
            yield fmt.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(fmt.gen.num_sequences)])
        while True:
            out: list[str] = []
            end = _sse_event(await queue.get(), fmt, out)
            while not end and not queue.empty():
                end = _sse_event(queue.get_nowait(), fmt, out)
            if out:
                yield "".join(out)
            if end:
                return
    finally:
        engine.cancel(req)  # no-op when finished; frees the slot when the stream was abandoned


def _sse_event(ev: dict, fmt: _Formatter, out: list[str]) -> bool:
    """Append one engine event's server-sent messages to `out`; True when it ends the stream."""
    if ev["type"] == "error":
        out.append(f"data: {json.dumps(_error_payload(ev['message']))}\n\n")
        return True
    if ev["type"] == "done":
        if fmt.gen.include_usage:
            out.append(fmt.chunk([], usage=fmt.usage()))
        out.append("data: [DONE]\n\n")
        return True
    if ev["type"] == "prompt":
        text, lp = fmt.prompt_event(ev)
        out.append(fmt.chunk([{"index": ev["index"], "text": text, "logprobs": lp, "finish_reason": None}]))
        return False
    fmt.note(ev)
    if ev["text"] or ev["finish_reason"] is not None or (fmt.gen.logprobs and "logprob" in ev):
        choice = fmt.event_choice(ev)
        if choice is not None:
            out.append(fmt.chunk([choice]))
    return False


_TIMED_OUT = "pocketlm.body_timed_out"  # scope key: GuardedH11Protocol cut this request's body off
_LINGER_S = 1.0  # after a refusal: how long the server reads (and drops) what the client still sends
_OVER_CAP_LINGER_S = 0.2  # shorter past the connection cap: there, file descriptors are what is scarce
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; beyond, 400 (h11's own default, stated here)


def _raw_response(err: APIError) -> bytes:
    """`err` as a complete HTTP/1.1 response that closes the connection (written around h11, which is abandoned)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    head = [f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}".encode()]
    head += [k + b": " + v for k, v in _with_security_headers(headers)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the timeouts and the connection cap that uvicorn does not have.

    uvicorn only times out idle kept-alive connections, so a client that sends half a request line and stalls
    (or trickles a byte a second) holds its connection, and its file descriptor, for ever; a few hundred of them
    exhaust `ulimit -n` and stop the service. Here:
    - the request line and headers must arrive within `header_timeout` seconds of the connection opening (or of
      the first byte of the next request on a kept-alive connection), else 408; an idle connection that never
      sent a byte is just closed;
    - the body must arrive within `body_timeout` seconds of its headers, else 408, and the app sees a disconnect
      (its slot is never taken: the body is read before generation starts);
    - a connection beyond `max_connections` open ones is answered 503 with Retry-After at once.
    Refusals are the OpenAI error envelope written around h11 (the connection is closing anyway), then a
    half-close, and what the client still sends is read and dropped for up to _LINGER_S seconds
    (_OVER_CAP_LINGER_S past the cap), so it reads the answer rather than a connection reset. `settings` is set
    per server by `protocol_class`.
    """

    settings = ServerConfig(max_connections=256)
    over_cap_log = _Throttled(logging.WARNING)  # one per server: a flood of refusals must not flood the log

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "head" or "body" while a deadline runs
        self._head_started = False  # some bytes of the awaited request head have arrived
        self._refused = False  # an error was written: input is dropped until the connection closes
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            self.connections.discard(self)  # not served: does not count, and shutdown need not wait for it
            self.over_cap_log("%s: over the cap of %d open connections; answered 503", self._peer(),
                              self.settings.max_connections)
            self._refuse(APIError(503, f"the server has {self.settings.max_connections} open connections, its "
                                       "limit (--max-connections); retry shortly", code="server_overloaded",
                                  headers={"Retry-After": "1"}), linger=_OVER_CAP_LINGER_S)
            return
        self._arm("head")

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._phase is None and (self.cycle is None or self.cycle.response_complete):
            self._arm("head")  # the first bytes of the next request on a kept-alive connection
        if self._phase == "head":
            self._head_started = True
        before = self.cycle
        super().data_received(data)
        self._follow(before)

    def on_response_complete(self) -> None:
        if self._phase == "body":  # answered before the whole body came (413, 415, ...): no body deadline left
            self._disarm()
        before = self.cycle
        super().on_response_complete()
        self._follow(before)  # a pipelined request may have started
        if (self._phase is None and self.cycle is before and self.conn.trailing_data[0]
                and not self.transport.is_closing()):  # part of a pipelined request head is waiting: time it
            self._unset_keepalive_if_required()
            self._arm("head")
            self._head_started = True

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request (or its head is over MAX_HEAD_BYTES): 400 in the OpenAI envelope."""
        self._refuse(APIError(400, f"{msg} (malformed HTTP, or request headers over {MAX_HEAD_BYTES} bytes)"))

    def _follow(self, before) -> None:
        """Move the deadline along with the request h11 is reading: head, then body, then none."""
        cycle = self.cycle
        if self._refused or cycle is None:
            return
        if cycle is not before:  # a request head was parsed
            self._disarm()
            if cycle.more_body and not cycle.response_complete:
                self._arm("body")
        elif self._phase == "body" and not cycle.more_body:
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        seconds = self.settings.header_timeout if phase == "head" else self.settings.body_timeout
        self._phase, self._head_started = phase, False
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self) -> None:
        phase, started = self._phase, self._head_started
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        if phase == "head":
            if not started:  # nothing of a request arrived: an idle connection, nobody to answer
                self.transport.close()
                return
            seconds = self.settings.header_timeout
            what = "request headers"
        else:
            seconds = self.settings.body_timeout
            what = "request body"
            cycle = self.cycle
            if cycle is not None:  # the app's receive() now returns http.disconnect; its answer is dropped
                cycle.scope[_TIMED_OUT] = True
                answered = cycle.response_started
                cycle.disconnected = True
                cycle.message_event.set()
                if answered:
                    self.transport.close()
                    return
        log.info("%s: the %s did not arrive within %g s; answered 408", self._peer(), what, seconds)
        self._refuse(APIError(408, f"the {what} did not arrive within {seconds:g} s", code="request_timeout"))

    def _refuse(self, err: APIError, linger: float = _LINGER_S) -> None:
        """Write `err`, half-close, and drop input until the client closes or `linger` seconds pass."""
        self._refused = True
        self._disarm()
        self.transport.write(_raw_response(err))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()  # keep reading (and dropping), so closing sends no reset
        self._linger = self.loop.call_later(linger, self.transport.close)

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"


def protocol_class(config: ServerConfig) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol with `config`'s timeouts and connection cap (uvicorn builds one per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"settings": config, "over_cap_log": _Throttled(logging.WARNING)})


def uvicorn_options(config: ServerConfig) -> dict:
    """The uvicorn.run / uvicorn.Config options that apply `config`'s connection limits."""
    return {"http": protocol_class(config), "ws": "none", "timeout_keep_alive": config.keep_alive_timeout,
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES}


class BackgroundServer:
    """Run an app under uvicorn in a thread on 127.0.0.1 and a free port (tests, benchmarks).

    `with BackgroundServer(app) as srv: srv.url` ; stops the server (and the app's engine) on exit.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = getattr(app.state, "config", None) or ServerConfig(max_connections=default_max_connections())
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=2, **uvicorn_options(config)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start within 30 s")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
