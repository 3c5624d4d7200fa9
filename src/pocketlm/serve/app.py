"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) in front of the batching engine.

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming as SSE ending in `data: [DONE]`, or
not), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text), GET / (the chat page).

Robustness (RELIABILITY.md §3, §6 items 13-17):
- Every error is the OpenAI envelope with the right status (errors.py); FastAPI's 422 and Starlette's plain
  404/405 bodies are replaced; an unexpected exception is a 500 with a request id and no traceback.
- Body limit: a Content-Length above `max_body_bytes` is answered 413 before the body is read; a chunked body
  is counted while read and refused at the limit, before JSON parsing or tokenization.
- `--api-key`: /v1/* and /metrics need `Authorization: Bearer KEY` (constant-time compare), else 401. The page
  and /health stay open (the page asks for the key). No CORS headers are sent: only same-origin pages may call.
- Backpressure: past `max_slots` running and `max_queue` waiting sequences, 429 with `Retry-After: 1` (chosen
  over uvicorn's 503 because the openai clients honour Retry-After on 429).
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
import json
import logging
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

from pocketlm.errors import ConfigError
from pocketlm.serve.batching import Engine, fix_longrope_policy
from pocketlm.serve.errors import APIError
from pocketlm.serve.metrics import Metrics
from pocketlm.serve.schemas import GenRequest, Limits, parse_request

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


def _envelope(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _Guard:
    """Outermost ASGI layer: 413 on a declared oversize body, 401 without the API key, status metrics."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                    "/metrics", "/") else "other"
        status_seen = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        err = self._check(scope, path)
        try:
            if err is not None:
                await _envelope(err)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(endpoint, status_seen.get("status", 499))

    def _check(self, scope, path: str) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
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
        return None


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
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
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
    if config.max_n > config.max_slots:
        config.max_n = config.max_slots  # a request must fit the slots at once
    policy = fix_longrope_policy(model, ctx)
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_slots=config.max_slots, max_queue=config.max_queue, context_length=ctx,
                    metrics=metrics)
    limits = Limits(max_n=config.max_n, context_length=ctx)
    names = [config.model_name] + list(config.aliases)
    chat_format = config.chat_format or model.config.chat_format
    started = int(time.time())
    page = resources.files("pocketlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    async def lifespan(app):
        yield
        engine.shutdown()

    app = FastAPI(title="pocketlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.state.longrope_policy = policy
    app.add_middleware(_Guard, config=config, metrics=metrics)

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

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        rid = uuid.uuid4().hex[:12]
        log.exception("unhandled error, request id %s", rid)
        return _envelope(APIError(500, f"internal server error (request id {rid})", code="internal_error"))

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; script-src 'self' "
                                           "'unsafe-inline'; style-src 'self' 'unsafe-inline'"})

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
        return parse_request(body, kind, tokenizer=tokenizer, model_names=names, limits=limits,
                             vocab_size=model.config.vocab_size, chat_format=chat_format)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, config.max_body_bytes)
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
        consumer = asyncio.ensure_future(_collect(queue, fmt))
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
            if self.chat:
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

    def event_choice(self, ev: dict) -> dict:
        lp = self.logprobs([ev]) if self.gen.logprobs else None
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
    try:
        if fmt.chat:
            yield fmt.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(fmt.gen.num_sequences)])
        while True:
            ev = await queue.get()
            if ev["type"] == "error":
                yield f"data: {json.dumps(_error_payload(ev['message']))}\n\n"
                return
            if ev["type"] == "done":
                if fmt.gen.include_usage:
                    yield fmt.chunk([], usage=fmt.usage())
                yield "data: [DONE]\n\n"
                return
            if ev["type"] == "prompt":
                text, lp = fmt.prompt_event(ev)
                yield fmt.chunk([{"index": ev["index"], "text": text, "logprobs": lp, "finish_reason": None}])
                continue
            fmt.note(ev)
            if ev["text"] or ev["finish_reason"] is not None or (fmt.gen.logprobs and "logprob" in ev):
                yield fmt.chunk([fmt.event_choice(ev)])
    finally:
        engine.cancel(req)  # no-op when finished; frees the slot when the stream was abandoned


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
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=2))
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
