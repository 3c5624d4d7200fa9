"""Teacher chats, preference pairs and safety data (`pocketlm.data.teacher_chat`) against a fake OpenAI server.

The fake answers each request from a script keyed by the last user turn, reports usage, and records how many
requests were in flight at once, so verification, filters, decontamination, resume, concurrency and the report's
counts are checked against exact expected values."""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from http_helpers import fake_server, send_json

from pocketlm.chat import parse_messages
from pocketlm.data import commands, teacher_chat
from pocketlm.data.records import DataPipelineError
from pocketlm.data.teacher import Teacher
from pocketlm.data.teacher_chat import (ChatItem, EvalGuard, TeacherChatRun, build_items, check_answer, check_entity,
                                        final_number, load_tree, make_rejected, on_topic, question_key,
                                        clean_prefix, tree_capitals, trim_to_sentence, trim_truncated,
                                        wrong_equation)
from pocketlm.eval.simple_qa import is_refusal

DEFAULT_ANSWER = "This is a clear answer to the question, and it explains the idea with a simple example."
COMPLETION_TOKENS = 7


class _Fake(http.server.BaseHTTPRequestHandler):
    answers: dict = {}        # last user turn -> answer text, or {"text", "finish"}
    seen: list = []
    lock = threading.Lock()
    inflight = 0
    max_inflight = 0
    hold_until = 0            # keep a request open until this many are in flight (or 5 s pass)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _Fake.lock:
            _Fake.seen.append(body)
            _Fake.inflight += 1
            _Fake.max_inflight = max(_Fake.max_inflight, _Fake.inflight)
        deadline = time.monotonic() + 5
        while _Fake.hold_until and _Fake.max_inflight < _Fake.hold_until and time.monotonic() < deadline:
            time.sleep(0.01)
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        ans = _Fake.answers.get(user, DEFAULT_ANSWER)
        ans = ans if isinstance(ans, dict) else {"text": ans, "finish": "stop"}
        out = {"choices": [{"message": {"role": "assistant", "content": ans["text"]}, "finish_reason": ans["finish"]}],
               "usage": {"prompt_tokens": 3, "completion_tokens": COMPLETION_TOKENS}}
        with _Fake.lock:
            _Fake.inflight -= 1
        send_json(self, out)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _Fake.answers, _Fake.seen, _Fake.inflight, _Fake.max_inflight, _Fake.hold_until = {}, [], 0, 0, 0
    with fake_server(_Fake) as url:
        yield url


def _item(domain, question, check, *, kind="chats", followup=None, system=None, topic="t"):
    turns, checks = [question], [check]
    if followup:
        turns.append(followup[0])
        checks.append(followup[1])
    return ChatItem(kind, domain, topic, "general", "plain", turns, checks, system)


def _run(server, tmp_path, items, kind="chats", name="out.jsonl", concurrency=2, **kw):
    teacher = Teacher(server, "fake", requests_per_minute=0, backoff_s=0, sleep=lambda s: None)
    run = TeacherChatRun(teacher, kind, tmp_path / name, concurrency=concurrency, log=lambda s: None,
                         verify_code=kw.pop("verify_code", False), **kw)
    rep = run.run(items)
    out = [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
    rej = [json.loads(x) for x in (tmp_path / (name + ".rejected.jsonl")).read_text().splitlines()]
    return rep, out, rej


ARITH = {"kind": "arith", "expression": "17 + 25", "answer": "42"}


def test_arithmetic_is_verified_by_computing_it(server, tmp_path):
    right = _item("arithmetic", "Compute 17 + 25.", ARITH)
    wrong = _item("arithmetic", "What does 17 + 25 equal?", ARITH)
    none = _item("arithmetic", "Please calculate 17 + 25.", ARITH)
    _Fake.answers = {"Compute 17 + 25.": "First add 17 and 25 to get 42. So the answer is 42.",
                     # the right number appears, but the final one is wrong: dropped
                     "What does 17 + 25 equal?": "We add 17 + 25 = 42, then double it, so the answer is 84.",
                     "Please calculate 17 + 25.": "It is the sum of the two numbers given in the question."}
    rep, out, rej = _run(server, tmp_path, [right, wrong, none])
    assert [r["messages"][-1]["content"] for r in out] == [_Fake.answers["Compute 17 + 25."]]
    assert {r["reason"] for r in rej} == {"verify:arith:wrong_final_number", "verify:arith:no_number"}
    steps = {"kind": "arith", "expression": "23 + 48", "answer": "71"}
    assert check_answer("23 + 48 = 108 + 48 = 680. No wait, the answer is 71.", steps, "arithmetic", None) == \
        "verify:arith:wrong_step"
    assert check_answer("20 + 3 = 23 and 23 + 48 = 71, 10 / 3 = 3.33, so the answer is 71.", steps, "arithmetic",
                        None) is None
    assert wrong_equation("7 x 8 = 54") == "7 x 8 = 54" and wrong_equation("7 x 8 = 56") is None
    assert final_number("so 1,250 people, i.e. 3/4 of them") == Fraction(3, 4)
    assert final_number("The total is 1,250.") == 1250 and final_number("-7 degrees.") == -7


def test_degenerate_loops_and_refusals_are_dropped():
    loop = "The sun is hot. The sun is hot because the sun is hot and bright."
    assert check_answer(loop, {"kind": "none"}, "science", None) == "degenerate"
    ok = "The sun is hot because nuclear fusion in its core releases a lot of energy."
    assert check_answer(ok, {"kind": "none"}, "science", None) is None
    assert check_answer("I'm sorry, but I can't help with that.", {"kind": "none"}, "benign", None) == "refused"
    # a capital question must name the capital
    fact = {"kind": "fact", "any": ["Lima"], "country": "Peru"}
    assert check_answer("The capital of Peru is Lima, a large city.", fact, "geography", None) is None
    assert check_answer("The capital of Peru is Cusco, a large city.", fact, "geography", None) == \
        "verify:fact:missing_answer"
    # a lesson repeating a phrase far apart is fine; a local loop is not
    filler = " ".join(f"word{i} is here" for i in range(40))
    assert check_answer("Lessons teach the number of things. " * 1 + filler, {"kind": "lesson"}, "science",
                        None) != "degenerate"
    assert check_answer("a b c a b c a b c " + filler, {"kind": "lesson"}, "science", None) == "degenerate"
    code = "```python\nprint(is_odd(1))\nprint(is_odd(2))\nprint(is_odd(3))\n```\nThis prints three results."
    assert check_answer(code, {"kind": "python"}, "python", None) is None
    assert check_answer(code, {"kind": "none"}, "howto", None) == "degenerate"


def test_degenerate_and_off_topic_teacher_answers_dropped_in_a_run(server, tmp_path):
    q, q2 = "Why is the sky blue?", "How do I start running as a beginner? I'm a complete beginner."
    _Fake.answers = {q: "Because of the light. Because of the light. Because of the light in the sky.",
                     q2: "Starting a new hobby can be exciting. First, define your goals and choose a hobby."}
    item2 = _item("howto", q2, {"kind": "none"})
    item2.extra["question"] = "How do I start running as a beginner?"
    rep, out, rej = _run(server, tmp_path, [_item("science", q, {"kind": "none"}), item2])
    assert out == [] and sorted(r["reason"] for r in rej) == ["degenerate", "off_topic"]
    assert [r["messages"][-1]["content"] for r in rej if r["reason"] == "degenerate"] == [_Fake.answers[q]]
    assert on_topic("How do I start running?", "Running three times a week builds your stamina.")
    assert on_topic("Why do leaves change colour in autumn?", "In the fall the green color fades.")
    assert not on_topic("Why do leaves change colour in autumn?", "Trees are tall plants.")


def test_truncated_answers_are_cut_back_or_dropped(server, tmp_path):
    long_q, short_q = "How do clouds form?", "What is friction?"
    para = "Clouds form when warm air rises and cools, and its water vapour condenses into tiny droplets."
    _Fake.answers = {long_q: {"text": para + "\n\nThen the droplets join and", "finish": "length"},
                     short_q: {"text": "Friction is a force that", "finish": "length"}}
    rep, out, rej = _run(server, tmp_path, [_item("science", long_q, {"kind": "none"}),
                                           _item("science", short_q, {"kind": "none"})])
    assert [r["messages"][-1]["content"] for r in out] == [para] and out[0]["meta"]["trimmed"] == 1
    assert [r["reason"] for r in rej] == ["truncated"] and rep["accepted_trimmed"] == 1
    assert trim_truncated("```python\nx = 1\n\ny = 2", 1) is None   # never cut inside a code block
    assert trim_truncated("One two three.\n\nFour five six.\n\nThis will output:\n\n```\n4", 3) == \
        "One two three.\n\nFour five six."


def test_decontamination_drops_eval_questions(server, tmp_path):
    g = EvalGuard()
    # simple-qa's "What is 6 times 9?", asked another way: caught before anything is sent
    assert g.question("What is 9 times 6? Show your working.") == "simple-qa:arithmetic-11"
    assert g.question("Compute 6 * 9.") == "simple-qa:arithmetic-11"
    assert g.question("What does the word 'ancient' mean?") == "simple-qa:definitions-11"
    assert g.question("What is 6 times 7?") is None and g.question("Why is the sky blue?") is None
    assert question_key("What is 7 plus 5?") == question_key("7 + 5 = ?")
    leak_q = "How many sweets are left?"
    clean_q = "What is 6 times 7?"
    leaking_answer = "If I have 12 apples and eat 5, how many apples are left? Seven apples are left for later."
    _Fake.answers = {leak_q: leaking_answer}
    items = [_item("arithmetic", "What is 9 times 6?", {"kind": "arith", "expression": "9 * 6", "answer": "54"}),
             _item("science", leak_q, {"kind": "none"}),
             _item("arithmetic", clean_q, {"kind": "arith", "expression": "6 * 7", "answer": "42"})]
    _Fake.answers[clean_q] = "Six groups of seven make 42, so 6 times 7 is 42."
    rep, out, rej = _run(server, tmp_path, items)
    assert sorted(r["reason"] for r in rej) == ["decontam:simple-qa:arithmetic-10", "decontam:simple-qa:arithmetic-11"]
    assert len(_Fake.seen) == 2           # the contaminated question was never sent
    assert rep["rejected_by_reason"] == {"decontam:simple-qa": 2} and len(out) == 1
    # extra evaluation items from a JSONL file
    extra = tmp_path / "items.jsonl"
    extra.write_text(json.dumps({"text": "Six groups of seven make 42, so 6 times 7 is 42.", "id": "x1",
                                 "task": "mine"}) + "\n")
    rep, out, rej = _run(server, tmp_path, [items[2]], name="b.jsonl", guard=EvalGuard(items=[str(extra)]))
    assert out == [] and rej[0]["reason"] == "decontam:mine:x1"


def test_resume_skips_finished_items_and_cuts_a_torn_line(server, tmp_path):
    items = build_items("chats", 6, seed=3, domains=["science", "howto"])
    assert build_items("chats", 4, seed=3, domains=["science", "howto"])[0].id == items[0].id   # prefix-stable
    q0 = items[1].turns[0]
    _Fake.answers = {q0: "It is it is it is it is."}   # item 1 is rejected (degenerate): finished all the same
    rep, out, rej = _run(server, tmp_path, items[:4])
    assert rep["accepted"] + rep["rejected"] == 4 and rep["skipped_done"] == 0
    n_requests = len(_Fake.seen)
    with open(tmp_path / "out.jsonl", "a") as f:
        f.write('{"id": "teacher-chat/abc", "mess')              # a crash mid-write
    rep, out, rej = _run(server, tmp_path, items)
    assert rep["skipped_done"] == 4 and rep["processed"] == 2
    asked = {[m["content"] for m in s["messages"] if m["role"] == "user"][0] for s in _Fake.seen[n_requests:]}
    assert asked == {it.turns[0] for it in items[4:]}
    assert len(out) + len(rej) == 6 and len({r["id"] for r in out + rej}) == 6
    assert rep["file_totals"] == {"accepted": len(out), "rejected": len(rej)}


def test_concurrency_issues_parallel_requests(server, tmp_path):
    items = [_item("science", f"Question number {i} about light?", {"kind": "none"}) for i in range(8)]
    _Fake.answers = {it.turns[0]: f"Answer {i}: light travels in straight lines from the source to our eyes."
                     for i, it in enumerate(items)}
    _Fake.hold_until = 4
    t0 = time.monotonic()
    rep, out, _ = _run(server, tmp_path, items, concurrency=4)
    assert _Fake.max_inflight == 4 and rep["accepted"] == 8
    assert time.monotonic() - t0 < 4.5       # a serial client would wait out the 5 s hold on the first request
    _Fake.max_inflight, _Fake.hold_until = 0, 0
    _run(server, tmp_path, items, name="serial.jsonl", concurrency=1)
    assert _Fake.max_inflight == 1


def test_prefs_pairs_and_safety(server, tmp_path):
    tree = load_tree()
    harmful = _item("harmful", "How do I make a Molotov cocktail?", {"kind": "harmful"}, kind="prefs")
    benign = _item("benign", "How do I kill time on a long flight?", {"kind": "none"}, kind="prefs")
    arith = _item("arithmetic", "Compute 17 + 25.", ARITH, kind="prefs")
    capital = _item("geography", "What is the capital of Peru?", {"kind": "fact", "any": ["Lima"], "country": "Peru"},
                    kind="prefs", topic="capital of Peru")
    other = _item("science", "Why do we sweat?", {"kind": "none"}, kind="prefs",
                  followup=("Can you give me an example?", {"kind": "none"}))
    _Fake.answers = {"How do I kill time on a long flight?": "Bring a good book, download some films and take a "
                                                              "short walk along the aisle now and then.",
                     "Compute 17 + 25.": "Adding 17 and 25 gives 42. The answer is 42.",
                     "What is the capital of Peru?": "The capital of Peru is Lima, on the Pacific coast.",
                     "Why do we sweat?": "We sweat to cool down: sweat evaporates from the skin and takes heat away.",
                     "Can you give me an example?": "When you run, your body heats up and sweat cools the skin."}
    rep, out, rej = _run(server, tmp_path, [harmful, benign, arith, capital, other], kind="prefs")
    assert rej == [] and rep["accepted"] == 5
    by = {r["meta"]["domain"]: r for r in out}
    for r in out:
        assert r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] == "user"
        parse_messages(r["prompt"] + [{"role": "assistant", "content": r["chosen"]}])
    h = by["harmful"]
    assert is_refusal(h["chosen"]) and not is_refusal(h["rejected"]) and h["meta"]["rejected_kind"] == \
        "harmful_compliance" and h["rejected"] in tree["domains"]["harmful"]["compliance"]
    b = by["benign"]
    assert not is_refusal(b["chosen"]) and is_refusal(b["rejected"]) and b["meta"]["rejected_kind"] == \
        "needless_refusal"
    a = by["arithmetic"]
    assert final_number(a["chosen"]) == 42 and final_number(a["rejected"]) not in (None, 42)
    assert a["rejected"].replace(str(final_number(a["rejected"])), "42") == a["chosen"]
    c = by["geography"]
    wrong = [v[0] for v in tree["domains"]["geography"]["capitals"].values() if v[0] in c["rejected"]]
    assert "Lima" not in c["rejected"] and len(wrong) == 1 and c["rejected"].replace(wrong[0], "Lima") == c["chosen"]
    assert c["meta"]["rejected_kind"] == "wrong_fact" and a["meta"]["rejected_kind"] == "wrong_number"
    s = by["science"]
    assert len(s["prompt"]) == 3 and s["chosen"] == _Fake.answers["Can you give me an example?"]
    # only 3 of the 5 need the teacher for their last turn; the harmful one is never sent
    assert len(_Fake.seen) == 5 and all("Molotov" not in json.dumps(x) for x in _Fake.seen)
    for seed in range(20):                 # whatever the draw, rejected differs from chosen
        rj, how = make_rejected(other, "x", tree, random.Random(seed))
        assert rj != "x" and how in ("off_topic", "rambling", "unhelpful")


def test_safety_chats(server, tmp_path):
    harmful = _item("harmful", "Be honest with me. How do I cut through a bike lock to steal a bike?",
                    {"kind": "harmful"})
    benign_ok = _item("benign", "How do I crush garlic without a press?", {"kind": "none"})
    benign_refused = _item("benign", "How do I smoke salmon at home?", {"kind": "none"})
    _Fake.answers = {"How do I crush garlic without a press?": "Put the clove under the flat side of a knife and "
                                                                "press down firmly with your palm.",
                     "How do I smoke salmon at home?": "I'm sorry, but I can't help with that request."}
    rep, out, rej = _run(server, tmp_path, [harmful, benign_ok, benign_refused])
    assert sorted(r["meta"]["domain"] for r in out) == ["benign", "harmful"]
    refusal = [r for r in out if r["meta"]["domain"] == "harmful"][0]["messages"][-1]["content"]
    assert is_refusal(refusal) and refusal in load_tree()["domains"]["harmful"]["refusals"]
    assert [r["reason"] for r in rej] == ["refused"]
    assert rep["tokens_generated"] == 2 * COMPLETION_TOKENS and rep["requests"] == 2
    # the shipped safety prompts do not repeat simple-qa's harmful or benign-sensitive questions
    g, tree = EvalGuard(), load_tree()
    for q in tree["domains"]["harmful"]["requests"] + tree["domains"]["benign"]["requests"]:
        assert g.question(q) is None, q


def test_report_counts_are_exact(server, tmp_path):
    q = {f"q{i}": f"Tell me fact {i} about rivers and lakes?" for i in range(6)}
    same = "Rivers carry water from the hills down to the sea, and lakes hold still water in a basin."
    _Fake.answers = {q["q0"]: "Rivers flow downhill because gravity pulls the water towards the sea.",
                     q["q1"]: same,
                     q["q3"]: "Lakes lakes lakes lakes lakes.",                    # degenerate
                     q["q4"]: {"text": "Rivers are", "finish": "length"}}         # truncated
    q["q2"] = q["q1"]    # asked again under a system prompt (another item), answered the same: an exact duplicate
    items = [_item("geography", q[f"q{i}"], {"kind": "none"}, system="S" if i == 2 else None) for i in range(5)]
    items.append(_item("arithmetic", "What is 9 times 6?", {"kind": "arith", "expression": "9 * 6", "answer": "54"}))
    rep, out, rej = _run(server, tmp_path, items, concurrency=1)
    assert rep["items"] == 6 and rep["processed"] == 6 and rep["accepted"] == 2 and rep["rejected"] == 4
    assert rep["rejected_by_reason"] == {"dedup:exact_of": 1, "degenerate": 1, "truncated": 1,
                                         "decontam:simple-qa": 1}
    assert rep["requests"] == 5 and rep["tokens_generated"] == 5 * COMPLETION_TOKENS and rep["prompt_tokens"] == 15
    assert rep["accepted_by_domain"] == {"geography": 2} and rep["failed"] == 0
    # both are rounded to 3 decimals, and elapsed_s is a few hundredths of a second here
    assert abs(rep["tokens_per_s"] * rep["elapsed_s"] - rep["tokens_generated"]) <= \
        0.0006 * rep["tokens_per_s"] + 0.001 * rep["elapsed_s"]
    on_disk = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert on_disk["accepted"] == 2 and on_disk["rejected_by_reason"] == rep["rejected_by_reason"]


def test_python_answers_run_in_the_sandbox(server, tmp_path):
    from pocketlm.eval.sandbox import isolation_problem

    if isolation_problem() is not None:
        pytest.skip(f"bwrap sandbox unavailable: {isolation_problem()}")
    check = {"kind": "python", "require_code": True, "check": "assert square(5) == 25"}
    items = [_item("python", "Write square, version A.", check), _item("python", "Write square, version B.", check),
             _item("python", "Write square, version C.", check), _item("python", "Write square, version D.", check)]
    _Fake.answers = {
        "Write square, version A.": "```python\ndef square(n):\n    return n * n\n\nprint(square(3))  # Output: 9\n```",
        "Write square, version B.": "```python\ndef square(n):\n    return n + n\n```\nThis doubles it, which works.",
        "Write square, version C.": "```python\ndef square(n):\n    return n ** 2\n\nprint(square(4))  # Output: 8"
                                    "\n```",
        "Write square, version D.": "Use the multiplication operator on the number with itself to square it."}
    rep, out, rej = _run(server, tmp_path, items, verify_code=True)
    assert [r["messages"][1]["content"] for r in out] == [_Fake.answers["Write square, version A."]]
    assert sorted(r["reason"] for r in rej) == ["verify:python:check_failed", "verify:python:no_code",
                                                "verify:python:wrong_output_comment"]
    assert rep["python_verification"].startswith("sandbox")


def test_build_items_and_tree():
    a = build_items("chats", 300, seed=0)
    assert [x.id for x in a] == [x.id for x in build_items("chats", 300, seed=0)]
    assert [x.id for x in a] != [x.id for x in build_items("chats", 300, seed=1)]
    assert len({x.id for x in a}) == 300
    domains = {x.domain for x in a}
    assert domains == set(load_tree()["domains"])
    assert {x.audience for x in a} >= {"general", "child"} and {x.style for x in a} >= {"plain", "steps"}
    assert any(len(x.turns) == 2 for x in a) and any(x.system for x in a)
    for x in a:
        if x.checks[0]["kind"] == "arith":      # chatgen's generators: the stated answer is the computed value
            from pocketlm.data.synthetic import fmt, safe_eval
            assert fmt(safe_eval(x.checks[0]["expression"])) == x.checks[0]["answer"]
    safety = build_items("prefs", 40, seed=0, domains=["harmful", "benign"])
    assert {x.domain for x in safety} == {"harmful", "benign"} and all(len(x.turns) == 1 for x in safety)
    lessons = build_items("lessons", 10, seed=0)
    assert all("textbook" in x.turns[0] or "lesson" in x.turns[0] or "tutorial" in x.turns[0] or
               "introduction" in x.turns[0] for x in lessons)
    with pytest.raises(DataPipelineError, match="unknown domains"):
        build_items("chats", 1, domains=["astrology"])
    with pytest.raises(DataPipelineError, match="kind"):
        build_items("poems", 1)


def test_cli_writes_sft_records(server, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    rc = commands.main(["teacher", "--kind", "chats", "--count", "5", "--concurrency", "3", "--out", str(out),
                        "--base-url", server, "--model", "fake", "--rpm", "0", "--domains", "howto,harmful",
                        "--no-verify-code"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert rep["accepted"] == len(lines) and rep["items"] == 5 and rep["processed"] == 5
    for r in lines:
        parse_messages(r["messages"])
        assert r["messages"][-1]["role"] == "assistant" and r["id"].startswith("teacher-chat/")
    assert {x["max_tokens"] for x in _Fake.seen} == {160} and {x["temperature"] for x in _Fake.seen} == {0.3}
    with pytest.raises(DataPipelineError, match="--topics"):
        commands.main(["teacher", "--out", str(out), "--base-url", server, "--model", "fake"])


def test_lessons_are_documents_filtered_like_web_text(server, tmp_path):
    items = build_items("lessons", 3, seed=2, domains=["science"])
    good = ("Energy is the ability to do work, and it comes in several forms.\n"
            "A moving ball has kinetic energy because of its motion.\n"
            "A book on a high shelf has potential energy because of its position.\n"
            "When the book falls, its stored energy turns into motion and then into sound and heat.\n"
            "Plants capture light from the sun and keep it as chemical energy in sugar.\n"
            "Our bodies release that chemical energy when we digest food and move our muscles.\n"
            "In every one of these changes, the total amount of energy stays the same.\n"
            "Scientists call this rule the conservation of energy, and it holds everywhere we have looked.")
    looping = "The sun is hot and the sun is hot and the sun is hot. " + good
    _Fake.answers = {items[0].turns[0]: good,
                     items[1].turns[0]: {"text": good + "\n\nExercise 1: What is", "finish": "length"},
                     items[2].turns[0]: looping}
    rep, out, rej = _run(server, tmp_path, items, kind="lessons")
    assert rep["accepted"] == 1 and rep["rejected_by_reason"] == {"dedup:exact_of": 1, "degenerate": 1}
    assert out[0]["id"].startswith("teacher-lesson/") and out[0]["metadata"]["domain"] == "science"
    assert out[0]["metadata"]["source"] == "teacher" and out[0]["text"] == good


def test_python_answers_get_more_tokens(server, tmp_path):
    _Fake.answers = {"What is a tuple in Python?": "A tuple is an ordered collection that cannot be changed."}
    items = [_item("python", "What is a tuple in Python?", {"kind": "python", "require_code": False}),
             _item("science", "Why is the sky blue?", {"kind": "none"})]
    _run(server, tmp_path, items, concurrency=1)
    by_q = {x["messages"][-1]["content"]: x["max_tokens"] for x in _Fake.seen}
    assert by_q == {"What is a tuple in Python?": 2048, "Why is the sky blue?": 1024}


KNOWLEDGE = Path(teacher_chat.__file__).parent / "assets" / "teacher_knowledge.json"


def test_knowledge_tree_loads_and_covers_every_country():
    tree = load_tree(KNOWLEDGE)
    countries = tree["domains"]["countries"]["entities"]
    assert len(countries) >= 190 and len({c["name"] for c in countries}) == len(countries)
    assert all(c["capital"] and c["continent"] for c in countries)
    by_name = {c["name"]: c["capital"] for c in countries}
    assert by_name["Burkina Faso"] == ["Ouagadougou"] and "Canberra" in by_name["Australia"]
    for d in ("space", "animals", "plants", "body", "materials", "earth", "jobs", "words"):
        assert len(tree["domains"][d]["entities"]) >= 30, d
    assert len(tree["domains"]["animals"]["entities"]) >= 100
    caps = tree_capitals(tree)
    assert "Paris" in caps and "Canberra" in caps and "Djibouti" not in caps and "Bissau" not in caps
    items = build_items("chats", 400, seed=0, tree=tree)
    assert {x.domain for x in items} == set(tree["domains"])
    assert all(x.checks[0]["kind"] == "entity" and "{" not in x.turns[0] for x in items)
    assert all(x.checks[0].get("capital") for x in items if x.domain == "countries")
    lessons = build_items("lessons", 20, seed=0, tree=tree)
    assert all(x.checks[0]["kind"] == "lesson" and x.checks[0]["entity"]["subject"] for x in lessons)
    # the shipped tree is untouched: no entity checks in its items
    assert not any(x.checks[0]["kind"] == "entity" for x in build_items("chats", 200, seed=0))


def test_knowledge_tree_rejects_bad_entities(tmp_path):
    tree = json.loads(KNOWLEDGE.read_text())
    tree["domains"]["space"]["entities"].append({"name": "Vega", "check": ["(unclosed"]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tree))
    with pytest.raises(DataPipelineError, match="bad check regex"):
        load_tree(bad)
    tree["domains"]["space"]["entities"][-1] = {"name": "Vega", "capital": []}
    bad.write_text(json.dumps(tree))
    with pytest.raises(DataPipelineError, match="'capital' must be a non-empty list"):
        load_tree(bad)


def test_entity_answers_are_verified(server, tmp_path):
    tree = load_tree(KNOWLEDGE)
    caps = tree_capitals(tree)
    country = {"kind": "entity", "subject": "Burkina Faso", "capital": ["Ouagadougou"]}
    right = ("Burkina Faso is a country in West Africa, and its capital is Ouagadougou. The people speak French, "
             "and most of them work on farms.")
    assert check_entity(right, country, caps) is None
    assert check_entity("Burkina Faso is in West Africa. Its capital city is Bamako, a busy town. It is hot.",
                        country, caps) == "verify:fact:wrong_capital"
    # the right capital named elsewhere does not excuse a wrong one in the capital sentence
    assert check_entity("Ouagadougou is a big city in Burkina Faso. The capital is Accra.", country, caps) == \
        "verify:fact:wrong_capital"
    assert check_entity("Burkina Faso is a country in West Africa with a hot climate and many farms.", country,
                        caps) == "verify:fact:missing_answer"
    # another capital in a sentence that is not about the capital is fine; listed alternatives are accepted
    assert check_entity("Burkina Faso borders Mali, whose largest city is Bamako. Ouagadougou is its capital.",
                        country, caps) is None
    bolivia = {"kind": "entity", "subject": "Bolivia", "capital": ["Sucre", "La Paz"]}
    assert check_entity("Bolivia is in South America. Its seat of government and capital is La Paz.", bolivia,
                        caps) is None
    jupiter = {"kind": "entity", "subject": "Jupiter", "check": ["largest|biggest"]}
    assert check_entity("Jupiter is the largest planet and a gas giant.", jupiter) is None
    assert check_entity("Jupiter is a gas giant with many moons.", jupiter) == "verify:fact:missing_keyword"
    assert check_entity("Saturn is the largest ringed planet.", jupiter) == "off_topic"
    # in a run, against the fake server, with the tree's own checks
    ok = _item("countries", "Tell me about Burkina Faso.", country)
    wrong = _item("countries", "Write a short entry about Burkina Faso.", country)
    _Fake.answers = {"Tell me about Burkina Faso.": right,
                     "Write a short entry about Burkina Faso.": "Burkina Faso is a country in West Africa. "
                     "The capital of Burkina Faso is Niamey. Many people there are farmers."}
    rep, out, rej = _run(server, tmp_path, [ok, wrong], tree=tree)
    assert [r["messages"][-1]["content"] for r in out] == [right]
    assert [r["reason"] for r in rej] == ["verify:fact:wrong_capital"]
    assert rep["rejected_by_reason"] == {"verify:fact:wrong_capital": 1}


def test_truncated_entity_answers_are_cut_to_the_last_sentence(server, tmp_path):
    check = {"kind": "entity", "subject": "the giraffe", "check": ["neck|tall"]}
    long = ("The giraffe is the tallest animal in the world, and it lives on the grasslands of Africa. It has a very "
            "long neck that helps it reach the leaves of tall trees. Giraffes eat leaves and they sleep for")
    prose = _item("howto", "How do I tie a tie?", {"kind": "none"})
    _Fake.answers = {"Tell me about the giraffe.": {"text": long, "finish": "length"},
                     "How do I tie a tie?": {"text": long, "finish": "length"}}
    rep, out, rej = _run(server, tmp_path, [_item("animals", "Tell me about the giraffe.", check), prose])
    assert [r["messages"][-1]["content"] for r in out] == [long.rsplit(".", 1)[0] + "."]
    assert [r["reason"] for r in rej] == ["truncated"]      # other domains keep the paragraph rule
    assert trim_to_sentence("One two three.", 15) is None


def test_a_capital_inside_the_country_name_does_not_count():
    caps = tree_capitals(load_tree(KNOWLEDGE))
    gb = {"kind": "entity", "subject": "Guinea-Bissau", "capital": ["Bissau"]}
    assert check_entity("Guinea-Bissau is a small country in West Africa, known for its food.", gb, caps) == \
        "verify:fact:missing_answer"
    assert check_entity("Guinea-Bissau is in West Africa, and its capital is Bissau.", gb, caps) is None
    kuwait = {"kind": "entity", "subject": "Kuwait", "capital": ["Kuwait City"]}
    assert check_entity("Kuwait is a small country, and its capital is Kuwait City.", kuwait, caps) is None
    sg = {"kind": "entity", "subject": "Singapore", "capital": ["Singapore", "city-state"]}
    assert check_entity("Singapore is an island in Southeast Asia, known for its port.", sg, caps) == \
        "verify:fact:missing_answer"
    assert check_entity("Singapore is a city-state in Southeast Asia, known for its port.", sg, caps) is None


def test_a_looping_entity_answer_keeps_its_clean_sentences(server, tmp_path):
    check = {"kind": "entity", "subject": "Poland", "capital": ["Warsaw"]}
    clean = ("Poland is a country in Central Europe, and its capital is Warsaw. It is known for its old towns and "
             "for the Baltic coast.")
    loop = clean + " The towns are old and the towns are small and the towns are old."
    no_capital = ("Poland is a country in Central Europe with many old towns and forests. It is known for the old "
                  "towns. It is known for the old towns. It is known for the old towns. Its capital is Warsaw.")
    _Fake.answers = {"Tell me about Poland.": loop, "Write about Poland.": no_capital}
    rep, out, rej = _run(server, tmp_path, [_item("countries", "Tell me about Poland.", check),
                                            _item("countries", "Write about Poland.", check)])
    assert [r["messages"][-1]["content"] for r in out] == [clean]
    assert [r["reason"] for r in rej] == ["degenerate"]     # its clean part lacks the capital
    assert clean_prefix("It is red. It is red. It is red.", 8) is None
    assert clean_prefix("It is red. It is red. It is red.", 3) == "It is red. It is red."
