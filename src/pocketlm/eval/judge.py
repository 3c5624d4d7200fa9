"""A judge model behind any OpenAI-compatible endpoint, with every verdict cached on disk.

`Judge.ask(key, messages)` sends one chat request (temperature 0) unless `key` is already in the cache file, a
JSONL file with one record per verdict (`key`, the reply text, and whatever the caller stores beside it). The
cache is appended after every verdict and flushed, so an interrupted run keeps what it paid for and a rerun
with the same answers costs no request. The key includes a SHA-256 of the exact messages sent, so a changed
answer, prompt or judge model is judged again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pocketlm.errors import PocketLMError


class JudgeError(PocketLMError, RuntimeError):
    """The judge endpoint failed, or its cache file is unreadable."""


def digest(obj) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-able object, key order fixed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class JudgeCache:
    """key -> record, loaded from and appended to one JSONL file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines):  # a last line cut short by a crash: dropped, asked again
                        self.path.write_text("".join(ln + "\n" for ln in lines[:-1]), encoding="utf-8")
                        break
                    raise JudgeError(f"{self.path} line {n}: not valid JSON; delete the file to judge again") from None
                if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                    self.records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        assert isinstance(record.get("key"), str)
        self.records[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()


class Judge:
    """A judge model at an OpenAI-compatible endpoint (`/v1/chat/completions`), greedy, with a verdict cache."""

    def __init__(self, endpoint: str, model: str, cache: JudgeCache, *, api_key: str | None = None,
                 max_tokens: int = 2048, timeout: float = 300.0):
        from pocketlm.eval.backends import OpenAIBackend
        self.client = OpenAIBackend(endpoint, model, api_key=api_key, timeout=timeout)
        self.model, self.cache, self.max_tokens = model, cache, max_tokens
        self.requests = 0  # requests actually sent in this process (cache misses)

    def ask(self, key: str, messages: list[dict], **store) -> dict:
        """The cached record for `key`, else a new verdict: {key, judge, messages_sha, judgment, **store}."""
        full_key = f"{self.model}|{key}|{digest(messages)}"
        hit = self.cache.get(full_key)
        if hit is not None:
            return hit
        from pocketlm.eval.backends import EvalBackendError
        try:
            (text,) = self.client.generate([messages], max_tokens=self.max_tokens)
        except EvalBackendError as e:
            raise JudgeError(f"judge {self.model}: {e}") from None
        self.requests += 1
        record = {"key": full_key, "judge": self.model, "judgment": text} | store
        self.cache.put(record)
        return record
