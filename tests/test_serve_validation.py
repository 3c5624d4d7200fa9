"""The validation table (RELIABILITY.md §6 item 13): every bad request gets its exact status and OpenAI error
envelope, never a 5xx; plus a seeded random-body fuzz (item 14, reduced) after which /health is still 200."""

from __future__ import annotations

import json
import random

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest
import torch

import pocketlm
from pocketlm import Tokenizer
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

CTX = 512
LIMIT = 4 * 2**20
OK_MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def servers():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = pocketlm.load("tiny")
    tok = Tokenizer.default()
    open_app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=4, context_length=CTX))
    keyed_app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=2, context_length=CTX,
                                                    api_key="k3y"))
    with BackgroundServer(open_app) as a, BackgroundServer(keyed_app) as b:
        yield {"open": a.url, "keyed": b.url}
    torch.set_num_threads(threads)


def chat(**kw):
    return {"model": "tiny", "messages": OK_MSG, "max_tokens": 2, **kw}


def comp(**kw):
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2, **kw}


C, P = "/v1/chat/completions", "/v1/completions"
# (id, method, path, body (dict -> JSON, bytes -> raw), headers, status, code, param)
TABLE = [
    ("malformed-json", "POST", C, b'{"model": "tiny", "messages": [', {}, 400, None, None),
    ("not-utf8", "POST", C, b'\xff\xfe{}', {}, 400, None, None),
    ("body-not-object", "POST", C, [1, 2], {}, 400, None, None),
    ("deep-nesting", "POST", C, b"[" * 100_000, {}, 400, None, None),
    ("nan-temperature", "POST", C, b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                                   b'"temperature": NaN}', {}, 400, None, "temperature"),
    ("lone-surrogate", "POST", C, b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     {}, 400, None, None),
    ("lone-surrogate-completions", "POST", P, b'{"model": "tiny", "prompt": "\\udfff"}', {}, 400, None, None),
    ("huge-message-refused-before-tokenizing", "POST", C, chat(messages=[{"role": "user", "content": "ab" * 2**20}],
                                                             max_tokens=None), {}, 400, "context_length_exceeded",
     "messages"),
    ("model-wrong-type", "POST", C, chat(model=123), {}, 400, None, "model"),
    ("model-missing", "POST", C, {"messages": OK_MSG}, {}, 400, None, "model"),
    ("unknown-model", "POST", C, chat(model="gpt-9"), {}, 404, "model_not_found", "model"),
    ("unknown-model-completions", "POST", P, comp(model="gpt-9"), {}, 404, "model_not_found", "model"),
    ("messages-missing", "POST", C, {"model": "tiny"}, {}, 400, None, "messages"),
    ("messages-string", "POST", C, chat(messages="hi"), {}, 400, None, "messages"),
    ("messages-empty", "POST", C, chat(messages=[]), {}, 400, None, "messages"),
    ("unknown-role", "POST", C, chat(messages=[{"role": "wizard", "content": "x"}]), {}, 400, None, "messages"),
    ("message-not-object", "POST", C, chat(messages=["hi"]), {}, 400, None, "messages"),
    ("content-number", "POST", C, chat(messages=[{"role": "user", "content": 42}]), {}, 400, None, "messages"),
    ("content-image-part", "POST", C, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), {}, 400, "images_not_supported", "messages"),
    ("n-too-big", "POST", C, chat(n=9), {}, 400, None, "n"),
    ("n-zero", "POST", C, chat(n=0), {}, 400, None, "n"),
    ("n-bool", "POST", C, chat(n=True), {}, 400, None, "n"),
    ("max-tokens-zero", "POST", C, chat(max_tokens=0), {}, 400, None, "max_tokens"),
    ("max-tokens-negative", "POST", C, chat(max_tokens=-186), {}, 400, None, "max_tokens"),
    ("max-tokens-string", "POST", C, chat(max_tokens="10"), {}, 400, None, "max_tokens"),
    ("max-tokens-float", "POST", C, chat(max_tokens=10.5), {}, 400, None, "max_tokens"),
    ("max-completion-tokens-zero", "POST", C, chat(max_completion_tokens=0), {}, 400, None,
     "max_completion_tokens"),
    ("context-exceeded", "POST", C, chat(max_tokens=CTX), {}, 400, "context_length_exceeded", "messages"),
    ("prompt-too-long", "POST", C, chat(messages=[{"role": "user", "content": "hello " * CTX}], max_tokens=None),
     {}, 400, "context_length_exceeded", "messages"),
    ("context-exceeded-completions", "POST", P, comp(max_tokens=CTX), {}, 400, "context_length_exceeded",
     "prompt"),
    ("temperature-high", "POST", C, chat(temperature=2.5), {}, 400, None, "temperature"),
    ("temperature-negative", "POST", C, chat(temperature=-0.1), {}, 400, None, "temperature"),
    ("temperature-string", "POST", C, chat(temperature="hot"), {}, 400, None, "temperature"),
    ("top-p-zero", "POST", C, chat(top_p=0), {}, 400, None, "top_p"),
    ("top-p-high", "POST", C, chat(top_p=1.5), {}, 400, None, "top_p"),
    ("stop-too-many", "POST", C, chat(stop=["a", "b", "c", "d", "e"]), {}, 400, None, "stop"),
    ("stop-too-long", "POST", C, chat(stop=["x" * 257]), {}, 400, None, "stop"),
    ("stop-empty", "POST", C, chat(stop=[""]), {}, 400, None, "stop"),
    ("stop-number", "POST", C, chat(stop=5), {}, 400, None, "stop"),
    ("logit-bias-key-outside-vocab", "POST", C, chat(logit_bias={"99999": 1}), {}, 400, None, "logit_bias"),
    ("logit-bias-key-not-int", "POST", C, chat(logit_bias={"abc": 1}), {}, 400, None, "logit_bias"),
    ("logit-bias-value", "POST", C, chat(logit_bias={"5": 101}), {}, 400, None, "logit_bias"),
    ("seed-too-big", "POST", C, chat(seed=2**63), {}, 400, None, "seed"),
    ("seed-too-small", "POST", C, chat(seed=-2**63 - 1), {}, 400, None, "seed"),
    ("presence-penalty", "POST", C, chat(presence_penalty=3), {}, 400, None, "presence_penalty"),
    ("logprobs-not-bool", "POST", C, chat(logprobs="yes"), {}, 400, None, "logprobs"),
    ("top-logprobs-too-many", "POST", C, chat(logprobs=True, top_logprobs=21), {}, 400, None, "top_logprobs"),
    ("top-logprobs-without-logprobs", "POST", C, chat(top_logprobs=2), {}, 400, None, "top_logprobs"),
    ("stream-not-bool", "POST", C, chat(stream="yes"), {}, 400, None, "stream"),
    ("response-format-type", "POST", C, chat(response_format={"type": "xml"}), {}, 400, None,
     "response_format.type"),
    ("response-format-unsupported-schema", "POST", C, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}), {}, 400, None,
     "response_format.json_schema.schema"),
    ("tools-bad-name", "POST", C, chat(tools=[{"type": "function", "function": {"name": "f g"}}]), {}, 400,
     None, "tools[0].function.name"),
    ("tools-on-completions", "POST", P, comp(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400,
     None, "tools"),
    ("functions-legacy", "POST", C, chat(functions=[{"name": "f"}]), {}, 400, None, "functions"),
    ("prompt-missing", "POST", P, {"model": "tiny"}, {}, 400, None, "prompt"),
    ("prompt-empty-list", "POST", P, comp(prompt=[]), {}, 400, None, "prompt"),
    ("prompt-number", "POST", P, comp(prompt=5), {}, 400, None, "prompt"),
    ("prompt-id-outside-vocab", "POST", P, comp(prompt=[1, 99999999]), {}, 400, None, "prompt"),
    ("completions-logprobs-too-many", "POST", P, comp(logprobs=21), {}, 400, None, "logprobs"),
    ("completions-logprobs-over-legacy-bound", "POST", P, comp(logprobs=6), {}, 400, None, "logprobs"),
    ("completions-logprobs-negative", "POST", P, comp(logprobs=-1), {}, 400, None, "logprobs"),
    ("completions-logprobs-bool", "POST", P, comp(logprobs=True), {}, 400, None, "logprobs"),
    ("completions-max-tokens-zero-without-echo", "POST", P, comp(max_tokens=0), {}, 400, None, "max_tokens"),
    ("completions-max-tokens-negative-with-echo", "POST", P, comp(echo=True, max_tokens=-1), {}, 400, None,
     "max_tokens"),
    ("echo-not-bool", "POST", P, comp(echo="yes"), {}, 400, None, "echo"),
    ("echo-on-chat", "POST", C, chat(echo=True), {}, 400, None, "echo"),
    ("echo-on-chat-with-max-tokens-zero", "POST", C, chat(echo=True, max_tokens=0), {}, 400, None, "echo"),
    ("echo-context-exceeded", "POST", P, comp(echo=True, max_tokens=0, prompt=[1] * (CTX + 1)), {}, 400,
     "context_length_exceeded", "prompt"),
    ("body-too-large", "POST", C, b"x" * (LIMIT + 1), {}, 413, "request_too_large", None),
    ("body-too-large-chunked", "POST", C, "chunked", {}, 413, "request_too_large", None),
    ("unknown-route", "GET", "/v1/nothing", None, {}, 404, "not_found", None),
    ("unknown-model-route", "GET", "/v1/models/gpt-9", None, {}, 404, "model_not_found", "model"),
    ("wrong-method", "GET", C, None, {}, 405, "method_not_allowed", None),
    ("wrong-method-models", "DELETE", "/v1/models", None, {}, 405, "method_not_allowed", None),
    ("no-api-key", "POST", "keyed:" + C, chat(), {}, 401, "invalid_api_key", None),
    ("bad-api-key", "POST", "keyed:" + C, chat(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key", None),
    ("bad-api-key-metrics", "GET", "keyed:/metrics", None, {"Authorization": "Bearer nope"}, 401,
     "invalid_api_key", None),
    ("text-plain-body", "POST", C, json.dumps(chat()).encode(), {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type", None),
    ("form-body", "POST", P, b"model=tiny&prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", None),
    ("foreign-host", "GET", "/v1/models", None, {"Host": "evil.example:8000"}, 403, "host_not_allowed", None),
]
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error"}


def _send(urls, method, path, body, headers, timeout=30):
    which, _, path = path.rpartition(":") if path.startswith("keyed:") else ("open", "", path)
    url = urls[which] + path
    if isinstance(body, bytes) or body == "chunked":  # raw bytes are sent as JSON unless the case says otherwise
        headers = {"Content-Type": "application/json", **headers}
    if body == "chunked":  # no Content-Length: the limit is enforced while reading
        def gen():
            for _ in range(LIMIT // 2**16 + 2):
                yield b"x" * 2**16
        return httpx.request(method, url, content=gen(), headers=headers, timeout=timeout)
    if isinstance(body, bytes):
        return httpx.request(method, url, content=body, headers=headers, timeout=timeout)
    if body is None:
        return httpx.request(method, url, headers=headers, timeout=timeout)
    body = {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body
    return httpx.request(method, url, json=body, headers=headers, timeout=timeout)


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_validation_table(servers, case):
    name, method, path, body, headers, status, code, param = case
    r = _send(servers, method, path, body, headers)
    assert r.status_code == status, r.text[:300]
    err = r.json()
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    e = err["error"]
    assert e["type"] == TYPES[status] and e["code"] == code and e["param"] == param, e
    assert isinstance(e["message"], str) and e["message"] and "Traceback" not in e["message"]
    if status == 400 and name == "max-tokens-negative":
        assert "-186" in e["message"]


def test_the_valid_baseline_of_the_table_works(servers):
    for path, body in ((C, chat()), (P, comp())):
        r = _send(servers, "POST", path, body, {})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = _send(servers, "POST", "keyed:" + C, chat(), {"Authorization": "Bearer k3y"})
    assert r.status_code == 200


@pytest.mark.parametrize("logprobs", [None, 0, 5])
def test_echo_with_max_tokens_zero_is_allowed(servers, logprobs):
    r = _send(servers, "POST", P, comp(echo=True, max_tokens=0, logprobs=logprobs, prompt="hi there"), {})
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    choice = out["choices"][0]
    assert choice["text"] == "hi there" and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] >= 2
    if logprobs is None:
        assert choice["logprobs"] is None
    else:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == out["usage"]["prompt_tokens"] and lp["token_logprobs"][0] is None
        assert all(t is None or len(t) == logprobs for t in lp["top_logprobs"][1:])
    # a prompt that fills the whole context can be scored (nothing is generated)
    r = _send(servers, "POST", P, comp(echo=True, max_tokens=0, logprobs=logprobs, prompt=[1] + [1024] * (CTX - 1)),
              {})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == CTX


def _mutate(rng: random.Random, value, depth=0):
    """A random edit of a JSON value: wrong types, extremes, missing/extra keys."""
    weird = [None, True, False, 0, -1, 2**64, -2**63 - 1, 1e308, -1e-308, 0.5, "", "x" * 300, [], {}, [None],
             {"a": []}, "<|end|>", "\u0000", "\ud800", 3.7, "NaN", [{"role": "tool", "content": None}]]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        out = dict(value)
        key = rng.choice(list(out))
        r = rng.random()
        if r < 0.2:
            del out[key]
        elif r < 0.3:
            out[rng.choice(["n", "stop", "seed", "logit_bias", "top_logprobs", "response_format", "x"])] = \
                rng.choice(weird)
        else:
            out[key] = _mutate(rng, out[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.6:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutate(rng, out[i], depth + 1)
        return out
    return rng.choice(weird)


def test_random_bodies_never_5xx(servers):
    seed = 1125
    rng = random.Random(seed)
    base = [(C, chat(temperature=0.5, top_p=0.9, n=2, stop=["x"], seed=3, logprobs=True, top_logprobs=2,
                     stream=False)),
            (P, comp(temperature=0.5, logprobs=1, seed=3, n=1, stop="y")),
            (P, comp(echo=True, max_tokens=0, logprobs=2, n=2, prompt=["ab", "c d"]))]
    statuses = {}
    with httpx.Client(timeout=30) as client:
        for i in range(300):
            path, body = base[i % 3]
            for _ in range(rng.randint(1, 3)):
                body = _mutate(rng, body)
            r = client.post(servers["open"] + path, content=json.dumps(body),
                            headers={"Content-Type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, f"seed {seed} case {i}: {body!r:.300} -> {r.status_code} {r.text[:300]}"
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    print(f"random bodies (seed {seed}): statuses {statuses}")
    assert httpx.get(servers["open"] + "/health").json()["active"] == 0
