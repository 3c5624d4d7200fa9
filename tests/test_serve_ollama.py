"""pocketlm serve's Ollama API (serve/ollama.py) through the official `ollama` Python client.

A real uvicorn server on 127.0.0.1 (free port) serves `pocketlm.load("tiny")` with `Tokenizer.default()`; the
greedy replies are compared with the OpenAI routes' on the same server (one request at a time, so the same batch
shape), and the error shapes, options, streaming, the metadata routes and a dropped stream are checked.
"""

from __future__ import annotations

import json
import random
import time

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import ollama
import openai
import pytest
import torch

import pocketlm
from pocketlm import Tokenizer, chat
from pocketlm.serve import grammar
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

MSG = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread is several times faster for a tiny model
    model = pocketlm.load("tiny")
    tok = Tokenizer.default()
    app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=4, context_length=512))
    with BackgroundServer(app) as srv:
        client = ollama.Client(host=srv.url, timeout=60)
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv, client, oa, model, tok, app
    torch.set_num_threads(threads)


def _wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["active"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def test_chat_greedy_equals_openai(setup):
    srv, client, oa, model, tok, _ = setup
    ref = oa.chat.completions.create(model="tiny", messages=MSG, max_tokens=24, temperature=0)
    r = client.chat(model="tiny", messages=MSG, options={"temperature": 0, "num_predict": 24})
    assert r.model == "tiny" and r.done is True and r.message.role == "assistant"
    assert r.message.content == ref.choices[0].message.content
    assert r.done_reason == ref.choices[0].finish_reason
    assert r.prompt_eval_count == ref.usage.prompt_tokens == len(chat.render(MSG, tok))
    assert r.eval_count == ref.usage.completion_tokens
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, name), int) and getattr(r, name) >= 0, name
    assert r.total_duration >= r.eval_duration > 0
    assert r.created_at.endswith("Z")


def test_chat_streamed(setup):
    srv, client, *_ = setup
    whole = client.chat(model="tiny", messages=MSG, options={"temperature": 0, "num_predict": 20})
    parts = list(client.chat(model="tiny", messages=MSG, stream=True, options={"temperature": 0, "num_predict": 20}))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content for p in parts) == whole.message.content
    last = parts[-1]
    assert last.message.content == "" and last.done_reason == "length" and last.eval_count == 20
    assert all(p.eval_count is None for p in parts[:-1])


def test_raw_ndjson_lines(setup):
    srv = setup[0]
    with httpx.stream("POST", srv.url + "/api/generate",
                      json={"model": "tiny", "prompt": "Hi", "options": {"num_predict": 4}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])  # streamed by default
    assert set(lines[-1]) >= {"model", "created_at", "response", "done", "done_reason", "context", "total_duration",
                              "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                              "eval_duration"}


def test_generate_streamed_and_not(setup):
    srv, client, oa, model, tok, _ = setup
    opts = {"temperature": 0, "num_predict": 16}
    whole = client.generate(model="tiny", prompt="Tell me a story.", options=opts)
    parts = list(client.generate(model="tiny", prompt="Tell me a story.", stream=True, options=opts))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    # a non-raw prompt is one user turn: the same reply as the OpenAI chat route's
    ref = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                     max_tokens=16, temperature=0)
    assert whole.response == ref.choices[0].message.content
    assert whole.context[:whole.prompt_eval_count] == chat.render([{"role": "user", "content": "Tell me a story."}],
                                                                  tok)
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count
    assert parts[-1].context == whole.context


def test_generate_system_raw_and_context(setup):
    srv, client, oa, model, tok, _ = setup
    opts = {"temperature": 0, "num_predict": 8}
    r = client.generate(model="tiny", prompt="Hi", system="Be brief.", options=opts)
    ref = oa.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert r.response == ref.choices[0].message.content
    raw = client.generate(model="tiny", prompt="<|user|>\nHi<|end|>\n<|assistant|>\n", raw=True, options=opts)
    assert raw.prompt_eval_count == len(tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n",
                                                   add_bos=tok.add_bos_default))
    ref = oa.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    raw = client.generate(model="tiny", prompt="Once upon a time", raw=True, options=opts)
    assert raw.response == ref.choices[0].text
    again = client.generate(model="tiny", prompt="More.", context=r.context, options=opts)
    turn = chat.render([{"role": "user", "content": "More."}], tok)
    turn = turn[1:] if turn[0] == tok.bos_id else turn  # a BOS only starts the whole sequence
    assert again.prompt_eval_count == len(r.context) + len(turn)
    assert again.context[:again.prompt_eval_count] == list(r.context) + turn


def test_options_num_predict_stop_seed(setup):
    srv, client, *_ = setup
    r = client.chat(model="tiny", messages=MSG, options={"num_predict": 3, "seed": 1})
    assert r.eval_count == 3 and r.done_reason == "length"
    full = client.generate(model="tiny", prompt="Count.", options={"temperature": 0, "num_predict": 30})
    text = full.response
    cut = next(i for i in range(4, len(text) - 2) if text[i] != " " and text.find(text[i:i + 2]) == i)
    stop = text[cut:cut + 2]
    r = client.generate(model="tiny", prompt="Count.", options={"temperature": 0, "num_predict": 30, "stop": [stop]})
    assert r.response == text[:cut] and r.done_reason == "stop"
    opts = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "min_p": 0.01, "repeat_penalty": 1.1, "num_predict": 20}
    a = client.generate(model="tiny", prompt="Hi", options=dict(opts, seed=7))
    b = client.generate(model="tiny", prompt="Hi", options=dict(opts, seed=7))
    c = client.generate(model="tiny", prompt="Hi", options=dict(opts, seed=8))
    assert a.response == b.response and a.response != c.response


def test_num_ctx_limits_the_request(setup):
    srv, client, *_ = setup
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MSG, options={"num_ctx": 8})
    assert e.value.status_code == 400 and "maximum context length is 8 tokens" in e.value.error
    r = client.chat(model="tiny", messages=MSG, options={"num_ctx": 40, "temperature": 0})  # up to the context
    assert r.prompt_eval_count + r.eval_count <= 40
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MSG, options={"num_predict": 600})
    assert e.value.status_code == 400 and "num_predict" in e.value.error and "max_tokens" not in e.value.error


def test_format_json_and_schema(setup):
    srv, client, *_ = setup
    stopped = 0
    for prompt in ("Give JSON", "Give me JSON."):
        r = client.generate(model="tiny", prompt=prompt, format="json", options={"temperature": 0, "num_predict": 40})
        state = grammar.feed_text(grammar.initial_state(grammar.compile_schema({"type": "object"})), r.response)
        assert state is not None, r.response  # every prefix is the start of a JSON object
        if r.done_reason == "stop":
            assert isinstance(json.loads(r.response), dict)
            stopped += 1
    # (a random model may ramble inside a free-form key until num_predict; a complete object is checked below)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat(model="tiny", messages=MSG, format=schema, options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(r.message.content)["ok"], bool)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=MSG, format={"type": "string", "format": "no-such-format"})
    assert e.value.status_code == 400 and "no-such-format" in e.value.error


def test_tags_show_ps_version(setup):
    srv, client, *_ = setup
    tags = client.list()
    assert [m.model for m in tags.models] == ["tiny:latest"]
    m = tags.models[0]
    assert m.details.family == "phi3" and m.details.quantization_level == "F32" and len(m.digest) == 64
    assert m.size > 0 and m.details.parameter_size.endswith("M")
    show = client.show("tiny:latest")
    assert show.modelinfo["general.architecture"] == "phi3" and show.modelinfo["phi3.context_length"] == 512
    assert show.capabilities == ["completion", "tools"] and show.modelfile.startswith("FROM ")
    ps = client.ps()
    assert ps.models[0].name == "tiny:latest" and ps.models[0].context_length == 512
    v = httpx.get(srv.url + "/api/version")
    assert v.status_code == 200 and v.json()["version"].count(".") == 2
    assert httpx.head(srv.url + "/").status_code == 200


def test_errors_have_ollama_shape(setup):
    srv, client, *_ = setup
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=MSG)
    assert e.value.status_code == 404 and e.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404
    bad = [{"temperature": "hot"}, {"num_predict": 1.5}, {"stop": 3}, {"seed": True}, {"temperature": 5},
           {"mirostat": 2}, {"num_predict": 0}, {"num_ctx": 0}]
    for options in bad:
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="tiny", prompt="Hi", options=options)
        assert e.value.status_code == 400 and isinstance(e.value.error, str), options
    for body in ({"model": "tiny", "prompt": "Hi", "format": "xml"}, {"model": "tiny", "prompt": 5},
                 {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
                 {"model": "tiny", "prompt": "Hi", "images": ["aGk="]},
                 {"model": "tiny", "prompt": "Hi", "think": True},
                 {"prompt": "Hi"}, {"model": "tiny", "prompt": "Hi", "context": [-1]}, [1, 2]):
        path = "/api/chat" if isinstance(body, dict) and "messages" in body else "/api/generate"
        r = httpx.post(srv.url + path, json=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), (body, r.text)
    r = httpx.post(srv.url + "/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = httpx.post(srv.url + "/api/pull", json={"model": "tiny"})
    assert r.status_code == 404 and "pocketlm pull" in r.json()["error"]
    r = httpx.get(srv.url + "/api/chat")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
    # the checks in front of every route (Host, Content-Type, size) answer /api/* in Ollama's shape too
    for status, kwargs in ((403, {"json": {"model": "tiny", "prompt": "Hi"}, "headers": {"host": "evil.example"}}),
                           (415, {"content": b'{"model": "tiny"}', "headers": {"content-type": "text/plain"}})):
        r = httpx.post(srv.url + "/api/generate", **kwargs)
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text
    r = httpx.post(srv.url + "/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and isinstance(r.json()["error"], dict)  # the OpenAI side keeps its envelope


def test_load_and_unload_calls(setup):
    srv, client, *_ = setup
    r = client.chat(model="tiny", messages=[])
    assert r.done and r.done_reason == "load" and r.message.content == ""
    r = client.generate(model="tiny", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    r = client.generate(model="tiny", prompt="Hi", keep_alive="5m", options={"num_predict": 2})
    assert r.eval_count == 2


def test_dropped_stream_frees_the_slot(setup):
    srv, client, oa, model, tok, app = setup
    engine = app.state.engine
    _wait_idle(engine)
    aborts = engine.stats()["aborts"]
    with httpx.stream("POST", srv.url + "/api/chat", json={"model": "tiny", "messages": MSG,
                                                           "options": {"num_predict": 400}}) as r:
        first = json.loads(next(r.iter_lines()))
        assert first["done"] is False
    _wait_idle(engine)
    assert engine.stats()["aborts"] == aborts + 1
    r = client.chat(model="tiny", messages=MSG, options={"num_predict": 2})  # still serving
    assert r.eval_count == 2


def test_api_key_full_engine_and_modelfile_defaults(setup, monkeypatch):
    model, tok = setup[3], setup[4]
    mf = {"from": "tiny", "system": "You are terse.", "parameters": {"num_predict": 3, "temperature": 0.0}}
    app = create_app(model, tok, ServerConfig(model_name="tiny", api_key="k", max_slots=1, max_queue=0,
                                              context_length=512, modelfile=mf))
    with BackgroundServer(app) as srv:
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=srv.url).list()
        assert e.value.status_code == 401
        assert httpx.get(srv.url + "/api/version").status_code == 200
        client = ollama.Client(host=srv.url, headers={"Authorization": "Bearer k"})
        r = client.chat(model="tiny", messages=MSG)
        assert r.eval_count == 3  # the Modelfile's num_predict
        assert r.prompt_eval_count == len(chat.render([{"role": "system", "content": "You are terse."}] + MSG, tok))
        show = client.show("tiny")
        assert "num_predict" in show.parameters and "SYSTEM" in show.modelfile
        raw = httpx.post(srv.url + "/api/show", json={"model": "tiny"}, headers={"Authorization": "Bearer k"}).json()
        assert raw["system"] == "You are terse."
        decode = model.forward_batched

        def slow_decode(*args, **kwargs):  # an idle machine decodes 400 tiny-model tokens before the next request
            time.sleep(0.02)
            return decode(*args, **kwargs)

        monkeypatch.setattr(model, "forward_batched", slow_decode)
        with httpx.stream("POST", srv.url + "/api/generate", headers={"Authorization": "Bearer k"},
                          json={"model": "tiny", "prompt": "Hi", "options": {"num_predict": 400}}) as long:
            next(long.iter_lines())  # the only slot is taken
            with pytest.raises(ollama.ResponseError) as e:
                client.generate(model="tiny", prompt="Hi")
            assert e.value.status_code == 429 and "capacity" in e.value.error


def test_engine_failure_is_an_ollama_error(setup, monkeypatch):
    srv, client, oa, model, tok, app = setup
    engine = app.state.engine
    _wait_idle(engine)

    def broken(seq, logits, biased=False):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_choose", broken)
    with pytest.raises(ollama.ResponseError) as e:  # streamed: an {"error": ...} line ends the stream
        list(client.chat(model="tiny", messages=MSG, stream=True, options={"num_predict": 4}))
    assert "internal error while sampling (RuntimeError)" in e.value.error
    r = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "Hi", "stream": False})
    assert r.status_code == 500 and "internal error" in r.json()["error"]
    monkeypatch.undo()
    assert client.generate(model="tiny", prompt="Hi", options={"num_predict": 2}).eval_count == 2


def test_fuzzed_bodies_never_give_5xx(setup):
    """Valid bodies with one field replaced by a value of a random JSON type: always 200 or 4xx `{"error": str}`."""
    srv = setup[0]
    rng = random.Random(0)
    values = [None, True, 0, -1, 1.5, float("1e300"), "", "x", "json", [], [1], ["a"], {}, {"a": 1},
              {"type": "object"}, 10**30, [{"role": "user"}], [{"role": "user", "content": 5}]]
    bases = {"/api/chat": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                           "options": {"num_predict": 1}},
             "/api/generate": {"model": "tiny", "prompt": "Hi", "stream": False, "options": {"num_predict": 1}},
             "/api/show": {"model": "tiny"}}
    fields = ["model", "messages", "prompt", "stream", "options", "format", "system", "raw", "context", "keep_alive",
              "images", "think", "template", "suffix", "tools", "options.temperature", "options.num_predict",
              "options.stop", "options.seed", "options.num_ctx", "options.top_k", "options.mirostat"]
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for _ in range(150):
            path = rng.choice(list(bases))
            body = json.loads(json.dumps(bases[path]))
            name, value = rng.choice(fields), rng.choice(values)
            if name.startswith("options."):
                body.setdefault("options", {})["num_predict"] = 1
                body["options"][name[8:]] = value
            else:
                body[name] = value
            if isinstance(body.get("options"), dict) and name != "options.num_predict":
                body["options"]["num_predict"] = 1  # fast: one token
            r = http.post(path, json=body)
            assert r.status_code < 500, (path, body, r.text)
            if r.status_code >= 400:
                assert isinstance(r.json()["error"], str), (path, body, r.text)
