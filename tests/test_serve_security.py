"""The server against hostile browsers and clients (issue 23), each on a real uvicorn server on 127.0.0.1:

- DNS rebinding: a Host header that names no loopback address, the bound address or an --allowed-host gets 403
  in the OpenAI envelope; localhost/127.x/[::1] with or without a port pass.
- A cross-site "simple request" (text/plain, form-encoded or no Content-Type) gets 415 and runs no generation.
- Slow clients: 50 connections that send half a request line and stall, one that trickles a byte at a time, one
  that stalls mid-body, and one that starts a second request on a kept-alive connection all get 408 after the
  header/body timeout, while a normal request is served meanwhile; connections past the cap get 503.
- A client that drops mid-body is one log line, never a traceback.
- Every response (the chat page, JSON, errors, raw 408/503) carries X-Frame-Options: DENY,
  Content-Security-Policy frame-ancestors 'none' and X-Content-Type-Options: nosniff.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import select
import socket
import time

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest
import torch

import pocketlm
from pocketlm import Tokenizer
from pocketlm.errors import ConfigError
from pocketlm.serve import commands
from pocketlm.serve.app import BackgroundServer, HostPolicy, ServerConfig, create_app, default_max_connections

C, P = "/v1/chat/completions", "/v1/completions"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TIMEOUT = 1.5  # header and body timeout of the `srv` server (seconds)


@pytest.fixture(scope="module")
def model_tok():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield pocketlm.load("tiny"), Tokenizer.default()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def srv(model_tok):
    """A server with short timeouts (TIMEOUT for headers and body, 1 s keep-alive), room for 200 connections."""
    app = create_app(*model_tok, ServerConfig(model_name="tiny", max_slots=2, context_length=256,
                                              header_timeout=TIMEOUT, body_timeout=TIMEOUT, keep_alive_timeout=1.0,
                                              max_connections=200))
    with BackgroundServer(app) as s:
        yield s, app


class _Records(logging.Handler):
    """Every record of the server's loggers (uvicorn's do not propagate to the root logger: caplog misses them)."""

    NAMES = ("uvicorn", "uvicorn.error", "uvicorn.access", "pocketlm.serve")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @contextlib.contextmanager
    def attached(self):
        loggers = [logging.getLogger(n) for n in self.NAMES]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(self)
        logging.getLogger("pocketlm.serve").setLevel(logging.INFO)
        try:
            yield self
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(self)
                lg.setLevel(level)


def _connect(url: str, timeout: float = 10) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _parse(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def _assert_security_headers(headers) -> None:
    assert headers["x-frame-options"] == "DENY", headers
    assert headers["x-content-type-options"] == "nosniff", headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"], headers


def _assert_envelope(body: dict, code: str | None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


# ---- DNS rebinding: the Host header --------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example",
                                  "127.0.0.1.evil.example", "evil.localhost", "10.0.0.1", "localhost:abc",
                                  "[::1", "localhost@evil.example"])
def test_a_foreign_host_header_gets_403(srv, host):
    s, app = srv
    steps = app.state.engine.stats()["steps"]
    for method, path, body in (("GET", "/health", None), ("GET", "/", None), ("GET", "/v1/models", None),
                               ("POST", C, CHAT)):
        r = httpx.request(method, s.url + path, json=body, headers={"Host": host}, timeout=10)
        assert r.status_code == 403, (host, path, r.status_code, r.text[:200])
        _assert_envelope(r.json(), "host_not_allowed")
        assert r.json()["error"]["type"] == "permission_error" and "--allowed-host" in r.json()["error"]["message"]
        _assert_security_headers(r.headers)
    assert app.state.engine.stats()["steps"] == steps  # nothing was generated


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LocalHost:1", "localhost.", "127.0.0.1",
                                  "127.0.0.1:8000", "127.1.2.3:80", "[::1]", "[::1]:8000", "::1", None])
def test_loopback_host_headers_are_served(srv, host):
    s, _ = srv
    headers = {} if host is None else {"Host": host}
    r = httpx.get(s.url + "/health", headers=headers, timeout=10)
    assert r.status_code == 200, (host, r.text[:200])
    r = httpx.post(s.url + C, json=CHAT, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text[:200]


def test_http10_request_without_host_is_served(srv):
    s, _ = srv
    with _connect(s.url) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        raw = _read_all(sock)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]


def test_allowed_hosts_extend_the_loopback_names(model_tok):
    app = create_app(*model_tok, ServerConfig(model_name="tiny", max_slots=1, context_length=128,
                                              allowed_hosts=["my-box.lan", "*.example.org"]))
    with BackgroundServer(app) as s:
        def status(host):
            return httpx.get(s.url + "/health", headers={"Host": host}, timeout=10).status_code
        assert status("my-box.lan:8000") == 200 and status("MY-BOX.LAN") == 200
        assert status("api.example.org") == 200 and status("a.b.example.org:1") == 200
        assert status("localhost:8000") == 200
        assert status("example.org") == 403 and status("my-box.lan.evil.example") == 403
        assert status("evilexample.org") == 403


def test_host_policy_rules():
    local = HostPolicy([], "127.0.0.1")
    assert local.allows("localhost:8000") and local.allows("[::1]:1") and local.allows("127.9.9.9")
    assert local.allows("[::ffff:127.0.0.1]:80") and local.allows(None)
    assert not local.allows("192.168.1.5:8000") and not local.allows("evil.example") and not local.allows("")
    lan = HostPolicy([], "192.168.1.5")  # a specific bind address is a valid Host too
    assert lan.allows("192.168.1.5:8000") and lan.allows("localhost") and not lan.allows("192.168.1.6")
    named = HostPolicy([], "my-box.lan")
    assert named.allows("my-box.lan:8000") and not named.allows("evil.example")
    any_ip = HostPolicy([], "0.0.0.0")  # wildcard bind: address literals cannot be rebound, names still can
    assert any_ip.allows("192.168.1.5:8000") and any_ip.allows("[fe80::1]:80") and not any_ip.allows("evil.example")
    v6 = HostPolicy(["[2001:db8::1]", "10.1.2.3"], "::1")
    assert v6.allows("[2001:db8:0::1]:80") and v6.allows("10.1.2.3") and not v6.allows("10.1.2.4")
    off = HostPolicy(["*"])
    assert off.any and off.allows("evil.example")
    for bad in ("http://x.example", "x.example:80", "x.example/path", "", "a b", "*.", "*"*3):
        with pytest.raises(ConfigError, match="allowed host"):
            HostPolicy([bad])


# ---- cross-site "simple requests": the Content-Type ---------------------------------------------------------------

@pytest.mark.parametrize("path", [C, P])
@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", None])
def test_a_body_that_is_not_json_gets_415_and_no_generation(srv, path, content_type):
    s, app = srv
    body = json.dumps(CHAT if path == C else {"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    before = (app.state.engine.stats()["steps"], app.state.metrics.prompt_tokens)
    r = httpx.post(s.url + path, content=body, headers=headers, timeout=10)
    assert r.status_code == 415, r.text[:200]
    _assert_envelope(r.json(), "unsupported_media_type")
    assert "application/json" in r.json()["error"]["message"]
    assert (app.state.engine.stats()["steps"], app.state.metrics.prompt_tokens) == before


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_content_types_are_served(srv, content_type):
    s, _ = srv
    r = httpx.post(s.url + C, content=json.dumps(CHAT).encode(), headers={"Content-Type": content_type},
                   timeout=30)
    assert r.status_code == 200, r.text[:200]


# ---- slow clients: header/body/idle timeouts, connection cap ------------------------------------------------------

def test_stalled_and_trickling_clients_get_408_while_others_are_served(srv):
    s, _ = srv
    t0 = time.monotonic()
    stalled = []
    for _ in range(50):
        sock = _connect(s.url)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        stalled.append(sock)
    idle = _connect(s.url)  # sends nothing at all
    r = httpx.get(s.url + "/health", timeout=5)  # served while 51 connections hang
    assert r.status_code == 200 and time.monotonic() - t0 < TIMEOUT
    trickle = _connect(s.url)
    t_trickle = time.monotonic()
    for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow":  # a byte per 0.05 s: 2.7 s
        if _readable(trickle):
            break  # the server has answered
        trickle.sendall(bytes([b]))
        time.sleep(0.05)
    raw = _read_all(trickle)
    # the clock runs from the connection, not from the last byte (which would never come to an end)
    assert time.monotonic() - t_trickle < TIMEOUT + 1.0, time.monotonic() - t_trickle
    answers = [raw] + [_read_all(sock) for sock in stalled]
    assert time.monotonic() - t0 < TIMEOUT + 3  # closed by the timeout, not by the test's socket timeout
    for raw in answers:
        status, headers, body = _parse(raw)
        assert status == 408 and headers["connection"] == "close", raw[:200]
        _assert_envelope(body, "request_timeout")
        _assert_security_headers(headers)
    assert _read_all(idle) == b""  # nothing to answer: just closed
    for sock in stalled + [idle, trickle]:
        sock.close()
    assert httpx.get(s.url + "/health", timeout=5).status_code == 200


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_body_that_stalls_gets_408_and_one_log_line(srv):
    s, app = srv
    steps = app.state.engine.stats()["steps"]
    with _Records().attached() as logs, _connect(s.url) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        raw = _read_all(sock)
        assert TIMEOUT - 0.2 < time.monotonic() - t0 < TIMEOUT + 3
        time.sleep(0.2)
    status, headers, body = _parse(raw)
    assert status == 408 and "body" in body["error"]["message"], raw[:300]
    assert app.state.engine.stats()["steps"] == steps
    lines = [r for r in logs.records if "408" in r.getMessage() or "disconnect" in r.getMessage()]
    assert len(lines) == 1 and not any(r.exc_info for r in logs.records), [r.getMessage() for r in logs.records]


def test_kept_alive_connections_time_out_idle_and_mid_request(srv):
    s, _ = srv
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with _connect(s.url) as sock:  # idle after a response: closed by the keep-alive timeout
        sock.sendall(request)
        t0 = time.monotonic()
        raw = _read_all(sock)
        assert raw.startswith(b"HTTP/1.1 200") and raw.count(b"HTTP/1.1") == 1
        assert time.monotonic() - t0 < 3
    with _connect(s.url) as sock:  # a second request that stalls half-way: 408, like a first one
        sock.sendall(request + b"GET /health HTTP/1.1\r\nHo")
        raw = _read_all(sock)
        assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in raw, raw[-300:]


def test_connections_past_the_cap_get_503_and_service_resumes(model_tok):
    app = create_app(*model_tok, ServerConfig(model_name="tiny", max_slots=1, context_length=128,
                                              header_timeout=5.0, max_connections=8))
    with BackgroundServer(app) as s:
        held = [_connect(s.url) for _ in range(8)]
        deadline = time.monotonic() + 5
        while True:  # accepted in order: the 9th connection is over the cap once the server has seen all 8
            with _connect(s.url) as probe:
                probe.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                raw = _read_all(probe)
            if raw.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        status, headers, body = _parse(raw)
        assert status == 503 and headers["retry-after"] == "1", raw[:300]
        _assert_envelope(body, "server_overloaded")
        _assert_security_headers(headers)
        r = httpx.get(s.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        for sock in held:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200


def test_oversized_or_malformed_request_heads_get_400_in_the_envelope(srv):
    s, _ = srv
    # a head still growing past 16 KiB (h11 limits what it buffers while waiting for the end of the head)
    for head in (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000,
                 b"NOT HTTP AT ALL\r\n\r\n"):
        with _connect(s.url) as sock:
            sock.sendall(head)
            status, headers, body = _parse(_read_all(sock))
        assert status == 400 and headers["connection"] == "close"
        _assert_envelope(body, None)
        _assert_security_headers(headers)
    assert httpx.get(s.url + "/health", timeout=5).status_code == 200


def test_running_out_of_file_descriptors_is_one_warning_not_a_traceback_per_connection():
    from pocketlm.serve.app import _OutOfDescriptors

    forwarded = []
    handler = _OutOfDescriptors(lambda loop, context: forwarded.append(context))
    context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    with _Records().attached() as logs:
        for _ in range(2048):  # asyncio reports once per pending connection, up to the listen backlog
            handler(None, context)
        handler(None, {"message": "something else"})
    lines = [r.getMessage() for r in logs.records]
    assert len(lines) == 1 and "Too many open files" in lines[0] and "--max-connections" in lines[0], lines
    assert not any(r.exc_info for r in logs.records) and forwarded == [{"message": "something else"}]


def test_default_connection_cap_follows_the_open_file_limit(monkeypatch):
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (200, 4096))
    assert default_max_connections() == 100
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1_048_576, 1_048_576))
    assert default_max_connections() == 256
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert default_max_connections() == 256


# ---- a client that drops mid-body ---------------------------------------------------------------------------------

def test_a_client_that_drops_mid_body_is_one_log_line(srv):
    s, app = srv
    with _Records().attached() as logs:
        with _connect(s.url) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
            time.sleep(0.1)
        deadline = time.monotonic() + 5
        while not any("disconnect" in r.getMessage() for r in logs.records) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a traceback would come right after
    messages = [r.getMessage() for r in logs.records]
    assert not any(r.exc_info for r in logs.records), messages
    assert not any("Traceback" in m or "unhandled" in m or "Exception" in m for m in messages), messages
    gone = [m for m in messages if "disconnect" in m]
    assert len(gone) == 1 and "\n" not in gone[0] and "10 of 1000" in gone[0], messages
    assert httpx.get(s.url + "/health", timeout=5).json()["active"] == 0


# ---- framing and sniffing ------------------------------------------------------------------------------------------

def test_every_response_forbids_framing_and_sniffing(srv):
    s, _ = srv
    page = httpx.get(s.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    _assert_security_headers(page.headers)
    csp = page.headers["content-security-policy"]  # merged into the page's own policy, which still holds
    assert "default-src 'self'" in csp and csp.count("frame-ancestors") == 1
    assert len(page.headers.get_list("content-security-policy")) == 1
    for r in (httpx.get(s.url + "/health"), httpx.get(s.url + "/v1/models"), httpx.get(s.url + "/metrics"),
              httpx.get(s.url + "/nothing"), httpx.post(s.url + C, content=b"{}"),
              httpx.post(s.url + C, json=CHAT, timeout=30)):
        _assert_security_headers(r.headers)
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'"
    with httpx.stream("POST", s.url + C, json={**CHAT, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        _assert_security_headers(r.headers)
        r.read()


# ---- the CLI -------------------------------------------------------------------------------------------------------

def _args(*argv):
    p = argparse.ArgumentParser()
    commands.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_flags_parse_and_are_documented():
    a = _args("--allowed-host", "a.example", "--allowed-host", "*.b.example", "--header-timeout", "3",
              "--body-timeout", "20", "--keep-alive-timeout", "2", "--max-connections", "50")
    assert a.allowed_host == ["a.example", "*.b.example"] and a.header_timeout == 3 and a.body_timeout == 20
    assert a.keep_alive_timeout == 2 and a.max_connections == 50
    d = _args()
    assert d.allowed_host == [] and d.header_timeout == 10 and d.body_timeout == 60 and d.max_connections is None
    p = argparse.ArgumentParser()
    commands.add_arguments(p)
    text = " ".join(p.format_help().split())
    for flag in ("--allowed-host", "--header-timeout", "--body-timeout", "--keep-alive-timeout", "--max-connections",
                 "DNS rebinding", "408", "503"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, match", [
    (("--allowed-host", "http://evil.example"), "http://evil.example"),
    (("--allowed-host", "x.example:80"), "x.example:80"),
    (("--header-timeout", "0"), "--header-timeout 0"),
    (("--body-timeout", "-1"), "--body-timeout -1"),
    (("--keep-alive-timeout", "1e9"), "--keep-alive-timeout"),
    (("--max-connections", "0"), "--max-connections 0"),
])
def test_cli_refuses_bad_values_before_loading_a_model(argv, match):
    with pytest.raises(ConfigError, match=match.replace("*", r"\*")):
        commands.run(_args("does-not-exist", *argv))


def test_create_app_refuses_bad_limits(model_tok):
    for kw, match in (({"header_timeout": 0}, "header_timeout 0"), ({"max_connections": 0}, "max_connections 0"),
                      ({"allowed_hosts": ["a/b"]}, "a/b")):
        with pytest.raises(ConfigError, match=match):
            create_app(*model_tok, ServerConfig(model_name="tiny", context_length=128, **kw))
