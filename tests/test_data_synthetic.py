"""Synthetic generators (answers verified, documents distinct) and the teacher client against a fake server."""

from __future__ import annotations

import http.server
import json
from fractions import Fraction

import pytest
from http_helpers import fake_server, send_json

from pocketlm.data import synthetic
from pocketlm.data.dedup import DedupConfig, Deduplicator
from pocketlm.data.synthetic import UNITS, generate, safe_eval
from pocketlm.data.teacher import Teacher, TeacherError, TeacherItem, items_from, load_done


def test_generated_answers_check_out_independently():
    docs, stats = generate(400, seed=3)
    assert len(docs) == 400 and set(stats["by_generator"]) == set(synthetic.GENERATORS)
    for d in docs:
        m = d.metadata
        assert m["verified"] is True
        assert "Answer: " in d.text or m["generator"] == "code"
        if m["generator"] == "arithmetic":
            assert safe_eval(m["expression"]) == Fraction(m["answer"])
            assert f"Answer: {m['answer']}." in d.text
        elif m["generator"] == "word_problem":
            assert synthetic.fmt(safe_eval(m["formula"])) == m["answer"]
        elif m["generator"] == "units":
            q, conv = m["problem"].split(":")
            src, dst = conv.split("->")
            amount = Fraction(d.text.split("Exercise: convert ")[1].split(" ")[0])
            assert amount * UNITS[q][src] / UNITS[q][dst] == Fraction(m["answer"])
        elif m["generator"] == "code":
            code = d.text.split("```python\n")[1].split("```")[0]
            tests = d.text.split("```python\n")[2].split("```")[0]
            ns = {}
            exec(code + "\n" + tests, ns)  # the shipped tests pass when executed
            assert tests.count("assert") >= 3
        elif m["generator"] == "logic" and m["problem"] == "propositional":
            assert m["answer"] in ("a tautology", "a contradiction", "contingent")


def test_wrong_answers_are_caught(monkeypatch):
    with pytest.raises(synthetic.VerificationError):
        safe_eval("__import__('os')")
    real = synthetic.safe_eval
    monkeypatch.setattr(synthetic, "safe_eval", lambda e: real(e) + 1)   # a broken step must be detected
    with pytest.raises(synthetic.VerificationError):
        for i in range(50):
            synthetic.gen_arithmetic(__import__("random").Random(i))


def test_diverse_deterministic_and_distinct():
    a, _ = generate(150, seed=11)
    b, _ = generate(150, seed=11)
    c, _ = generate(150, seed=12)
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.text for d in a] != [d.text for d in c]
    assert len({d.text for d in a}) == 150
    dd = Deduplicator(DedupConfig(threshold=0.9))
    assert all(dd.check(d.id, d.text) is None for d in a)
    combos = {(d.metadata["generator"], d.metadata["audience"], d.metadata["style"]) for d in a}
    assert len(combos) > 50


class _Fake(http.server.BaseHTTPRequestHandler):
    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Fake.seen.append(body)
        status = _Fake.script.pop(0) if _Fake.script else 200
        if status != 200:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        topic = body["messages"][0]["content"].split(" about ")[1].split(".")[0]
        send_json(self, {"choices": [{"message": {"role": "assistant", "content": f"A section about {topic}."}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _Fake.script, _Fake.seen = [], []
    with fake_server(_Fake) as url:
        yield url


def test_teacher_retries_rate_limit_and_resume(server, tmp_path):
    sleeps = []
    out = tmp_path / "teacher.jsonl"
    items = items_from(["tides", "fractions", "recursion"], ["children"], ["textbook", "tutorial"])
    assert len(items) == 6
    _Fake.script = [500, 429, 503]          # three transient failures before the first success
    t = Teacher(server, "fake", backoff_s=0.001, sleep=sleeps.append, requests_per_minute=6000)
    stats = t.run(items[:4], out)
    assert stats["done"] == 4 and stats["retries"] == 3 and stats["failed"] == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["metadata"]["topic"] for x in lines] == ["tides", "tides", "fractions", "fractions"]
    assert lines[0]["text"] == "A section about tides."
    # a crash mid-line: the torn line is cut and the run resumes with the remaining items only
    with open(out, "a") as f:
        f.write('{"id": "teacher/abc", "te')
    assert len(load_done(out)) == 4 and out.read_text().endswith("}\n")
    n_before = len(_Fake.seen)
    stats = Teacher(server, "fake", sleep=sleeps.append).run(items, out)
    assert stats["skipped"] == 4 and stats["done"] == 2 and len(_Fake.seen) == n_before + 2
    assert len(out.read_text().splitlines()) == 6


def test_teacher_gives_up_and_records(server, tmp_path):
    _Fake.script = [400]
    out = tmp_path / "t.jsonl"
    stats = Teacher(server, "fake", sleep=lambda s: None).run([TeacherItem("x")], out)
    assert stats["failed"] == 1 and stats["requests"] == 1          # 400 is not retried
    assert "HTTP 400" in (tmp_path / "t.jsonl.failed.jsonl").read_text()
    _Fake.script = [500] * 10
    with pytest.raises(TeacherError, match="gave up after 3"):
        Teacher(server, "fake", max_retries=2, backoff_s=0, sleep=lambda s: None).complete("about y.")


def test_rate_limiter_spaces_requests():
    from pocketlm.data.teacher import RateLimiter

    now = [0.0]
    slept = []
    rl = RateLimiter(120, clock=lambda: now[0], sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(4):
        rl.wait()
    assert slept == [0.5, 0.5, 0.5]
