"""The Ollama REST API beside the OpenAI one, for the tools and UIs that speak Ollama.

Routes (https://github.com/ollama/ollama/blob/main/docs/api.md): POST /api/chat, POST /api/generate (streamed as
NDJSON, one JSON object a line, unless `"stream": false`), GET /api/tags, POST /api/show, GET /api/ps,
GET /api/version, and HEAD / (the clients' liveness probe); any other /api/ path answers Ollama's error shape
(404, or 405 for a served path).

How a request is served: its Ollama fields are checked here (types, with Ollama's names in the messages), then
turned into the equivalent OpenAI body and validated by the very same `schemas.parse_request` the /v1 routes use,
with the Modelfile's defaults applied by `store.defaults.apply_to_request`. The resulting `GenRequest` goes to the
same `Engine` (continuous batching), so a greedy /api/chat reply is the /v1/chat/completions reply token for token,
and every bound, 429 on a full engine, and disconnect handling is shared. A dropped stream is freed by the same
`SSEResponse` race against `http.disconnect` (the NDJSON response is a subclass); a dropped non-streamed request
by the same watcher as app.py's.

Mapping:
- /api/chat `messages` ({role, content}) -> chat messages; `images`, `think: true` and `logprobs` are refused
  with 400 (the model has no such capability here) rather than silently dropped.
- /api/chat `tools` (OpenAI's function tools) -> the OpenAI `tools` with tool_choice "auto" (serve/tools.py: the
  prompt format and the constraint); a reply that calls tools has `message.tool_calls` = [{"function": {"name",
  "arguments": {...}}}] and empty content (streamed: one line per complete call). Assistant messages with
  `tool_calls` and `tool` messages (`tool_name`, else the n-th result answers the n-th call) are rendered back.
- /api/generate: `prompt` (+ `system`, else the Modelfile's SYSTEM) is rendered as one user turn of the model's chat
  format, exactly like a one-message /api/chat; `raw: true` tokenizes `prompt` as it is (no template). `context`
  (the ids a previous reply returned) is prepended as token ids. Both stop at the chat format's end tokens.
  The final object carries `context` = prompt ids + generated ids. `suffix` and `template` are refused.
- An empty `messages` / `prompt` is Ollama's "load the model" call: an immediate `done_reason: "load"` reply
  (`"unload"` with `keep_alive: 0`); the model stays loaded either way.
- options: temperature, top_k, top_p, min_p, repeat_penalty (-> repetition_penalty over the whole context),
  presence_penalty, frequency_penalty, seed, stop, num_predict (-1 / -2 = up to the context), num_ctx (a smaller
  context for this request; above the served context it is capped to it, since the engine's context is fixed at
  start). Load-time knobs (num_gpu, num_thread, use_mmap, ...) are type-checked and ignored; sampling features
  pocketlm lacks (mirostat, tfs_z, typical_p, repeat_last_n other than -1, penalize_newline false) are refused
  when set to a non-neutral value; unknown options are ignored with a log line, as Ollama does. Defaults are the
  Modelfile's parameters, else the server's (the same as /v1: temperature 1, no top-k/top-p), not Ollama's
  built-in 0.8/40/0.9/1.1, so both APIs sample a model the same way.
- `format: "json"` -> the JSON-object constraint of `response_format: json_object`; a JSON-schema object ->
  `json_schema` (JSON Schema as serve/grammar.py enforces it; an unenforceable schema is a 400). `keep_alive` is accepted (number or duration string) and
  ignored: the model is always loaded.
- Durations are nanoseconds: load_duration = request parsing and tokenization, prompt_eval_duration = submit to
  first token (queueing included), eval_duration = first token to the last, total_duration = all.
- Errors: `{"error": "message"}` with 400 (bad input), 401 (with --api-key, every /api/ route but /api/version
  needs `Authorization: Bearer KEY`), 404 `model "x" not found, try pulling it first`, 429 + Retry-After (engine
  full), 500. Mid-stream failures are an `{"error": ...}` line. The Host/Content-Type/size checks in front of
  every route (app.py's _Guard) answer /api/* in this shape too; only the connection-level 408/503/400 (sent
  before a request is parsed, so before its path is known) keep the OpenAI envelope.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from pocketlm import __version__, chat
from pocketlm.serve.app import SSEResponse, ServerConfig, _read_json, _whole_reply
from pocketlm.serve.batching import Engine
from pocketlm.serve.errors import APIError, bad_request
from pocketlm.serve.metrics import Metrics
from pocketlm.serve.schemas import GenRequest, Limits, _is_int, _is_num, _type_name, parse_request
from pocketlm.serve.tools import ToolReply

log = logging.getLogger("pocketlm.serve")

# The Ollama API level these routes follow (clients compare /api/version against minimums they need).
OLLAMA_API_VERSION = "0.6.4"
ROUTES = {"/api/chat": "POST", "/api/generate": "POST", "/api/tags": "GET", "/api/show": "POST",
          "/api/ps": "GET", "/api/version": "GET"}

# option -> (kind, OpenAI body field or None when accepted and ignored)
_MAPPED = {"temperature": ("number", "temperature"), "top_k": ("int", "top_k"), "top_p": ("number", "top_p"),
           "min_p": ("number", "min_p"), "repeat_penalty": ("number", "repetition_penalty"),
           "presence_penalty": ("number", "presence_penalty"),
           "frequency_penalty": ("number", "frequency_penalty"), "seed": ("int", "seed"),
           "stop": ("stop", "stop"), "num_predict": ("int", "max_tokens"), "num_ctx": ("int", None)}
_IGNORED = {"numa": "bool", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "low_vram": "bool",
            "f16_kv": "bool", "logits_all": "bool", "vocab_only": "bool", "use_mmap": "bool", "use_mlock": "bool",
            "embedding_only": "bool", "num_thread": "int", "num_keep": "int"}
# sampling features pocketlm does not have: accepted only at the value that turns them off
_NEUTRAL = {"mirostat": ("int", (0,)), "mirostat_tau": ("number", None), "mirostat_eta": ("number", None),
            "tfs_z": ("number", (1,)), "typical_p": ("number", (1,)), "repeat_last_n": ("int", (-1,)),
            "penalize_newline": ("bool", (True,))}
# OpenAI names in parse_request's messages -> the Ollama names the client sent
_RENAMES = {"'max_tokens'": "'num_predict'", "max_tokens": "num_predict", "'repetition_penalty'": "'repeat_penalty'",
            "'response_format": "'format"}


def not_found(model: str) -> APIError:
    return APIError(404, f'model "{model[:100]}" not found, try pulling it first')


def _now_iso(t: float | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama's created_at ("2024-01-01T12:00:00.123456Z")."""
    d = dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc)
    return d.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _check_kind(name: str, value, kind: str, where: str = "option") -> None:
    ok = {"int": _is_int(value), "number": _is_num(value), "bool": isinstance(value, bool),
          "string": isinstance(value, str),
          "stop": isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))}[kind]
    if not ok:
        want = {"int": "an integer", "number": "a finite number", "bool": "a boolean", "string": "a string",
                "stop": "a string or a list of strings"}[kind]
        raise bad_request(f'{where} "{name}" must be {want}, got {_type_name(value)} {value!r:.60}')


def options_to_body(options, modelfile: dict | None) -> tuple[dict, int | None]:
    """Ollama `options` -> (OpenAI body fields, num_ctx or None); 400 on a wrong type or an unsupported value."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad_request(f'"options" must be an object, got {_type_name(options)}')
    out: dict = {}
    num_ctx = None
    for name, value in options.items():
        if value is None:
            continue
        if name in _MAPPED:
            kind, field = _MAPPED[name]
            _check_kind(name, value, kind)
            if name == "num_ctx":
                if value < 1:
                    raise bad_request(f'option "num_ctx" must be >= 1, got {value}')
                num_ctx = value
            elif name == "num_predict":
                if value == 0 or value < -2:
                    raise bad_request(f'option "num_predict" must be >= 1, or -1 / -2 for up to the context, '
                                      f"got {value}")
                if value > 0:
                    out[field] = value
            else:
                out[field] = value
        elif name in _IGNORED:
            _check_kind(name, value, _IGNORED[name])
        elif name in _NEUTRAL:
            kind, neutral = _NEUTRAL[name]
            _check_kind(name, value, kind)
            if neutral is not None and value not in neutral:
                raise bad_request(f'option "{name}" {value!r} is not supported by pocketlm (only {neutral[0]!r}, '
                                  "which turns it off)")
        else:
            log.info("ignoring unknown Ollama option %r", name[:60])
    if num_ctx is None and modelfile:
        mf_ctx = (modelfile.get("parameters") or {}).get("num_ctx")
        num_ctx = mf_ctx if _is_int(mf_ctx) and mf_ctx >= 1 else None
    return out, num_ctx


def format_to_body(fmt) -> dict | None:
    """Ollama `format` ("json", a JSON schema object, "" or absent) -> an OpenAI `response_format`."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise bad_request(f'"format" must be "json" or a JSON schema object, got {_type_name(fmt)} {fmt!r:.60}')


def _opt_str(body: dict, name: str) -> str:
    v = body.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise bad_request(f'"{name}" must be a string, got {_type_name(v)} {v!r:.60}')
    return v


def _opt_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f'"{name}" must be a boolean, got {_type_name(v)} {v!r:.60}')
    return v


def _refuse_features(body: dict, model: str) -> None:
    """Fields naming capabilities this model does not have: a 400 rather than a reply that ignores them."""
    if body.get("images"):
        raise bad_request(f'"{model[:100]}" does not support images')
    think = body.get("think")
    if think not in (None, False):
        raise bad_request(f'"{model[:100]}" does not support thinking')
    if body.get("logprobs"):
        raise bad_request('"logprobs" is not supported on the Ollama API of pocketlm; use /v1/chat/completions')
    if _opt_str(body, "suffix"):
        raise bad_request('"suffix" (fill-in-the-middle) is not supported by this model')
    if _opt_str(body, "template"):
        raise bad_request('"template" is not supported: pocketlm renders prompts with the model\'s chat format')
    ka = body.get("keep_alive")
    if ka is not None and not (_is_num(ka) or isinstance(ka, str)):
        raise bad_request(f'"keep_alive" must be a number of seconds or a duration string, got {_type_name(ka)}')


def _chat_messages(messages) -> list[dict]:
    """Ollama messages -> {role, content} dicts (chat.parse_messages then checks roles and content)."""
    if not isinstance(messages, list):
        raise bad_request(f'"messages" must be a list, got {_type_name(messages)}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object, got {_type_name(m)}")
        if m.get("images"):
            raise bad_request(f"messages[{i}] has images; this model does not support images")
        msg = {"role": m.get("role"), "content": "" if m.get("content") is None else m.get("content")}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise bad_request(f"messages[{i}].tool_calls must be a list, got {_type_name(calls)}")
            msg["tool_calls"] = [_openai_call(c, i, j) for j, c in enumerate(calls)]
        name = m.get("tool_name", m.get("name"))
        if m.get("role") == "tool" and isinstance(name, str) and name:
            msg["name"] = name
        out.append(msg)
    return out


def _openai_call(call, i: int, j: int) -> dict:
    """An Ollama tool call {"function": {"name", "arguments": {...}}} -> the OpenAI shape (arguments as JSON text)."""
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("arguments", {}), dict):
        raise bad_request(f'messages[{i}].tool_calls[{j}] must be {{"function": {{"name": ..., "arguments": '
                          f"{{...}}}}}}, got {call!r:.80}")
    return {"type": "function", "function": {"name": f.get("name"), "arguments": json.dumps(f.get("arguments", {}))}}


def _ollama_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls (serve/tools.py ToolReply.calls) -> Ollama's tool_calls (arguments as an object)."""
    return [{"function": {"name": c["name"], "arguments": json.loads(c["arguments"])}} for c in calls]


def _rename(err: APIError) -> APIError:
    """parse_request's message with the Ollama names of the fields (num_predict, repeat_penalty, format)."""
    msg = err.message
    for a, b in _RENAMES.items():
        msg = msg.replace(a, b)
    err.message = msg
    return err


@dataclasses.dataclass
class _Prepared:
    gen: GenRequest
    model: str  # as the client named it
    setup_s: float  # parsing + tokenizing


class _Reply:
    """Engine events -> Ollama objects (stream lines and the final object) for /api/chat or /api/generate."""

    def __init__(self, kind: str, prep: _Prepared, t_start: float):
        self.kind, self.model, self.gen, self.setup_s, self.t_start = kind, prep.model, prep.gen, prep.setup_s, t_start
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.done_reason: str | None = None
        tools = prep.gen.tools
        self.tools = tools if kind == "chat" and tools is not None and tools.calls_possible else None
        self.parser = ToolReply(self.tools) if self.tools is not None else None  # the streamed reply's calls
        self.sent_calls = 0

    def stream_pieces(self, text: str) -> list[dict]:
        """The stream lines for one token's text: the text, or (with tools) text once it cannot start a call,
        and one line per call once it is complete."""
        if self.parser is None:
            return [self.piece(text)] if text else []
        out = []
        delta = self.parser.push(text)
        if delta.get("content"):
            out.append(self.piece(delta["content"]))
        done = self.parser.complete_calls
        if len(done) > self.sent_calls:
            obj = self.piece("")
            obj["message"]["tool_calls"] = _ollama_calls(done[self.sent_calls:])
            self.sent_calls = len(done)
            out.append(obj)
        return out

    def piece(self, text: str) -> dict:
        obj = {"model": self.model, "created_at": _now_iso()}
        if self.kind == "chat":
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = False
        return obj

    def note(self, ev: dict) -> None:
        self.tokens.append(ev["token"])
        self.text.append(ev["text"])
        if ev["finish_reason"] is not None:
            self.done_reason = ev["finish_reason"]

    def final(self, req, text: str) -> dict:
        """The last object: `done: true`, the reason and the counts and durations (ns)."""
        end = time.perf_counter()
        first = req.t_first if req.t_first is not None else end
        obj = self.piece(text)
        if self.parser is not None and self.parser.text:  # streamed: the text held back while it could be a call
            obj["message"]["content"] = self.parser.finish().get("content", "")
        elif self.tools is not None:
            whole = ToolReply(self.tools)
            whole.push(text)
            if whole.is_call_reply():
                obj["message"] = {"role": "assistant", "content": "", "tool_calls": _ollama_calls(whole.calls)}
        obj["done"] = True
        obj["done_reason"] = self.done_reason or "stop"
        if self.kind == "generate":
            obj["context"] = list(self.gen.prompts[0]) + self.tokens
        obj.update(total_duration=_ns(end - self.t_start), load_duration=_ns(self.setup_s),
                   prompt_eval_count=len(self.gen.prompts[0]), prompt_eval_duration=_ns(first - req.t_submit),
                   eval_count=len(self.tokens), eval_duration=_ns(end - first))
        return obj


class NDJSONResponse(SSEResponse):
    """SSEResponse's disconnect-aware streaming with `application/x-ndjson` lines."""

    def __init__(self, events, on_disconnect):
        StreamingResponse.__init__(self, events, media_type="application/x-ndjson",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_disconnect = on_disconnect


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _ndjson(req, queue: asyncio.Queue, reply: _Reply, engine: Engine):
    try:
        while True:
            ev = await queue.get()
            if ev["type"] == "error":
                yield _line({"error": ev["message"]})
                return
            if ev["type"] == "done":
                yield _line(reply.final(req, ""))
                return
            if ev["type"] != "token":
                continue
            reply.note(ev)
            for obj in reply.stream_pieces(ev["text"]):
                yield _line(obj)
    finally:
        engine.cancel(req)  # no-op when finished; frees the slot when the stream was abandoned


async def _collect(req, queue: asyncio.Queue, reply: _Reply) -> dict:
    while True:
        ev = await queue.get()
        if ev["type"] == "error":
            raise APIError(500, ev["message"])
        if ev["type"] == "done":
            return reply.final(req, "".join(reply.text))
        if ev["type"] == "token":
            reply.note(ev)


def _ollama_errors(config: ServerConfig, *, auth: bool = True):
    """Route decorator: APIError -> `{"error": message}` with its status; the API key check; 500 with a request id."""
    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(request: Request):
            try:
                if auth and config.api_key:
                    header = request.headers.get("authorization", "")
                    given = header[7:] if header[:7].lower() == "bearer " else ""
                    if not hmac.compare_digest(given.encode("utf-8", "replace"), config.api_key.encode()):
                        raise APIError(401, "unauthorized: send 'Authorization: Bearer <key>' (the server's "
                                            "--api-key)")
                return await fn(request)
            except APIError as e:
                return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
            except ClientDisconnect:
                raise
            except Exception:
                rid = uuid.uuid4().hex[:12]
                log.exception("unhandled error in %s, request id %s", request.url.path[:100], rid)
                return JSONResponse({"error": f"internal server error (request id {rid})"}, status_code=500)
        return wrapper
    return deco


def _parameter_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def _quantization(model) -> str:
    from pocketlm.quant.linear import QuantizedLinear
    types = sorted({m.type_name.upper() for m in model.modules() if isinstance(m, QuantizedLinear)})
    if types:
        return ", ".join(types)
    p = next(model.parameters())
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(str(p.dtype).replace("torch.", ""),
                                                                        str(p.dtype))


class _Card:
    """What /api/tags, /api/show and /api/ps say about the served model (computed once)."""

    def __init__(self, model, config: ServerConfig, context_length: int, started: float):
        c = model.config
        self.n_params = c.num_parameters()
        seen, size = set(), 0
        for t in list(model.parameters()) + list(model.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                size += t.untyped_storage().nbytes()
        self.size = size
        self.quant = _quantization(model)
        self.context_length = context_length
        self.modified = _now_iso(started)
        src = str((config.modelfile or {}).get("from") or "")
        self.details = {"parent_model": "", "format": "gguf" if src.endswith(".gguf") else "safetensors",
                        "family": "phi3", "families": ["phi3"], "parameter_size": _parameter_size(self.n_params),
                        "quantization_level": self.quant}
        fingerprint = json.dumps({"config": c.to_dict(), "quant": self.quant}, sort_keys=True, default=str)
        self.digest = hashlib.sha256(fingerprint.encode()).hexdigest()
        self.info = {"general.architecture": "phi3", "general.parameter_count": self.n_params,
                     "general.quantization": self.quant, "phi3.context_length": context_length,
                     "phi3.embedding_length": c.hidden_size, "phi3.feed_forward_length": c.intermediate_size,
                     "phi3.block_count": c.num_hidden_layers, "phi3.attention.head_count": c.num_attention_heads,
                     "phi3.attention.head_count_kv": c.num_key_value_heads, "phi3.vocab_size": c.vocab_size,
                     "phi3.rope.freq_base": c.rope_theta, "phi3.attention.sliding_window": c.sliding_window}
        self.device = next(model.parameters()).device.type

    def entry(self, name: str) -> dict:
        return {"name": name, "model": name, "modified_at": self.modified, "size": self.size, "digest": self.digest,
                "details": self.details}


def _listed(name: str) -> str:
    return name if ":" in name else name + ":latest"


def register_ollama_routes(app: FastAPI, *, engine: Engine, model, tokenizer, config: ServerConfig,
                           names: list[str], limits: Limits, chat_format: str | None, metrics: Metrics,
                           started: float | None = None) -> None:
    """Mount the Ollama API routes on `app`, serving through `engine` with the /v1 routes' validation."""
    from pocketlm.store.defaults import apply_to_request

    card = _Card(model, config, limits.context_length, started or time.time())
    guarded = _ollama_errors(config)
    chat_stops = frozenset(chat.stop_token_ids(tokenizer)) | {tokenizer.eos_id}
    vocab = len(tokenizer)

    def resolve(body) -> str:
        """The served name the request's `model` means ("name", "name:latest"), else 404; 400 when missing."""
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
        m = body.get("model", body.get("name"))
        if m is None or m == "":
            raise bad_request("model is required")
        if not isinstance(m, str):
            raise bad_request(f'"model" must be a string, got {_type_name(m)}')
        for cand in (m, m.removesuffix(":latest"), m + ":latest"):
            if cand in names:
                return cand
        raise not_found(m)

    def prepare(body: dict, kind: str, served: str) -> _Prepared:
        """Validate an /api/chat or /api/generate body and build its GenRequest (runs off the event loop)."""
        t0 = time.perf_counter()
        opts, num_ctx = options_to_body(body.get("options"), config.modelfile)
        fields = dict(opts, model=served)
        rf = format_to_body(body.get("format"))
        if rf is not None:
            fields["response_format"] = rf
        if kind == "chat" and body.get("tools") is not None:
            fields["tools"] = body["tools"]  # validated (400 naming the bad part) by parse_request
        lim = Limits(max_n=1, context_length=min(num_ctx or limits.context_length, limits.context_length))
        if kind == "chat":
            oa = apply_to_request(dict(fields, messages=_chat_messages(body.get("messages"))), "chat",
                                  config.modelfile)
            gen = _parse(oa, "chat", lim)
        else:
            gen = generate_request(body, fields, lim)
        return _Prepared(gen, body["model"] if isinstance(body.get("model"), str) else served,
                         time.perf_counter() - t0)

    def _parse(oa: dict, kind: str, lim: Limits) -> GenRequest:
        try:
            return parse_request(oa, kind, tokenizer=tokenizer, model_names=names, limits=lim,
                                 vocab_size=model.config.vocab_size, chat_format=chat_format)
        except APIError as e:
            raise _rename(e) from None

    def generate_request(body: dict, fields: dict, lim: Limits) -> GenRequest:
        prompt, system = _opt_str(body, "prompt"), _opt_str(body, "system")
        raw = _opt_bool(body, "raw", False)
        context = body.get("context") or []
        if not isinstance(context, list) or not all(_is_int(i) and 0 <= i < vocab for i in context):
            raise bad_request(f'"context" must be a list of token ids in [0, {vocab}) from an earlier reply')
        if raw:
            oa = apply_to_request(fields, "completion", config.modelfile)
            if context:
                ids = context + tokenizer.encode(prompt, add_bos=False)
                gen = _parse(dict(oa, prompt=ids), "completion", lim)
            else:
                gen = _parse(dict(oa, prompt=prompt), "completion", lim)
            return dataclasses.replace(gen, stop_token_ids=gen.stop_token_ids | chat_stops)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        oa = apply_to_request(dict(fields, messages=messages), "chat", config.modelfile)
        if not context:
            return _parse(oa, "chat", lim)
        turn = _parse(oa, "chat", lim).prompts[0]  # the rendered turn, validated like a chat request
        if turn and turn[0] == tokenizer.bos_id:
            turn = turn[1:]
        oa = {k: v for k, v in oa.items() if k != "messages"}
        gen = _parse(dict(oa, prompt=context + turn), "completion", lim)
        return dataclasses.replace(gen, stop_token_ids=chat_stops)

    def load_reply(kind: str, model_name: str, body: dict) -> dict:
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
        obj = {"model": model_name, "created_at": _now_iso()}
        obj.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
        obj.update(done=True, done_reason=reason)
        return obj

    async def serve(request: Request, kind: str):
        t_start = time.perf_counter()
        body = await _read_json(request, config.max_body_bytes)
        served = resolve(body)
        _refuse_features(body, served)
        stream = _opt_bool(body, "stream", True)
        empty = (not body.get("messages")) if kind == "chat" else (_opt_str(body, "prompt") == "")
        if empty:
            if kind == "chat" and body.get("messages") not in (None, []):
                raise bad_request(f'"messages" must be a list, got {_type_name(body.get("messages"))}')
            obj = load_reply(kind, body.get("model", served), body)
            return Response(_line(obj), media_type="application/x-ndjson") if stream else JSONResponse(obj)
        prep = await anyio.to_thread.run_sync(prepare, body, kind, served)
        queue: asyncio.Queue = asyncio.Queue()
        req = engine.submit(prep.gen, asyncio.get_running_loop(), queue)  # QueueFullError: 429
        metrics.prompt(len(prep.gen.prompts[0]))
        reply = _Reply(kind, prep, t_start)
        if stream:
            return NDJSONResponse(_ndjson(req, queue, reply, engine), on_disconnect=lambda: engine.cancel(req))
        return await _whole_reply(request, engine, req, _collect(req, queue, reply))

    @app.post("/api/chat")
    @guarded
    async def api_chat(request: Request):
        return await serve(request, "chat")

    @app.post("/api/generate")
    @guarded
    async def api_generate(request: Request):
        return await serve(request, "generate")

    @app.get("/api/tags")
    @guarded
    async def api_tags(request: Request):
        return {"models": [card.entry(_listed(n)) for n in names]}

    @app.post("/api/show")
    @guarded
    async def api_show(request: Request):
        body = await _read_json(request, config.max_body_bytes)
        served = resolve(body)
        mf = config.modelfile or {}
        from pocketlm.store.modelfile import render
        params = []
        for key, value in (mf.get("parameters") or {}).items():
            for v in (value if isinstance(value, list) else [value]):
                params.append(f"{key:<30} {json.dumps(v) if isinstance(v, str) else v}")
        return {"modelfile": render(mf, from_line=mf.get("from") or served), "parameters": "\n".join(params),
                "template": "", "system": mf.get("system") or "", "license": mf.get("license") or "",
                "details": card.details, "model_info": card.info, "capabilities": ["completion", "tools"],
                "modified_at": card.modified}

    @app.get("/api/ps")
    @guarded
    async def api_ps(request: Request):
        forever = _now_iso(time.time() + 100 * 365 * 86400)  # never unloaded while the server runs
        return {"models": [dict(card.entry(_listed(n)), expires_at=forever,
                                size_vram=card.size if card.device != "cpu" else 0,
                                context_length=card.context_length) for n in names]}

    @app.get("/api/version")
    @_ollama_errors(config, auth=False)
    async def api_version(request: Request):
        return {"version": OLLAMA_API_VERSION, "pocketlm": __version__}

    @app.head("/", include_in_schema=False)
    async def heartbeat():
        """Ollama clients probe `HEAD /` to see whether the server is up (GET / is the chat page here)."""
        return Response(status_code=200, media_type="text/plain")

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    @_ollama_errors(config, auth=False)
    async def api_other(request: Request):
        path = request.url.path
        if path in ROUTES:
            raise APIError(405, f"method {request.method} not allowed on {path} (use {ROUTES[path]})",
                           headers={"Allow": ROUTES[path]})
        raise APIError(404, f"{request.method} {path[:100]} is not part of pocketlm's Ollama API (served: "
                            f"{', '.join(ROUTES)}); models are managed with `pocketlm pull` / `pocketlm create`")
