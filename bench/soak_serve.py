"""Soak and fuzz `pocketlm serve` (RELIABILITY.md §6 items 14 and 18) through a real server process on 127.0.0.1.

Soak: `--requests` requests (default 10,000) from `--concurrency` clients (default 32) over the four generation
routes, /v1/chat/completions, /v1/completions, /api/chat and /api/generate, from a seeded plan:
- about 20% invalid bodies from a catalogue (malformed JSON, wrong types, out-of-range values, unknown model,
  missing fields, a text/plain body, a prompt over the context, ...), each of which must get a 4xx;
- valid requests with random `n` (OpenAI routes), 1 to `--max-tokens` tokens, mixed sampling options, shared
  system prompts, half of them streamed (SSE ending in `data: [DONE]`; Ollama NDJSON ending in a `done: true`
  line);
- about 10% of the streams dropped after 1-3 chunks and ~3% of the non-streamed requests abandoned after a short
  client timeout (deliberate disconnects).
Pass: 0 responses >= 500 and 0 mid-stream error events; no stream lost (every stream that was not dropped on
purpose ends properly); no slot held after the run (active slots and queue back to 0); the server log has no
traceback; resident memory (RSS of the server process, sampled every `--sample-s` seconds and plotted) flat
after warm-up: growth < 5% between the idle server after the first `--warmup` requests and the idle server at
the end (both measured after the in-flight requests have drained, so like is compared with like), counted less
the bounded caches the server reports in /health (`prefix_bytes`: the prefix cache fills to its cap, 32 MiB for
`tiny`, over thousands of requests by design; the raw RSS growth is reported and plotted beside it).

Fuzz: `--fuzz` bodies (default 2,000) generated from the four request schemas (SCHEMAS): a valid body with 0-3
mutations -- wrong types, huge/negative/boundary numbers, NaN/Infinity, unicode (special-token text, controls,
lone surrogates), long strings, nested junk, missing required fields, extra fields -- plus raw-byte mutations
(truncated JSON, invalid UTF-8, deep nesting). Valid bases ask for 1-8 tokens, so only a mutation that lifts the
cap generates up to the context. Pass: 0 responses >= 500, 0 error events in a 200 stream, 0 hung requests (no
byte for > 10 s: waiting for the response head, or a gap within a body), /health 200 afterwards.

    python bench/soak_serve.py [--requests 10000] [--concurrency 32] [--warmup 1000] [--fuzz 2000] [--seed 0]
                               [--model tiny] [--max-tokens 12] [--max-slots 16] [--context-length 128]
                               [--out-dir bench/results]

Prints a table and writes soak_serve.json and soak_serve.png (RSS against requests completed) to --out-dir.
Exit status 1 when a pass condition fails. Every case is reproducible from (seed, index): `plan_soak` and
`fuzz_cases` are pure functions of them. tests/test_serve_soak.py runs a short version of the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:  # the HTTP client openai>=3 depends on; older openai releases use httpx, the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

MODEL_NAME = "soak"
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "ollama_chat": "/api/chat",
          "ollama_generate": "/api/generate"}
SYSTEM_PROMPTS = [  # shared prefixes: what a prefix cache would reuse
    "You are a helpful assistant. Answer briefly and precisely.",
    "You are a pirate. Every answer is one short sentence in pirate speech.",
    "You translate English into French. Reply with the translation only.",
]
TOPICS = ["the sea", "prime numbers", "a red bicycle", "tea", "the moon", "rust and iron", "owls", "bread"]
MAX_GROWTH = 0.05  # RSS growth allowed after warm-up
HUNG_S = 10.0  # a fuzz request that sends no byte for this long (head or body) counts as hung


# ---- the server process --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process `pid` (Linux /proc, else psutil when installed, else None)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - no way to measure: the RSS checks are skipped
        return None


def cache_bytes(base: str) -> int | None:
    """Bytes the server reports holding in bounded caches (the /health fields ending in `_bytes`, today the prefix
    cache's `prefix_bytes`), or None when it reports none. These fill up to their cap during a run by design, so
    the leak check subtracts them from RSS."""
    try:
        health = httpx.get(base + "/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    found = [v for k, v in health.items() if k.endswith("_bytes") and isinstance(v, int)]
    return sum(found) if found else None


class ServerProcess:
    """`pocketlm serve MODEL` in a child process on 127.0.0.1 and a free port; its stderr goes to `log_path`.

    A separate process, so its RSS is the server's alone and the client's Python does not share its GIL.
    """

    def __init__(self, model: str = "tiny", *, log_path: Path, max_slots: int = 16, max_queue: int = 256,
                 max_n: int = 8, context_length: int = 128, threads: int = 1, extra: list[str] | None = None):
        self.port = free_port()
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", "pocketlm.cli", "serve", model, "--name", MODEL_NAME,
                    "--port", str(self.port), "--max-slots", str(max_slots), "--max-queue", str(max_queue),
                    "--max-n", str(max_n), "--context-length", str(context_length), "--threads", str(threads),
                    "--log-level", "warning"] + list(extra or [])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self._log, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"server did not start: {self.log_tail()}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def rss(self) -> int | None:
        return rss_bytes(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def tracebacks(self) -> list[str]:
        """Each traceback in the server log, with the 3 lines before it (the logged message)."""
        lines = self.log_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            if line.startswith("Traceback (most recent call last)"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")):
                    j += 1
                out.append("\n".join(lines[max(0, i - 3):j + 1]))
        return out


# ---- the soak plan ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One planned request. `body` is sent as JSON unless `raw` (bytes) is given."""

    index: int
    route: str  # a key of ROUTES
    body: dict | list | None = None
    raw: bytes | None = None
    content_type: str = "application/json"
    stream: bool = False
    sequences: int = 1  # choices expected (n x prompts), for the OpenAI routes
    invalid: str | None = None  # what is wrong with it (expects a 4xx)
    expect_status: int = 200
    drop_after: int | None = None  # streams: close after this many chunks
    abandon_s: float | None = None  # non-streamed: give up after this many seconds

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body, allow_nan=True).encode()


def _messages(rng: random.Random) -> list[dict]:
    out = []
    if rng.random() < 0.6:
        out.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    topic = rng.choice(TOPICS)
    if rng.random() < 0.25:  # a multi-turn conversation resent by a chat client
        out += [{"role": "user", "content": f"Tell me about {topic}."},
                {"role": "assistant", "content": f"{topic.capitalize()} is a fine subject."}]
    out.append({"role": "user", "content": f"Request {rng.randrange(10**6)}: one fact about {topic}, please."})
    return out


def _valid_openai(rng: random.Random, route: str, max_tokens: int) -> tuple[dict, int]:
    body: dict = {"model": MODEL_NAME, "max_tokens": rng.randint(1, max_tokens),
                  "temperature": rng.choice([0, 0, 0.7, 1.0]), "seed": rng.randrange(2**31)}
    prompts = 1
    if route == "chat":
        body["messages"] = _messages(rng)
        if rng.random() < 0.15:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
        if rng.random() < 0.05:
            body["response_format"] = {"type": "json_object"}
    else:
        r = rng.random()
        if r < 0.55:
            body["prompt"] = f"Once upon a time, {rng.choice(TOPICS)}"
        elif r < 0.75:
            body["prompt"] = [f"Item {rng.randrange(100)}:", f"A note on {rng.choice(TOPICS)}:"]
            prompts = 2
        else:
            body["prompt"] = [rng.randrange(200, 30000) for _ in range(rng.randint(1, 20))]
        if rng.random() < 0.15:
            body["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.1:
            body["echo"] = True
    n = rng.choice([1, 1, 1, 1, 2, 2, 3, 4])
    if n > 1 or rng.random() < 0.2:
        body["n"] = n
    if rng.random() < 0.15:
        body["stop"] = rng.choice(["\n", ["\n\n", "."], "the"])
    if rng.random() < 0.1:
        body["top_p"] = 0.9
    if rng.random() < 0.1:
        body["top_k"] = 20
    if rng.random() < 0.05:
        body["logit_bias"] = {"32007": -100, "29871": 5}
    if rng.random() < 0.05:
        body["presence_penalty"], body["frequency_penalty"] = 0.5, 0.3
    return body, n * prompts


def _valid_ollama(rng: random.Random, route: str, max_tokens: int) -> dict:
    body: dict = {"model": rng.choice([MODEL_NAME, MODEL_NAME + ":latest"])}
    options: dict = {"num_predict": rng.randint(1, max_tokens), "seed": rng.randrange(2**31),
                     "temperature": rng.choice([0, 0, 0.8])}
    if rng.random() < 0.2:
        options.update(top_k=40, top_p=0.9, repeat_penalty=1.1)
    if rng.random() < 0.1:
        options["stop"] = ["\n"]
    if route == "ollama_chat":
        body["messages"] = _messages(rng)
    else:
        body["prompt"] = f"Write about {rng.choice(TOPICS)}."
        r = rng.random()
        if r < 0.2:
            body["system"] = rng.choice(SYSTEM_PROMPTS)
        elif r < 0.3:
            body["raw"] = True
        elif r < 0.4:
            body["context"] = [rng.randrange(200, 30000) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.05:
        body["format"] = "json"
    if rng.random() < 0.1:
        body["keep_alive"] = "5m"
    body["options"] = options
    return body


def _invalid(rng: random.Random, route: str, context_length: int) -> tuple[str, dict | None, bytes | None, str, int]:
    """(label, body or None, raw bytes or None, content type, expected status) of a request that must be refused."""
    m = MODEL_NAME
    msgs = [{"role": "user", "content": "hi"}]
    common = [
        ("malformed JSON", None, b'{"model": "soak", "messages": [', "application/json", 400),
        ("body is an array", [1, 2, 3], None, "application/json", 400),
        ("text/plain body", None, b'{"model": "soak"}', "text/plain", 415),
        ("deep nesting", None, b"[" * 50000 + b"]" * 50000, "application/json", 400),
        ("invalid UTF-8", None, b'{"model": "soak", "prompt": "\xff\xfe"}', "application/json", 400),
        ("lone surrogate", None, b'{"model": "soak", "messages": [{"role": "user", "content": "\\ud800"}], '
                                 b'"prompt": "\\udfff"}', "application/json", 400),
    ]
    long_text = "hello " * (context_length * 2)
    if route == "chat":
        table = [
            ("unknown model", {"model": "nope", "messages": msgs}, None, "application/json", 404),
            ("messages missing", {"model": m}, None, "application/json", 400),
            ("messages empty", {"model": m, "messages": []}, None, "application/json", 400),
            ("unknown role", {"model": m, "messages": [{"role": "wizard", "content": "x"}]}, None,
             "application/json", 400),
            ("max_tokens 0", {"model": m, "messages": msgs, "max_tokens": 0}, None, "application/json", 400),
            ("max_tokens negative", {"model": m, "messages": msgs, "max_tokens": -186}, None, "application/json", 400),
            ("temperature 3", {"model": m, "messages": msgs, "temperature": 3}, None, "application/json", 400),
            ("n 99", {"model": m, "messages": msgs, "n": 99}, None, "application/json", 400),
            ("top_p 0", {"model": m, "messages": msgs, "top_p": 0}, None, "application/json", 400),
            ("5 stops", {"model": m, "messages": msgs, "stop": list("abcde")}, None, "application/json", 400),
            ("logit_bias key", {"model": m, "messages": msgs, "logit_bias": {"abc": 1}}, None, "application/json", 400),
            ("seed 2^64", {"model": m, "messages": msgs, "seed": 2**64}, None, "application/json", 400),
            ("prompt over context", {"model": m, "messages": [{"role": "user", "content": long_text}]}, None,
             "application/json", 400),
            ("max_tokens over context", {"model": m, "messages": msgs, "max_tokens": 10**6}, None,
             "application/json", 400),
            ("stream not a boolean", {"model": m, "messages": msgs, "stream": "yes"}, None, "application/json", 400),
            ("tools", {"model": m, "messages": msgs, "tools": [{"type": "function"}]}, None, "application/json", 400),
        ]
    elif route == "completions":
        table = [
            ("unknown model", {"model": "nope", "prompt": "x"}, None, "application/json", 404),
            ("prompt missing", {"model": m}, None, "application/json", 400),
            ("prompt empty list", {"model": m, "prompt": []}, None, "application/json", 400),
            ("token id outside vocab", {"model": m, "prompt": [99999999]}, None, "application/json", 400),
            ("empty id list", {"model": m, "prompt": [[]]}, None, "application/json", 400),
            ("logprobs 10", {"model": m, "prompt": "x", "logprobs": 10}, None, "application/json", 400),
            ("best_of 3", {"model": m, "prompt": "x", "best_of": 3}, None, "application/json", 400),
            ("suffix", {"model": m, "prompt": "x", "suffix": "y"}, None, "application/json", 400),
            ("prompt over context", {"model": m, "prompt": long_text}, None, "application/json", 400),
            ("n x prompts over max_n", {"model": m, "prompt": ["a", "b", "c"], "n": 4}, None, "application/json", 400),
            ("temperature NaN", None, b'{"model": "soak", "prompt": "x", "temperature": NaN}', "application/json", 400),
        ]
    elif route == "ollama_chat":
        table = [
            ("unknown model", {"model": "nope", "messages": msgs}, None, "application/json", 404),
            ("model missing", {"messages": msgs}, None, "application/json", 400),
            ("messages a string", {"model": m, "messages": "hi"}, None, "application/json", 400),
            ("option wrong type", {"model": m, "messages": msgs, "options": {"temperature": "hot"}}, None,
             "application/json", 400),
            ("num_predict 0", {"model": m, "messages": msgs, "options": {"num_predict": 0}}, None,
             "application/json", 400),
            ("options a string", {"model": m, "messages": msgs, "options": "x"}, None, "application/json", 400),
            ("think", {"model": m, "messages": msgs, "think": True}, None, "application/json", 400),
            ("format a number", {"model": m, "messages": msgs, "format": 5}, None, "application/json", 400),
            ("images", {"model": m, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, None,
             "application/json", 400),
            ("stream not a boolean", {"model": m, "messages": msgs, "stream": "no"}, None, "application/json", 400),
            ("prompt over context", {"model": m, "messages": [{"role": "user", "content": long_text}]}, None,
             "application/json", 400),
        ]
    else:
        table = [
            ("unknown model", {"model": "nope", "prompt": "x"}, None, "application/json", 404),
            ("prompt a number", {"model": m, "prompt": 5}, None, "application/json", 400),
            ("context not ids", {"model": m, "prompt": "x", "context": ["a"]}, None, "application/json", 400),
            ("suffix", {"model": m, "prompt": "x", "suffix": "y"}, None, "application/json", 400),
            ("raw not a boolean", {"model": m, "prompt": "x", "raw": "yes"}, None, "application/json", 400),
            ("mirostat", {"model": m, "prompt": "x", "options": {"mirostat": 2}}, None, "application/json", 400),
            ("seed a float", {"model": m, "prompt": "x", "options": {"seed": 1.5}}, None, "application/json", 400),
            ("prompt over context", {"model": m, "prompt": long_text}, None, "application/json", 400),
        ]
    return rng.choice(common + table)


def plan_soak(count: int, seed: int, *, max_tokens: int = 12, context_length: int = 128, invalid_rate: float = 0.2,
              drop_rate: float = 0.1, abandon_rate: float = 0.03) -> list[Case]:
    """The soak's requests: a pure function of its arguments (case i uses its own Random(seed, i))."""
    cases = []
    for i in range(count):
        rng = random.Random(f"{seed}:{i}")
        route = rng.choice(list(ROUTES))
        if rng.random() < invalid_rate:
            label, body, raw, ctype, status = _invalid(rng, route, context_length)
            cases.append(Case(i, route, body=body, raw=raw, content_type=ctype, invalid=label, expect_status=status))
            continue
        if route in ("chat", "completions"):
            body, seqs = _valid_openai(rng, route, max_tokens)
            stream = rng.random() < 0.5
            body["stream"] = stream
            if stream and rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        else:
            body, seqs = _valid_ollama(rng, route, max_tokens), 1
            r = rng.random()
            stream = r < 0.5
            if r < 0.25:
                pass  # Ollama streams by default
            else:
                body["stream"] = stream
        case = Case(i, route, body=body, stream=stream, sequences=seqs)
        if stream and rng.random() < drop_rate:
            case.drop_after = rng.randint(1, 3)
        elif not stream and rng.random() < abandon_rate:
            case.abandon_s = rng.choice([0.01, 0.05, 0.1])
        cases.append(case)
    return cases


# ---- running one request ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    route: str
    status: int | None = None  # None: no response (transport error or abandoned before the head)
    stream: bool = False
    completed: bool = False  # a proper end: [DONE] / done:true with every choice finished, or a whole JSON body
    dropped: bool = False  # we closed it on purpose before its end
    problems: list[str] = field(default_factory=list)  # anything wrong (a lost stream, an error event, ...)
    seconds: float = 0.0
    invalid: str | None = None
    tokens: int = 0


def _check_sse(text: str, sequences: int, out: Outcome) -> None:
    """A whole SSE body: every event `data: {json}`, all choices finished, `data: [DONE]` last."""
    events = text.split("\n\n")
    if events and events[-1] == "":
        events.pop()
    else:
        out.problems.append(f"SSE body does not end with a blank line: {text[-120:]!r}")
    finished = set()
    for k, ev in enumerate(events):
        if not ev.startswith("data: "):
            out.problems.append(f"not an SSE data event: {ev[:120]!r}")
            continue
        data = ev[6:]
        if data == "[DONE]":
            if k != len(events) - 1:
                out.problems.append("events after [DONE]")
            out.completed = k == len(events) - 1
            continue
        obj = json.loads(data)
        if "error" in obj:
            out.problems.append(f"error event in the stream: {data[:300]}")
        for c in obj.get("choices", []):
            if c.get("finish_reason") is not None:
                finished.add(c["index"])
            if c.get("delta", {}).get("content") or c.get("text"):
                out.tokens += 1
    if out.completed and finished != set(range(sequences)):
        out.problems.append(f"choices finished {sorted(finished)} of {sequences}")
        out.completed = False


def _check_ndjson(text: str, out: Outcome) -> None:
    """A whole NDJSON body: JSON lines, the last one `done: true` with a done_reason."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        out.problems.append(f"NDJSON body does not end with a newline: {text[-120:]!r}")
    for k, line in enumerate(lines):
        obj = json.loads(line)
        if "error" in obj:
            out.problems.append(f"error line in the stream: {line[:300]}")
        elif obj.get("done"):
            if k != len(lines) - 1:
                out.problems.append("lines after done: true")
            elif not obj.get("done_reason"):
                out.problems.append("the done line has no done_reason")
            else:
                out.completed = True
        else:
            out.tokens += 1


def _check_json(route: str, obj, sequences: int, out: Outcome) -> None:
    if route in ("chat", "completions"):
        choices = obj.get("choices", [])
        if len(choices) != sequences or any(c.get("finish_reason") is None for c in choices):
            out.problems.append(f"{len(choices)} choices (want {sequences}) or one unfinished: {str(obj)[:300]}")
            return
        out.tokens = obj.get("usage", {}).get("completion_tokens", 0)
    elif not obj.get("done") or not obj.get("done_reason"):
        out.problems.append(f"Ollama reply not done: {str(obj)[:300]}")
        return
    else:
        out.tokens = obj.get("eval_count", 0)
    out.completed = True


async def run_case(client: httpx.AsyncClient, base: str, case: Case, timeout: float = 120.0) -> Outcome:
    """Send `case` and judge what came back; never raises for what the server did."""
    out = Outcome(case.index, case.route, stream=case.stream, invalid=case.invalid)
    url = base + ROUTES[case.route]
    headers = {"content-type": case.content_type}
    t0 = time.perf_counter()
    try:
        if case.stream and case.invalid is None:
            async with client.stream("POST", url, content=case.payload(), headers=headers, timeout=timeout) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    body = await r.aread()
                    out.problems.append(f"HTTP {r.status_code}: {body[:300]!r}")
                else:
                    chunks = []
                    async for chunk in r.aiter_text():
                        chunks.append(chunk)
                        if case.drop_after is not None and len(chunks) >= case.drop_after:
                            out.dropped = True
                            break
                    if not out.dropped:
                        text = "".join(chunks)
                        if case.route in ("chat", "completions"):
                            _check_sse(text, case.sequences, out)
                        else:
                            _check_ndjson(text, out)
                        if not out.completed and not out.problems:
                            out.problems.append(f"stream lost: ended without its last event: {text[-200:]!r}")
        else:
            t = case.abandon_s if case.abandon_s is not None else timeout
            r = await client.post(url, content=case.payload(), headers=headers, timeout=t)
            out.status = r.status_code
            if case.invalid is not None:
                if not 400 <= r.status_code < 500:
                    out.problems.append(f"invalid body ({case.invalid}) answered {r.status_code}: {r.text[:300]}")
                else:
                    out.completed = True
            elif r.status_code != 200:
                out.problems.append(f"HTTP {r.status_code}: {r.text[:300]}")
            else:
                _check_json(case.route, r.json(), case.sequences, out)
    except httpx.TimeoutException:
        if case.abandon_s is not None:
            out.dropped = True
        else:
            out.problems.append(f"no answer within {timeout} s")
    except (httpx.TransportError, ValueError) as e:  # ValueError: a body that is not JSON
        out.problems.append(f"{type(e).__name__}: {str(e)[:300]}")
    out.seconds = time.perf_counter() - t0
    return out


# ---- RSS sampling and the plot ---------------------------------------------------------------------------------------


class RssSampler:
    """A thread that records (seconds, requests completed, RSS bytes, cache bytes or None) of the server every
    `period` seconds."""

    def __init__(self, server: "ServerProcess", period: float, progress):
        self.server, self.period, self.progress = server, period, progress
        self.samples: list[tuple[float, int, int, int | None]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int | None, int | None]:
        rss, cache = self.server.rss(), cache_bytes(self.server.url)
        if rss is not None:
            self.samples.append((time.perf_counter() - self._t0, self.progress(), rss, cache))
        return rss, cache

    def _run(self):
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def plot_rss(samples: list[tuple], marks: dict, path: Path, title: str) -> None:
    """RSS (MiB) against requests completed; RSS less the server's bounded caches when it reports them; the
    warm-up mark and the +5% band over the idle value after warm-up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    xs = [s[1] for s in samples]
    ax.plot(xs, [s[2] / 2**20 for s in samples], lw=1.2, label="server RSS")
    net = [(s[1], (s[2] - s[3]) / 2**20) for s in samples if s[3] is not None]
    if net:
        ax.plot([x for x, _ in net], [y for _, y in net], lw=1.2, color="tab:purple",
                label="RSS less the prefix cache (/health prefix_bytes)")
    base = marks.get("base_warm")
    if base:
        ax.axhline(base / 2**20, color="tab:green", ls="--", lw=1, label="idle after warm-up (leak baseline)")
        ax.axhline(base * (1 + MAX_GROWTH) / 2**20, color="tab:red", ls=":", lw=1, label=f"+{MAX_GROWTH:.0%} limit")
    if marks.get("warmup_requests"):
        ax.axvline(marks["warmup_requests"], color="gray", ls="-.", lw=1, label="end of warm-up")
    if marks.get("soak_requests") and marks.get("fuzz_bodies"):
        ax.axvspan(marks["soak_requests"], marks["soak_requests"] + marks["fuzz_bodies"], color="tab:orange",
                   alpha=0.12, label="fuzz")
    ax.set_xlabel("requests completed")
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    values = [s[2] for s in samples] + [(s[2] - s[3]) for s in samples if s[3] is not None]
    ax.set_ylim(min(values) / 2**20 * 0.95, max(max(values), (base or 0) * (1 + MAX_GROWTH)) / 2**20 * 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- driving the soak ------------------------------------------------------------------------------------------------


class Progress:
    """Requests finished so far (the RSS plot's x axis), counted across the soak and the fuzz; with `every`, a
    progress line on stderr each `every` requests (the bench runs for minutes)."""

    def __init__(self, every: int = 0, pid: int | None = None):
        self.n, self.every, self.pid, self.t0 = 0, every, pid, time.perf_counter()

    def __call__(self) -> int:
        return self.n

    def tick(self) -> None:
        self.n += 1
        if self.every and self.n % self.every == 0:
            rss = rss_bytes(self.pid) if self.pid else None
            print(f"  {self.n} requests, {time.perf_counter() - self.t0:.0f} s"
                  + (f", server RSS {rss / 2**20:.1f} MiB" if rss else ""), file=sys.stderr, flush=True)


async def _drive(base: str, cases: list[Case], concurrency: int, done: list[Outcome], progress: Progress | None,
                 request_timeout: float = 120.0) -> None:
    """Run `cases` with `concurrency` workers, appending each Outcome to `done` as it finishes."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    it = iter(cases)
    async with httpx.AsyncClient(limits=limits, timeout=request_timeout) as client:
        async def worker():
            for case in it:
                done.append(await run_case(client, base, case, request_timeout))
                if progress is not None:
                    progress.tick()
        await asyncio.gather(*[worker() for _ in range(concurrency)])


def _metrics(base: str) -> dict[str, float]:
    """The unlabelled series of /metrics (gauges and counters) by name."""
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def wait_idle(base: str, limit_s: float = 15.0) -> tuple[bool, dict]:
    """Wait until the engine holds no sequence (active and waiting 0); (idle?, last /health)."""
    deadline = time.monotonic() + limit_s
    while True:
        h = httpx.get(base + "/health", timeout=10).json()
        if h.get("active") == 0 and h.get("waiting") == 0:
            return True, h
        if time.monotonic() > deadline:
            return False, h
        time.sleep(0.05)


def _idle_rss(server: ServerProcess, sampler: RssSampler | None) -> tuple[int | None, int | None]:
    """(RSS, cache bytes) of the idle server: after the in-flight requests drained."""
    wait_idle(server.url)
    time.sleep(0.3)  # let the last responses' buffers go
    return sampler.sample() if sampler is not None else (server.rss(), cache_bytes(server.url))


def _growth(before: tuple, after: tuple) -> tuple[float | None, float | None]:
    """(raw RSS growth, growth of RSS less the bounded caches) from `before` to `after` (RSS, cache) pairs."""
    (r0, c0), (r1, c1) = before, after
    if not r0 or not r1:
        return None, None
    raw = (r1 - r0) / r0
    if c0 is None or c1 is None:
        return raw, raw
    return raw, ((r1 - c1) - (r0 - c0)) / (r0 - c0)


def run_soak(server: ServerProcess, cases: list[Case], *, concurrency: int, warmup: int,
             sampler: RssSampler | None = None, progress: Progress | None = None) -> dict:
    """Warm-up cases, drain, idle RSS; the rest, drain, idle RSS. Returns the soak's figures and failures."""
    base = server.url
    done: list[Outcome] = []
    t0 = time.perf_counter()
    asyncio.run(_drive(base, cases[:warmup], concurrency, done, progress))
    warm = _idle_rss(server, sampler)
    asyncio.run(_drive(base, cases[warmup:], concurrency, done, progress))
    wall = time.perf_counter() - t0
    idle, health = wait_idle(base)
    end = _idle_rss(server, sampler)
    statuses = Counter(str(o.status) for o in done)
    by_route = {r: Counter(str(o.status) for o in done if o.route == r) for r in ROUTES}
    streams = [o for o in done if o.stream and o.invalid is None]
    lost = [o for o in streams if not o.completed and not o.dropped]
    failures = [o for o in done if o.problems or (o.status is not None and o.status >= 500)]
    lat = sorted(o.seconds for o in done if o.completed and o.invalid is None)
    raw, net = _growth(warm, end)
    m = _metrics(base)
    return {
        "requests": len(done), "wall_s": round(wall, 2), "requests_per_s": round(len(done) / wall, 1),
        "status_counts": dict(sorted(statuses.items())), "status_by_route": {r: dict(c) for r, c in by_route.items()},
        "server_errors_5xx": sum(1 for o in done if o.status is not None and o.status >= 500),
        "invalid_sent": sum(1 for o in done if o.invalid), "invalid_refused_4xx":
            sum(1 for o in done if o.invalid and o.status is not None and 400 <= o.status < 500),
        "streams": len(streams), "streams_completed": sum(1 for o in streams if o.completed),
        "streams_dropped": sum(1 for o in streams if o.dropped), "streams_lost": len(lost),
        "nonstream_abandoned": sum(1 for o in done if o.dropped and not o.stream),
        "tokens_received": sum(o.tokens for o in done),
        "latency_p50_s": round(statistics.median(lat), 4) if lat else None,
        "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4) if lat else None,
        "engine_idle_after": idle, "health_after": health,
        "server_aborts": m.get("pocketlm_aborted_requests_total"), "engine_steps": m.get("pocketlm_engine_steps_total"),
        "rss_warm_bytes": warm[0], "rss_end_bytes": end[0], "cache_warm_bytes": warm[1], "cache_end_bytes": end[1],
        "rss_growth_raw": round(raw, 5) if raw is not None else None,
        "rss_growth": round(net, 5) if net is not None else None,  # less the bounded caches: the leak check
        "failures": [vars(o) for o in failures[:50]], "failure_count": len(failures),
    }


# ---- the fuzz --------------------------------------------------------------------------------------------------------

# Field kinds of the four request schemas (what a valid value looks like); `required` fields first.
SCHEMAS: dict[str, dict] = {
    "chat": {"required": ["model", "messages"], "fields": {
        "model": "model", "messages": "oa_messages", "max_tokens": ("int", 1, 8), "max_completion_tokens":
        ("int", 1, 8), "n": ("int", 1, 3), "temperature": ("num", 0, 2), "top_p": ("num", 0.01, 1),
        "top_k": ("int", 0, 50), "min_p": ("num", 0, 0.9), "repetition_penalty": ("num", 0.5, 2),
        "presence_penalty": ("num", -2, 2), "frequency_penalty": ("num", -2, 2), "seed": ("int", 0, 2**31),
        "stop": "stop", "stream": "bool", "stream_options": "stream_options", "logprobs": "bool",
        "top_logprobs": ("int", 0, 5), "logit_bias": "logit_bias", "response_format": "response_format",
        "user": "text", "tools": "null"}},
    "completions": {"required": ["model", "prompt"], "fields": {
        "model": "model", "prompt": "oa_prompt", "max_tokens": ("int", 1, 8), "n": ("int", 1, 3),
        "temperature": ("num", 0, 2), "top_p": ("num", 0.01, 1), "top_k": ("int", 0, 50), "seed": ("int", 0, 2**31),
        "stop": "stop", "stream": "bool", "stream_options": "stream_options", "logprobs": ("int", 0, 5),
        "echo": "bool", "logit_bias": "logit_bias", "best_of": ("int", 1, 1), "suffix": "null", "user": "text",
        "presence_penalty": ("num", -2, 2), "frequency_penalty": ("num", -2, 2)}},
    "ollama_chat": {"required": ["model", "messages"], "fields": {
        "model": "model", "messages": "ol_messages", "stream": "bool", "format": "ol_format", "options": "options",
        "keep_alive": "keep_alive", "think": "false", "tools": "null"}},
    "ollama_generate": {"required": ["model", "prompt"], "fields": {
        "model": "model", "prompt": "text", "system": "text", "raw": "bool", "context": "ids", "stream": "bool",
        "format": "ol_format", "options": "options", "keep_alive": "keep_alive", "suffix": "null",
        "template": "null", "images": "null"}},
}
OPTIONS = {"num_predict": ("int", 1, 8), "temperature": ("num", 0, 2), "top_k": ("int", 0, 50),
           "top_p": ("num", 0.01, 1), "min_p": ("num", 0, 0.9), "repeat_penalty": ("num", 0.5, 2),
           "presence_penalty": ("num", -2, 2), "frequency_penalty": ("num", -2, 2), "seed": ("int", 0, 2**31),
           "stop": "stop", "num_ctx": ("int", 16, 512), "num_thread": ("int", 1, 4), "mirostat": ("int", 0, 0),
           "repeat_last_n": ("int", -1, -1), "penalize_newline": "true"}
UNICODE = ["é", "ß", "中文", "日本語", "한국어", "🙂", "👩‍👩‍👧", "\u202e", "\u200b", "\ufeff", "\x00", "\x07", "\x1b[31m",
           "\u0301\u0301\u0301", "\U0010ffff", "\ud800", "\udfff", "<|end|>", "<|assistant|>", "<|endoftext|>",
           "<s>", "</s>", "<|system|>", "\\", '"', "\n", "\r\n", "\t", "{{", "%s", "' OR 1=1 --", "Ω" * 50]
HUGE = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63, -2**63 - 1, 10**30, 10**400, 1e308, -1e308,
        float("inf"), float("-inf"), float("nan"), 5e-324, 1e-300]
BOUNDARY = [0, 1, -1, 0.0, -0.0, 0.5, 1.0000001, 2.0000001, -2.0000001, 100, 101, -101, 255, 256, 257, 4096, 32064]


def _text(rng: random.Random, max_parts: int = 6) -> str:
    parts = [rng.choice(["hello", "write a poem", "1 + 1 =", "Ünïcödé", ""])]
    for _ in range(rng.randint(0, max_parts)):
        parts.append(rng.choice(UNICODE) if rng.random() < 0.5 else chr(rng.randrange(0x20, 0x2FFFF)))
    return "".join(parts)


def _junk(rng: random.Random, depth: int = 0):
    """A random JSON value: scalars of every type, nested lists and objects."""
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([None, True, False, 0, -1, 1.5, rng.choice(HUGE), _text(rng, 2), "", [], {}])
    if r < 0.75:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 1) or "k": _junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _nest(rng: random.Random, depth: int):
    v = rng.choice([1, "x", None])
    for _ in range(depth):
        v = [v] if rng.random() < 0.5 else {"a": v}
    return v


def _valid(kind, rng: random.Random):
    """A valid value for a field kind (the base the mutations start from)."""
    if isinstance(kind, tuple):
        t, lo, hi = kind
        return rng.randint(lo, hi) if t == "int" else round(rng.uniform(lo, hi), 3)
    role_msgs = [{"role": "user", "content": _text(rng)}]
    if rng.random() < 0.3:
        role_msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {
        "model": lambda: MODEL_NAME, "text": lambda: _text(rng), "bool": lambda: rng.random() < 0.5,
        "null": lambda: None, "false": lambda: False, "true": lambda: True,
        "oa_messages": lambda: role_msgs if rng.random() < 0.8 else
        [{"role": "user", "content": [{"type": "text", "text": _text(rng)}]}],
        "ol_messages": lambda: role_msgs,
        "oa_prompt": lambda: rng.choice([_text(rng) or "x", [_text(rng) or "x", "y"],
                                         [rng.randrange(1, 32000) for _ in range(rng.randint(1, 8))]]),
        "ids": lambda: [rng.randrange(1, 32000) for _ in range(rng.randint(0, 8))],
        "stop": lambda: rng.choice(["\n", ["a", "bc"], []]),
        "stream_options": lambda: {"include_usage": rng.random() < 0.5},
        "logit_bias": lambda: {str(rng.randrange(32000)): rng.uniform(-100, 100) for _ in range(rng.randint(0, 3))},
        "response_format": lambda: rng.choice([{"type": "text"}, {"type": "json_object"}, {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]),
        "ol_format": lambda: rng.choice(["", "json", {"type": "object", "properties": {"a": {"type": "string"}}}]),
        "options": lambda: {k: _valid(OPTIONS[k], rng) for k in rng.sample(sorted(OPTIONS), rng.randint(0, 4))}
        | {"num_predict": rng.randint(1, 8)},
        "keep_alive": lambda: rng.choice(["5m", 0, -1, "1h", 300]),
    }[kind]()


def _paths(body, prefix=()) -> list[tuple]:
    """Every key path into `body` (objects and lists), for picking what to mutate."""
    out = []
    if isinstance(body, dict):
        for k, v in body.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _set(body, path, value, delete=False):
    parent = body
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def _mutate(body: dict, rng: random.Random, route: str) -> str:
    """One schema-aware mutation of `body` in place; returns what it did."""
    paths = _paths(body)
    op = rng.choice(["type", "huge", "boundary", "unicode", "long", "nest", "delete", "delete_required", "extra",
                     "null", "empty", "option"])
    if not paths:  # everything was deleted by an earlier mutation: add something
        op, paths = "extra", [("model",)]
    path = rng.choice(paths)
    name = "/".join(map(str, path))
    if op == "type":
        _set(body, path, rng.choice([None, True, 7, -3.5, "str", [1, "a"], {"k": "v"}]))
    elif op == "huge":
        _set(body, path, rng.choice(HUGE))
    elif op == "boundary":
        _set(body, path, rng.choice(BOUNDARY))
    elif op == "unicode":
        _set(body, path, "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 8))))
    elif op == "long":
        _set(body, path, rng.choice(UNICODE[:8] + ["a", "ab "]) * rng.randint(1000, 20000))
    elif op == "nest":
        _set(body, path, _nest(rng, rng.randint(1, 60)) if rng.random() < 0.5 else _junk(rng))
    elif op == "delete":
        _set(body, path, None, delete=True)
    elif op == "delete_required":
        name = rng.choice(SCHEMAS[route]["required"])
        body.pop(name, None)
    elif op == "extra":
        name = rng.choice(["extra_field", "__proto__", "constructor", "", "model ", "MODEL", _text(rng, 2)])
        target = body
        if rng.random() < 0.3 and isinstance(body.get("options"), dict):
            target = body["options"]
        elif rng.random() < 0.3 and isinstance(body.get("messages"), list) and body["messages"] \
                and isinstance(body["messages"][0], dict):
            target = body["messages"][0]
        target[name] = _junk(rng)
    elif op == "null":
        _set(body, path, None)
    elif op == "empty":
        _set(body, path, rng.choice(["", [], {}]))
    else:  # an option or field from another schema on this one (wrong API mixed in)
        other = rng.choice([r for r in SCHEMAS if r != route])
        name = rng.choice(sorted(SCHEMAS[other]["fields"]))
        body[name] = _valid(SCHEMAS[other]["fields"][name], rng)
    return f"{op}:{name}"


def _raw_mutation(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(["truncate", "bad_utf8", "garbage", "bom", "deep", "dup_key", "not_object"])
    if op == "truncate":
        return data[:rng.randrange(len(data))], op
    if op == "bad_utf8":
        k = rng.randrange(len(data))
        return data[:k] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]) + data[k:], op
    if op == "garbage":
        return data + rng.choice([b"}", b" x", b"\x00", b",{}"]), op
    if op == "bom":
        return b"\xef\xbb\xbf" + data, op
    if op == "deep":
        depth = rng.choice([100, 1000, 100000])
        return data[:-1] + b', "junk": ' + b"[" * depth + b"]" * depth + b"}", f"deep{depth}"
    if op == "dup_key":
        return data[:-1] + b', "model": 5}', op
    return rng.choice([b"null", b"7", b'"str"', b"[]", b"true"]), op


@dataclass
class FuzzCase:
    index: int
    route: str
    data: bytes
    what: str  # the mutations applied
    stream: bool


def fuzz_cases(count: int, seed: int) -> list[FuzzCase]:
    """`count` bodies from SCHEMAS: a valid base, then 0-3 mutations (a tenth raw-byte mutated); a pure function."""
    out = []
    for i in range(count):
        rng = random.Random(f"fuzz:{seed}:{i}")
        route = rng.choice(list(SCHEMAS))
        schema = SCHEMAS[route]
        body = {k: _valid(schema["fields"][k], rng) for k in schema["required"]}
        for k in rng.sample(sorted(schema["fields"]), rng.randint(0, 5)):
            if k not in body:
                body[k] = _valid(schema["fields"][k], rng)
        if route in ("chat", "completions"):  # keep valid bodies cheap to serve: a mutation may lift the cap
            body.setdefault("max_tokens", rng.randint(1, 8))
        else:
            body.setdefault("options", {})["num_predict"] = rng.randint(1, 8)
        done = [_mutate(body, rng, route) for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3]))]
        ascii_only = rng.random() < 0.7
        try:
            data = json.dumps(body, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        except ValueError:  # int too large for str() conversion; send it raw
            data = json.dumps({**body, "seed": 0}).encode()
        if rng.random() < 0.1:
            data, op = _raw_mutation(data, rng)
            done.append(f"raw:{op}")
        stream = isinstance(body, dict) and body.get("stream") is True or (
            route.startswith("ollama") and isinstance(body, dict) and "stream" not in body)
        out.append(FuzzCase(i, route, data, ",".join(done) or "valid", stream))
    return out


async def _fuzz_one(client: httpx.AsyncClient, base: str, case: FuzzCase, hung_s: float = HUNG_S) -> dict:
    """Send one fuzz body; `problem` says what was wrong (a 5xx, an error event, a lost stream, a stall)."""
    t0 = time.perf_counter()
    res = {"index": case.index, "route": case.route, "what": case.what, "status": None, "problem": None,
           "stall_s": 0.0}
    try:
        async with client.stream("POST", base + ROUTES[case.route], content=case.data,
                                 headers={"content-type": "application/json"}, timeout=60) as r:
            res["status"] = r.status_code
            last = time.perf_counter()
            res["stall_s"] = last - t0  # the wait for the response head
            chunks = []
            async for chunk in r.aiter_bytes():
                now = time.perf_counter()
                res["stall_s"], last = max(res["stall_s"], now - last), now
                chunks.append(chunk)
            body = b"".join(chunks).decode("utf-8", "replace")
        if r.status_code >= 500:
            res["problem"] = f"HTTP {r.status_code}: {body[:500]}"
        elif r.status_code == 200 and r.headers.get("content-type", "").startswith(("text/event-stream",
                                                                                  "application/x-ndjson")):
            out = Outcome(case.index, case.route)
            if case.route in ("chat", "completions"):
                n = len({c.get("index") for ev in body.split("\n\n") if ev.startswith("data: {")
                         for c in json.loads(ev[6:]).get("choices", [])})
                _check_sse(body, n, out)
            else:
                _check_ndjson(body, out)
            if out.problems or not out.completed:
                res["problem"] = "; ".join(out.problems) or f"stream lost: {body[-200:]!r}"
    except (httpx.TransportError, ValueError) as e:
        res["problem"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["stall_s"] = round(res["stall_s"], 3)
    if res["problem"] is None and res["stall_s"] > hung_s:
        res["problem"] = f"hung: {res['stall_s']} s without a byte (limit {hung_s} s)"
    return res


def run_fuzz(base: str, cases: list[FuzzCase], concurrency: int = 8, progress: Progress | None = None,
             hung_s: float = HUNG_S) -> dict:
    """Send every fuzz body; the outcome counts and every problem (with the body that caused it)."""
    results: list[dict] = []

    async def main():
        limits = httpx.Limits(max_connections=concurrency)
        it = iter(cases)
        async with httpx.AsyncClient(limits=limits) as client:
            async def worker():
                for case in it:
                    results.append(await _fuzz_one(client, base, case, hung_s))
                    if progress is not None:
                        progress.tick()
            await asyncio.gather(*[worker() for _ in range(concurrency)])

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    by_index = {c.index: c for c in cases}
    problems = [dict(r, body=by_index[r["index"]].data[:2000].decode("utf-8", "replace"))
                for r in results if r["problem"]]
    health = httpx.get(base + "/health", timeout=10).status_code
    return {"bodies": len(results), "wall_s": round(wall, 2),
            "status_counts": dict(sorted(Counter(str(r["status"]) for r in results).items())),
            "server_errors_5xx": sum(1 for r in results if r["status"] is not None and r["status"] >= 500),
            "hung": sum(1 for r in results if r["stall_s"] > hung_s), "hung_limit_s": hung_s,
            "max_seconds": max((r["seconds"] for r in results), default=0.0),
            "max_stall_s": max((r["stall_s"] for r in results), default=0.0),
            "mutations": dict(Counter(m.split(":")[0] for r in results for m in r["what"].split(",")).most_common()),
            "health_after": health, "problems": problems, "problem_count": len(problems)}


# ---- main ------------------------------------------------------------------------------------------------------------


def verdict(soak: dict | None, fuzz: dict | None, tracebacks: list[str]) -> list[str]:
    """The pass conditions that failed (empty: all passed)."""
    bad = []
    if soak is not None:
        if soak["server_errors_5xx"]:
            bad.append(f"soak: {soak['server_errors_5xx']} responses >= 500")
        if soak["streams_lost"]:
            bad.append(f"soak: {soak['streams_lost']} streams lost")
        if soak["failure_count"]:
            bad.append(f"soak: {soak['failure_count']} requests with problems")
        if soak["invalid_refused_4xx"] != soak["invalid_sent"]:
            bad.append(f"soak: {soak['invalid_sent'] - soak['invalid_refused_4xx']} invalid bodies not refused 4xx")
        if not soak["engine_idle_after"]:
            bad.append(f"soak: engine not idle after the run: {soak['health_after']}")
        if soak["rss_growth"] is not None and soak["rss_growth"] >= MAX_GROWTH:
            bad.append(f"soak: RSS less the bounded caches grew {soak['rss_growth']:.1%} after warm-up (limit "
                       f"{MAX_GROWTH:.0%})")
    if fuzz is not None:
        if fuzz["server_errors_5xx"] or fuzz["problem_count"]:
            bad.append(f"fuzz: {fuzz['server_errors_5xx']} responses >= 500, {fuzz['problem_count']} problems")
        if fuzz["hung"]:
            bad.append(f"fuzz: {fuzz['hung']} hung requests")
        if fuzz["health_after"] != 200:
            bad.append(f"fuzz: /health answered {fuzz['health_after']} afterwards")
    if tracebacks:
        bad.append(f"server log: {len(tracebacks)} tracebacks")
    return bad


def late_slope(samples: list[tuple], start: int, end: int) -> float | None:
    """Least-squares slope of RSS (MiB per 1,000 requests) over samples taken between `start` and `end` requests
    completed: a leak grows with the requests, an allocator's high-water mark levels off."""
    pts = [(n, r / 2**20) for _, n, r, _ in samples if start <= n <= end]
    if len(pts) < 3 or pts[-1][0] == pts[0][0]:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / var if var else None


def _pct(x) -> str:
    return f"{x:.2%}" if x is not None else "-"


def _mib(b) -> str:
    return f"{b / 2**20:.1f}" if b else "-"


def print_table(result: dict) -> None:
    s, f = result.get("soak"), result.get("fuzz")
    print(f"\npocketlm serve soak: model {result['model']}, seed {result['seed']}, concurrency "
          f"{result['concurrency']}, {result['cpus']} cpus")
    rows = []
    if s:
        rows += [("requests", s["requests"]), ("wall s", s["wall_s"]), ("requests/s", s["requests_per_s"]),
                 ("status counts", " ".join(f"{k}:{v}" for k, v in s["status_counts"].items())),
                 ("responses >= 500", s["server_errors_5xx"]),
                 ("invalid sent / refused 4xx", f"{s['invalid_sent']} / {s['invalid_refused_4xx']}"),
                 ("streams / completed / dropped / lost",
                  f"{s['streams']} / {s['streams_completed']} / {s['streams_dropped']} / {s['streams_lost']}"),
                 ("non-streamed abandoned", s["nonstream_abandoned"]), ("server aborts", s["server_aborts"]),
                 ("latency p50 / p99 s", f"{s['latency_p50_s']} / {s['latency_p99_s']}"),
                 ("RSS MiB start / warm / end / peak", f"{_mib(result['rss_start_bytes'])} / "
                  f"{_mib(s['rss_warm_bytes'])} / {_mib(s['rss_end_bytes'])} / {_mib(result['rss_peak_bytes'])}"),
                 ("prefix cache MiB warm / end", f"{_mib(s['cache_warm_bytes'])} / {_mib(s['cache_end_bytes'])}"),
                 ("RSS growth after warm-up, raw", _pct(s["rss_growth_raw"])),
                 ("RSS growth after warm-up, less cache", _pct(s["rss_growth"])),
                 ("RSS slope, second half (MiB / 1k requests)", result.get("rss_slope_second_half_mib_per_1k")),
                 ("engine idle after", s["engine_idle_after"])]
    if f:
        rows += [("fuzz bodies", f["bodies"]), ("fuzz wall s", f["wall_s"]),
                 ("fuzz status counts", " ".join(f"{k}:{v}" for k, v in f["status_counts"].items())),
                 ("fuzz >= 500 / problems / hung", f"{f['server_errors_5xx']} / {f['problem_count']} / {f['hung']}"),
                 ("fuzz max stall / max total s", f"{f['max_stall_s']} / {f['max_seconds']}"),
                 ("RSS MiB after fuzz", _mib(result.get("rss_after_fuzz_bytes"))),
                 ("RSS growth over the fuzz, raw / less cache",
                  f"{_pct(result.get('rss_growth_fuzz_raw'))} / {_pct(result.get('rss_growth_fuzz'))}")]
    rows.append(("server tracebacks", len(result["tracebacks"])))
    rows.append(("verdict", "PASS" if not result["failed"] else "FAIL: " + "; ".join(result["failed"])))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=None, help="requests before the RSS baseline (default 10%%, "
                                                              "at most 1,000)")
    ap.add_argument("--fuzz", type=int, default=2000, help="fuzz bodies after the soak (0: none)")
    ap.add_argument("--fuzz-concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=12, help="most tokens a valid soak request asks for")
    ap.add_argument("--max-slots", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--context-length", type=int, default=128,
                    help="served context: bounds what a fuzz body without a token cap generates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling period")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(1000, args.requests // 10)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = plan_soak(args.requests, args.seed, max_tokens=args.max_tokens, context_length=args.context_length)
    fcases = fuzz_cases(args.fuzz, args.seed) if args.fuzz else []
    log_path = Path(tempfile.gettempdir()) / f"soak_serve-{os.getpid()}.log"
    with ServerProcess(args.model, log_path=log_path, max_slots=args.max_slots, max_queue=args.max_queue,
                       context_length=args.context_length, threads=args.threads) as server:
        progress = Progress(every=1000, pid=server.proc.pid)
        rss_start = server.rss()
        with RssSampler(server, args.sample_s, progress) as sampler:
            soak = run_soak(server, cases, concurrency=args.concurrency, warmup=warmup, sampler=sampler,
                            progress=progress)
            fuzz, after_fuzz = None, (None, None)
            if fcases:
                fuzz = run_fuzz(server.url, fcases, args.fuzz_concurrency, progress)
                after_fuzz = _idle_rss(server, sampler)
        tracebacks = server.tracebacks()
        samples = sampler.samples
    fuzz_raw, fuzz_net = _growth((soak["rss_end_bytes"], soak["cache_end_bytes"]), after_fuzz)
    slope = late_slope(samples, args.requests // 2, args.requests)
    result = {"model": args.model, "seed": args.seed, "concurrency": args.concurrency, "cpus": os.cpu_count(),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "server_command": " ".join(server.cmd[1:]), "warmup": warmup, "rss_start_bytes": rss_start,
              "rss_peak_bytes": max((s[2] for s in samples), default=None), "rss_after_fuzz_bytes": after_fuzz[0],
              "cache_after_fuzz_bytes": after_fuzz[1],
              "rss_growth_fuzz_raw": round(fuzz_raw, 5) if fuzz_raw is not None else None,
              "rss_growth_fuzz": round(fuzz_net, 5) if fuzz_net is not None else None,
              "rss_slope_second_half_mib_per_1k": round(slope, 4) if slope is not None else None,
              "soak": soak, "fuzz": fuzz, "tracebacks": tracebacks[:20],
              "rss_samples": [[round(t, 2), n, r, c] for t, n, r, c in samples]}
    result["failed"] = verdict(soak, fuzz, tracebacks)
    if fuzz:
        fuzz["problems"] = fuzz["problems"][:50]  # the JSON keeps the first 50 (each with its body)
    if fuzz and result["rss_growth_fuzz"] is not None and result["rss_growth_fuzz"] >= MAX_GROWTH:
        result["failed"].append(f"fuzz: RSS grew {result['rss_growth_fuzz']:.1%} (limit {MAX_GROWTH:.0%})")
    if samples:
        net = f"{soak['rss_growth']:.2%}" if soak["rss_growth"] is not None else "n/a"
        raw = f"{soak['rss_growth_raw']:.2%}" if soak["rss_growth_raw"] is not None else "n/a"
        base = soak["rss_warm_bytes"] - (soak["cache_warm_bytes"] or 0) if soak["rss_warm_bytes"] else None
        plot_rss(samples, {"base_warm": base, "warmup_requests": warmup, "soak_requests": args.requests,
                           "fuzz_bodies": args.fuzz}, out_dir / "soak_serve.png",
                 f"pocketlm serve soak, model {args.model}: {args.requests} requests + {args.fuzz} fuzz bodies\n"
                 f"growth after warm-up: RSS less the prefix cache {net}, raw RSS {raw}")
    (out_dir / "soak_serve.json").write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    for tb in tracebacks[:3]:
        print("\n" + tb)
    print(f"wrote {out_dir / 'soak_serve.json'} and {out_dir / 'soak_serve.png'}; server log {log_path}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
