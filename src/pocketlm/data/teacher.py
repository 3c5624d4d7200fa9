"""Teacher mode: textbook sections written by a model behind any OpenAI-compatible endpoint.

Input: seed topics and, optionally, web extracts (Cosmopedia-style: "write a textbook section for <audience> in
the style of <style> about <topic>, using this extract as inspiration"). Each request is one chat completion
(`POST {base_url}/chat/completions`, the OpenAI wire format that vLLM, llama.cpp, Ollama and `pocketlm serve`
speak), made with the standard library (`urllib`), so no SDK is needed.

Robustness: retries with exponential backoff and jitter (seeded) on connection errors, timeouts, 408, 409, 429
(honouring `Retry-After`) and 5xx, up to `max_retries`; 4xx other than those fail the item at once (recorded,
not retried). A client-side rate limit (`requests_per_minute`, evenly spaced). Resume: results are appended to
one JSONL file, one line per finished item keyed by the item's id (a hash of the prompt), each line flushed and
fsynced; on start the file is read, a torn last line (a crash mid-write) is cut off, and finished ids are
skipped. Output lines are `Document` records (id, text, metadata with topic, audience, style, model, prompt
hash, usage), so the file feeds the pipeline as a source. Failed items are written to `<out>.failed.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pocketlm.data.records import DataPipelineError, Document
from pocketlm.fsutil import fsync_path

RETRY_STATUS = {408, 409, 429}


class TeacherError(DataPipelineError):
    """An endpoint answered with something unusable, or an item failed after every retry."""


@dataclass
class TeacherItem:
    topic: str
    audience: str = "college students"
    style: str = "textbook"
    extract: str | None = None

    def prompt(self) -> str:
        p = (f"Write a section of a {self.style} for {self.audience} about {self.topic}. Explain the ideas step by "
             f"step, give a worked example, and end with two exercises with their answers. Do not add a title page "
             f"or any text that is not part of the section.")
        if self.extract:
            p += f"\n\nUse the following extract as inspiration, but do not copy it:\n\n{self.extract[:3000]}"
        return p

    @property
    def id(self) -> str:
        return hashlib.sha1(json.dumps([self.topic, self.audience, self.style, self.extract]).encode()).hexdigest()[:20]


class RateLimiter:
    def __init__(self, per_minute: float, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock, self.sleep, self.next = clock, sleep, 0.0

    def wait(self) -> None:
        now = self.clock()
        if now < self.next:
            self.sleep(self.next - now)
            now = self.next
        self.next = now + self.interval


class Teacher:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, temperature: float = 0.7,
                 max_tokens: int = 1024, max_retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 120.0,
                 requests_per_minute: float = 60.0, seed: int = 0, sleep=time.sleep):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.temperature, self.max_tokens = model, api_key, temperature, max_tokens
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.limiter = RateLimiter(requests_per_minute, sleep=sleep)
        self.rng, self.sleep = random.Random(seed), sleep
        self.stats = {"requests": 0, "retries": 0, "done": 0, "skipped": 0, "failed": 0}
        self.lock = threading.Lock()  # limiter, jitter rng and stats: `chat` may be called from several threads

    def _post(self, messages: list[dict], max_tokens: int | None = None) -> dict:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": max_tokens or self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - user-given endpoint
            return json.loads(resp.read())

    def complete(self, prompt: str) -> tuple[str, dict]:
        """The completion text and usage, with retries; raises TeacherError when it gives up."""
        text, usage, _ = self.chat([{"role": "user", "content": prompt}])
        return text, usage

    def chat(self, messages: list[dict], max_tokens: int | None = None) -> tuple[str, dict, str | None]:
        """(text, usage, finish_reason) of one chat completion of `messages`, with retries (thread-safe);
        `max_tokens` overrides the client's for this request."""
        last = ""
        for attempt in range(self.max_retries + 1):
            with self.lock:
                self.limiter.wait()
                self.stats["requests"] += 1
            retry_after = None
            try:
                data = self._post(messages, max_tokens)
                try:
                    text = data["choices"][0]["message"]["content"]
                    finish = data["choices"][0].get("finish_reason")
                except (KeyError, IndexError, TypeError, AttributeError):
                    raise TeacherError(f"{self.url}: response has no choices[0].message.content: "
                                       f"{json.dumps(data)[:200]}") from None
                if not isinstance(text, str) or not text.strip():
                    raise TeacherError(f"{self.url}: empty completion")
                return text, data.get("usage") or {}, finish
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS and e.code < 500:
                    raise TeacherError(f"{self.url}: HTTP {e.code} {e.read()[:200]!r}") from None
                ra = e.headers.get("Retry-After") if e.headers else None
                retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                with self.lock:
                    self.stats["retries"] += 1
                    delay = retry_after if retry_after is not None else \
                        self.backoff_s * (2 ** attempt) * (0.5 + self.rng.random())
                self.sleep(delay)
        raise TeacherError(f"{self.url}: gave up after {self.max_retries + 1} attempts (last: {last})")

    def run(self, items: Iterable[TeacherItem], out: str | os.PathLike) -> dict:
        """Write one Document per item to `out` (JSONL), skipping items already there."""
        out = Path(out)
        done = load_done(out)
        failed_path = out.with_name(out.name + ".failed.jsonl")
        with open(out, "a", encoding="utf-8") as f:
            for item in items:
                if item.id in done:
                    self.stats["skipped"] += 1
                    continue
                try:
                    text, usage = self.complete(item.prompt())
                except TeacherError as e:
                    self.stats["failed"] += 1
                    with open(failed_path, "a", encoding="utf-8") as ff:
                        ff.write(json.dumps({"id": item.id, "topic": item.topic, "error": str(e)}) + "\n")
                    continue
                doc = Document(f"teacher/{item.id}", text.strip(),
                               {"source": "teacher", "topic": item.topic, "audience": item.audience,
                                "style": item.style, "model": self.model, "usage": usage,
                                "with_extract": item.extract is not None})
                f.write(doc.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
                done.add(item.id)
                self.stats["done"] += 1
        fsync_path(out.parent)
        return dict(self.stats)


def load_done(out: Path) -> set[str]:
    """Ids already in `out`; a torn last line (no newline, or not JSON) is cut off so appends stay valid."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    good_end, done = 0, set()
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0:
            break
        try:
            rec = json.loads(raw[pos:nl])
            done.add(rec["id"].split("/", 1)[1])
        except (json.JSONDecodeError, KeyError, IndexError, AttributeError):
            break
        pos = good_end = nl + 1
    if good_end != len(raw):
        with open(out, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return done


def items_from(topics: list[str], audiences: list[str], styles: list[str], extracts: list[str] | None = None,
               *, seed: int = 0, n: int | None = None) -> list[TeacherItem]:
    """Topics x audiences x styles (or n seeded draws of them), each optionally with an extract."""
    from itertools import product

    combos = list(product(topics, audiences, styles))
    if n is not None:
        rng = random.Random(seed)
        combos = [rng.choice(combos) for _ in range(n)]
    items = []
    for i, (t, a, s) in enumerate(combos):
        items.append(TeacherItem(t, a, s, extracts[i % len(extracts)] if extracts else None))
    return items
