"""`/v1/chat/completions` requests that carry images (OpenAI `image_url` content parts), for a phi-3.5-vision model.

Images come as base64 `data:` URLs. Local paths are read only when the server was started with
`--image-dir DIR`, and only inside DIR (symlinks resolved); http(s) and every other URL scheme are refused: the
server never fetches anything from the network. Sampling settings, the model name and the body's shape go through
the ordinary request parser (`schemas.parse_request`) on the text of the messages; options the image path does not
support (n > 1, logprobs, response_format, tools) get a 400. Requests with images run one at a time, each in a
worker thread, outside the batching engine (vision.py's loop prefills the image features, then decodes).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pocketlm.errors import ChatFormatError, GenerationError, ImageError, PocketLMError
from pocketlm.serve.errors import APIError

_LOCK = threading.Lock()  # one image request at a time: the tower's activations are large on the real model
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")


def has_images(body) -> bool:
    """True when a chat body's messages hold an `image_url` content part."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
               for m in body["messages"])


def _bad(message: str, param: str | None = "messages", code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _check_sources(sources: list, image_dir) -> None:
    for k, src in enumerate(sources, 1):
        if src.startswith("data:"):
            continue
        if _SCHEME.match(src) and not re.match(r"[a-zA-Z]:[\\/]", src):
            raise _bad(f"image {k}: {src[:60]!r}: only data: URLs (and, with `pocketlm serve --image-dir`, local "
                       "paths inside that directory) are accepted; the server never fetches URLs", code="invalid_image")
        if image_dir is None:
            raise _bad(f"image {k}: local image paths are refused: start the server with --image-dir DIR to allow "
                       "paths inside DIR, or send a data: URL", code="invalid_image")


async def chat_with_images(request: Request, body: dict, *, model, tokenizer, config, parse, chat_format):
    """Answer a chat completion whose messages hold images (see the module doc)."""
    from pocketlm import vision
    if not isinstance(model, vision.Phi3VForCausalLM):
        raise _bad(f"the model '{config.model_name}' reads text only; image_url parts need a vision model "
                   "(phi-3.5-vision)", code="images_not_supported")
    for key, ok in (("n", lambda v: v in (None, 1)), ("logprobs", lambda v: not v),
                    ("response_format", lambda v: v is None), ("tools", lambda v: not v)):
        if not ok(body.get(key)):
            raise _bad(f"'{key}' is not supported together with images", key)
    given = [dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m
             for m in body["messages"]]
    try:
        messages, sources = vision.split_image_parts(given)
    except ChatFormatError as e:
        raise _bad(str(e)) from None
    _check_sources(sources, config.image_dir)
    gen = await anyio.to_thread.run_sync(parse, dict(body, messages=messages), "chat")  # settings, model name
    params = gen.params[0]
    stats = vision.ImageStats()

    def events():
        return vision.stream_events(model, tokenizer, given, chat_format=chat_format, params=params,
                                    allowed_dir=config.image_dir, stats=stats)

    rid = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    if gen.stream:
        try:  # images decoded and encoded before the stream starts, so a bad one is a 400, not an error event
            it = await anyio.to_thread.run_sync(_locked, events)
        except PocketLMError as e:  # bad images, tags, messages
            raise _bad(str(e), code="invalid_image" if isinstance(e, ImageError) else None) from None
        return _stream(request, it, rid, created, gen)

    def run_all():
        from pocketlm.engine.generate import GenerationResult
        with _LOCK:
            for ev in events():
                if isinstance(ev, GenerationResult):
                    return ev
        raise AssertionError("stream_events ends with a GenerationResult")

    try:
        result = await anyio.to_thread.run_sync(run_all)
    except PocketLMError as e:  # bad images, tags, messages
        raise _bad(str(e), code="invalid_image" if isinstance(e, ImageError) else None) from None
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": gen.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                     "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "total_tokens": result.prompt_tokens + result.completion_tokens}})


def _locked(fn):
    with _LOCK:
        return fn()


def _stream(request: Request, it, rid: str, created: int, gen) -> Response:
    """Server-sent chat.completion.chunk events; the generation thread stops when the client goes away."""
    from pocketlm.engine.generate import GenerationResult
    from pocketlm.serve.app import SSEResponse
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def produce():
        try:
            with _LOCK:
                for ev in it:  # the tokens (the images are already encoded)
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
                    if cancelled.is_set():
                        it.close()
                        return
        except Exception as e:  # reported to the client as an error event
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    def chunk(delta: dict, finish: str | None, usage: dict | None = None) -> str:
        d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": gen.model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None
             else []}
        if usage is not None:
            d["usage"] = usage
        return f"data: {json.dumps(d)}\n\n"

    async def sse():
        loop.run_in_executor(None, produce)
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                ev = await queue.get()
                if ev is None:
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(ev, Exception):
                    kind = "invalid_image" if isinstance(ev, ImageError) else "invalid_request_error"
                    msg = str(ev) if isinstance(ev, (ImageError, GenerationError)) else "internal error"
                    yield f"data: {json.dumps({'error': {'message': msg, 'type': kind}})}\n\n"
                    continue
                if isinstance(ev, GenerationResult):
                    yield chunk({}, ev.finish_reason)
                    if gen.include_usage:
                        yield chunk(None, None, {"prompt_tokens": ev.prompt_tokens,
                                                 "completion_tokens": ev.completion_tokens,
                                                 "total_tokens": ev.prompt_tokens + ev.completion_tokens})
                    continue
                yield chunk({"content": ev}, None)
        finally:
            cancelled.set()

    return SSEResponse(sse(), on_disconnect=cancelled.set)
