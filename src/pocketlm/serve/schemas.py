"""Request validation: raw JSON bodies -> typed `GenRequest`s, or an `APIError` 400/404 naming the bad field.

Hand-written rather than pydantic models so every rule, bound and message is explicit and the failing field is
the envelope's `param` (the checklist in RELIABILITY.md §6 item 13; vLLM's and nanochat's bounds). Rules:
- `model` must be a served name (404 `model_not_found`); JSON types are strict (`true` is not a number, `1.0`
  is not an integer); numbers must be finite.
- temperature in [0, 2]; top_p in (0, 1]; n in [1, max_n]; max_tokens (chat also `max_completion_tokens`)
  >= 1 (>= 0 with echo); stop: a string or at most 4 strings of 1..256 characters; seed within int64; chat
  top_logprobs in [0, 20], completions logprobs in [0, 5] (OpenAI's legacy bound); logit_bias keys are token
  ids of the tokenizer, values in [-100, 100]; presence_penalty and frequency_penalty in [-2, 2];
  extensions top_k >= 0, min_p in [0, 1), repetition_penalty in (0, 2].
- chat `messages` go through `pocketlm.chat.parse_messages` (roles system/user/assistant; `developer` is read
  as `system`; content a string or text parts); they are rendered by `pocketlm.chat.render`, never by string
  templating, so message text cannot become control tokens.
- completions `prompt`: a string, a list of strings, a list of token ids or a list of such lists (each id in
  the tokenizer's range); encoded with BOS when the tokenizer asks for it.
- prompt + max_tokens must fit the served context: otherwise 400 `context_length_exceeded` (never silent
  truncation). max_tokens defaults to what is left of the context. A text longer than 16 characters (the
  longest piece) per context token is refused before tokenizing; lone surrogates are refused by the app.
- completions `echo: true` (OpenAI legacy): the choice's text starts with the prompt text and `logprobs` covers
  the prompt tokens too (the first one's logprob is null); `max_tokens: 0` is allowed only with echo (score the
  prompt, generate nothing). The echo text is the prompt string as sent (decoded ids for an id prompt) and each
  prompt token's `text_offset` is the length of the text its predecessors decode to (`IncrementalDecoder`), so
  an lm-eval style client finds a continuation's tokens by offset. Computed here, off the event loop.
- Unsupported features are refused, not ignored: the legacy `functions` (use `tools`), tools on completions,
  echo on chat completions, best_of > 1, suffix, and `response_format` schemas with keywords `grammar.py` does
  not enforce; a `response_format` together with tools that may be called.
- chat `tools` / `tool_choice` / `parallel_tool_calls` are validated by serve/tools.py, which also renders
  `tool_calls` and `tool` messages and the tool list into the prompt; the request's constraint is then the tool
  grammar (response_format {"type": "tools"}).
- `response_format` types: text, json_object, json_schema (full JSON Schema as llguidance knows it, `strict`
  accepted), and the pocketlm extensions {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar":
  "<Lark or GBNF>"} (or {"grammar": {"syntax": ..., "definition": "..."}}); see serve/grammar.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pocketlm import chat
from pocketlm.engine.detok import IncrementalDecoder
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import ChatFormatError, GenerationError, TokenizerError
from pocketlm.serve.errors import APIError, bad_request

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound
MAX_MESSAGES = 1000


@dataclass
class Limits:
    max_n: int = 8  # most sequences one request may ask for (n x prompts), vLLM CVE-2026-34756
    context_length: int = 4096  # prompt + max_tokens must fit


@dataclass
class GenRequest:
    """One validated request: a list of prompts (ids), `n` sequences per prompt and how to sample them."""

    kind: str  # "chat" | "completion"
    model: str
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]  # one per prompt (max_tokens depends on the prompt length)
    stop_token_ids: frozenset[int]
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": ...}
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    echo: bool = False  # completions: prompt text and prompt-token logprobs come first in each choice
    echo_only: bool = False  # max_tokens 0 with echo: score the prompt, generate nothing
    echo_texts: list[str] = field(default_factory=list)  # per prompt, with echo
    echo_offsets: list[list[int]] = field(default_factory=list)  # per prompt: each prompt token's text offset
    tools: Any = None  # chat: a serve.tools.ToolSpec when the request gives tools (replies are parsed for calls)

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.n


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _type_name(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null", int: "integer",
            float: "number"}.get(type(x), type(x).__name__)


def _get_int(body: dict, name: str, default, lo=None, hi=None, *, nullable=True):
    v = body.get(name, default)
    if v is None and nullable:
        return default
    if not _is_int(v):
        raise bad_request(f"'{name}' must be an integer, got {_type_name(v)} {v!r:.60}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad_request(f"'{name}' must be {'in ' if hi is not None else ''}{rng}, got {v}", name)
    return v


def _get_num(body: dict, name: str, default, lo, hi, *, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not _is_num(v):
        raise bad_request(f"'{name}' must be a finite number, got {_type_name(v)} {v!r:.60}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_type_name(v)} {v!r:.60}", name)
    return v


def _stop_list(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise bad_request(f"'stop' must be a string or a list of strings, got {_type_name(v)}", "stop")
    if len(v) > MAX_STOP:
        raise bad_request(f"'stop' may hold at most {MAX_STOP} sequences, got {len(v)}", "stop")
    for s in v:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise bad_request(f"each 'stop' entry must be a string of 1 to {MAX_STOP_CHARS} characters, got "
                              f"{_type_name(s)} of length {len(s) if isinstance(s, str) else '-'}", "stop")
    return v


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_request(f"'logit_bias' must be an object mapping token ids to numbers, got {_type_name(v)}",
                          "logit_bias")
    if len(v) > 300:
        raise bad_request(f"'logit_bias' may hold at most 300 entries, got {len(v)}", "logit_bias")
    out = {}
    for key, bias in v.items():
        try:
            tid = int(key)
        except ValueError:
            tid = -1
        if not key.strip().lstrip("-").isdigit() or not 0 <= tid < vocab:
            raise bad_request(f"'logit_bias' key {key!r:.40} is not a token id in [0, {vocab})", "logit_bias")
        if not _is_num(bias) or not -100 <= bias <= 100:
            raise bad_request(f"'logit_bias' value for {key} must be a number in [-100, 100], got {bias!r:.40}",
                              "logit_bias")
        out[tid] = float(bias)
    return out


def _response_format(body: dict) -> dict | None:
    """Validate `response_format`; the result's "schema" is what the per-sequence constraint is built from (a JSON
    schema object, or for the pocketlm extensions `regex` / `grammar` the compiled grammar string)."""
    from pocketlm.serve.grammar import SchemaError, check_schema, compile_grammar, compile_regex

    v = body.get("response_format")
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad_request("'response_format' must be an object with a 'type'", "response_format")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object", "schema": {"type": "object"}}
    if kind == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema' object",
                              "response_format.json_schema")
        schema = js.get("schema", {})
        try:
            check_schema(schema)
        except SchemaError as e:
            raise bad_request(f"unsupported JSON schema: {e}", "response_format.json_schema.schema") from None
        return {"type": "json_schema", "schema": schema}
    if kind in ("regex", "grammar"):
        src = v.get(kind)
        if kind == "grammar" and isinstance(src, dict):  # {"syntax": "lark"|"gbnf", "definition": "..."}
            src = src.get("definition")
        try:
            compiled = compile_regex(src) if kind == "regex" else compile_grammar(src)
        except SchemaError as e:
            raise bad_request(f"invalid {kind}: {e}", f"response_format.{kind}") from None
        return {"type": kind, kind: src, "schema": compiled}
    raise bad_request(f"'response_format.type' must be 'text', 'json_object', 'json_schema', 'regex' or 'grammar', "
                      f"got {kind!r:.40}", "response_format.type")


def _refuse_unsupported(body: dict, kind: str) -> None:
    if body.get("functions") or body.get("function_call"):
        name = "functions" if body.get("functions") else "function_call"
        raise bad_request(f"'{name}' (legacy function calling) is not supported by this server; use 'tools' and "
                          "'tool_choice'", name)
    if kind == "completion" and body.get("tools"):
        raise bad_request("'tools' is supported on chat completions only (/v1/chat/completions)", "tools")
    if kind == "chat" and body.get("echo") not in (None, False):
        raise bad_request("'echo' is not supported on chat completions (use /v1/completions)", "echo")
    if kind == "completion":
        if body.get("suffix") not in (None, ""):
            raise bad_request("'suffix' is not supported by this server", "suffix")
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1:
            raise bad_request("'best_of' other than 1 is not supported by this server", "best_of")


MAX_CHARS_PER_TOKEN = 16  # the longest Phi-3 piece; a text longer than this x the context cannot fit


def _refuse_long_text(chars: int, limits: Limits, param: str) -> None:
    """Refuse a text that cannot fit the context whatever it tokenizes to, before spending time tokenizing it."""
    if chars > MAX_CHARS_PER_TOKEN * limits.context_length:
        raise bad_request(f"This model's maximum context length is {limits.context_length} tokens. However, your "
                          f"{param} has {chars} characters, which is more than any {limits.context_length}-token "
                          "text can hold. Please reduce the length of the messages or prompt.", param,
                          "context_length_exceeded")


def _encode_guard(fn, *args, param: str):
    try:
        return fn(*args)
    except (TokenizerError, ValueError, TypeError) as e:
        raise bad_request(f"could not tokenize the {param}: {str(e)[:200]}", param) from None


def _prompts_from_completion(body: dict, tokenizer, vocab: int, limits: Limits) -> list[list[int]]:
    if "prompt" not in body:
        raise bad_request("'prompt' is required", "prompt")
    p = body["prompt"]

    def encode(text: str) -> list[int]:
        _refuse_long_text(len(text), limits, "prompt")
        return _encode_guard(lambda t: tokenizer.encode(t, add_bos=tokenizer.add_bos_default), text, param="prompt")

    def ids(seq: list) -> list[int]:
        for i in seq:
            if not _is_int(i) or not 0 <= i < vocab:
                raise bad_request(f"prompt token id {i!r:.40} is outside the vocabulary [0, {vocab})", "prompt")
        return list(seq)

    if isinstance(p, str):
        prompts = [encode(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = [encode(x) for x in p]
    elif isinstance(p, list) and p and all(_is_int(x) for x in p):
        prompts = [ids(p)]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        prompts = [ids(x) for x in p]
    else:
        raise bad_request("'prompt' must be a string, a non-empty list of strings, a list of token ids or a list "
                          f"of such lists, got {_type_name(p)} {p!r:.60}", "prompt")
    for q in prompts:
        if not q:
            raise bad_request("the prompt is empty (no tokens): nothing to generate from", "prompt")
    return prompts


def _prompt_from_chat(body: dict, tokenizer, chat_format: str | None, limits: Limits, tools=None) -> list[int]:
    from pocketlm.serve.tools import render_tool_messages

    if "messages" not in body:
        raise bad_request("'messages' is required", "messages")
    messages = body["messages"]
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise bad_request(f"'messages' may hold at most {MAX_MESSAGES} messages, got {len(messages)}",
                              "messages")
        messages = [dict(m, role="system") if isinstance(m, dict) and m.get("role") == "developer" else m
                    for m in messages]
        _refuse_long_text(sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict)), limits,
                          "messages")
    try:
        messages = render_tool_messages(messages, tools, chat_format or chat.DEFAULT_FORMAT)
        return chat.render(messages, tokenizer, add_generation_prompt=True, format=chat_format)
    except ChatFormatError as e:
        raise bad_request(str(e), "messages") from None
    except (TokenizerError, ValueError, TypeError) as e:
        raise bad_request(f"could not tokenize the messages: {str(e)[:200]}", "messages") from None


def _text_chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def parse_request(body: Any, kind: str, *, tokenizer, model_names: list[str], limits: Limits,
                  vocab_size: int, chat_format: str | None = None) -> GenRequest:
    """Validate a chat ("chat") or completions ("completion") body; raise APIError on the first problem."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_type_name(model)}", "model")
    if model not in model_names:
        raise APIError(404, f"The model '{model[:100]}' does not exist; this server serves {model_names}",
                       param="model", code="model_not_found")
    _refuse_unsupported(body, kind)
    vocab = len(tokenizer)
    tools = None
    if kind == "chat":
        from pocketlm.serve.tools import parse_tools
        tools = parse_tools(body)
        prompts = [_prompt_from_chat(body, tokenizer, chat_format, limits, tools)]
        stop_ids = frozenset(chat.stop_token_ids(tokenizer)) | {tokenizer.eos_id}
        logprobs = _get_bool(body, "logprobs", False)
        top_logprobs = _get_int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        if top_logprobs and not logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        prompts = _prompts_from_completion(body, tokenizer, vocab, limits)
        stop_ids = frozenset({tokenizer.eos_id})
        lp = _get_int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        logprobs, top_logprobs = lp is not None, lp or 0
        max_name = "max_tokens"
    echo = kind == "completion" and _get_bool(body, "echo", False)
    max_tokens = _get_int(body, max_name, None, 0 if echo else 1)
    n = _get_int(body, "n", 1, 1, limits.max_n)
    if n * len(prompts) > limits.max_n:
        raise bad_request(f"{len(prompts)} prompts x n={n} = {n * len(prompts)} sequences; at most "
                          f"{limits.max_n} per request", "n")
    temperature = _get_num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _get_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _get_int(body, "top_k", 0, 0, vocab)
    min_p = _get_num(body, "min_p", 0.0, 0.0, 1.0)
    if min_p >= 1.0:
        raise bad_request(f"'min_p' must be in [0, 1), got {min_p}", "min_p")
    repetition_penalty = _get_num(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True)
    presence = _get_num(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _get_num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    seed = _get_int(body, "seed", None, INT64_MIN, INT64_MAX)
    stop = _stop_list(body)
    stream = _get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request(f"'stream_options' must be an object, got {_type_name(so)}", "stream_options")
    include_usage = _get_bool(so or {}, "include_usage", False)
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string", "user")
    response_format = _response_format(body)
    if tools is not None and (response_format is None or tools.calls_possible):
        if response_format is not None:
            raise bad_request("'response_format' together with 'tools' is not supported (the reply is constrained "
                              "to text or tool calls); use tool_choice 'none' to constrain a text reply",
                              "response_format")
        response_format = tools.response_format()
    logit_bias = _logit_bias(body, vocab)

    params = []
    echo_only = echo and max_tokens == 0
    for ids in prompts:
        room = limits.context_length - len(ids)
        want = room if max_tokens is None else max_tokens
        if (room < 1 and not echo_only) or room < 0 or want > room:
            asked = f"{len(ids)} in the prompt and {want} to generate" if max_tokens is not None else \
                f"{len(ids)} in the prompt"
            raise bad_request(f"This model's maximum context length is {limits.context_length} tokens. However, "
                              f"you requested {len(ids) + max(want, 1)} tokens ({asked}). Please reduce the length "
                              "of the messages or prompt, or max_tokens.",
                              "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        try:
            params.append(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                         repetition_penalty=repetition_penalty, seed=seed,
                                         max_tokens=max(want, 1),  # echo_only: the engine generates nothing
                                         stop=tuple(stop)))
        except GenerationError as e:  # the bounds above should make this unreachable
            raise bad_request(str(e)) from None
    texts, offsets = [], []
    if echo:
        p = body["prompt"]
        strings = [p] if isinstance(p, str) else p if isinstance(p[0], str) else [None] * len(prompts)
        for ids, given in zip(prompts, strings):
            text, offs = echo_text_offsets(tokenizer, ids)
            texts.append(text if given is None else given)
            offsets.append(offs)
    return GenRequest(kind=kind, model=model, prompts=prompts, n=n, params=params, stop_token_ids=stop_ids,
                      stream=stream, include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
                      response_format=response_format, logit_bias=logit_bias, presence_penalty=presence,
                      frequency_penalty=frequency, echo=echo, echo_only=echo_only, echo_texts=texts,
                      echo_offsets=offsets, tools=tools)


def echo_text_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The text `ids` decode to (special tokens skipped, as generated text is) and each id's offset in it: the
    length of the text its predecessors decode to (a byte-fallback piece that completes a character later gets
    the offset of that character)."""
    dec = IncrementalDecoder(tokenizer, skip_special=True)
    parts, offsets, n = [], [], 0
    for tid in ids:
        offsets.append(n)
        piece = dec.push(tid)
        parts.append(piece)
        n += len(piece)
    parts.append(dec.flush())
    return "".join(parts), offsets
