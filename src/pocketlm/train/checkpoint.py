"""Atomic training checkpoints with everything an exact resume needs (RELIABILITY.md items 19-20).

Layout of a run directory:

    <run>/checkpoints/step-00000040/
        model/             the weights in the official layout (config.json, model.safetensors): `pocketlm.load`
                           and transformers read it as is
        train_state.pt     optimizer (full, keyed by parameter name), schedule step, tokens seen, data-loader
                           position, config hash, code version, world size
        rng-rank0.pt ...   RNG states of each rank: python, numpy, torch CPU, every CUDA device
        COMPLETE           written last: {"step": N, "files": {relative path: sha256}}

Save: everything goes to `step-N.tmp/`; each file is fsynced, then the folder; `os.replace` renames it to
`step-N/`; `COMPLETE` is written (and fsynced) last. A folder without COMPLETE never counts: `latest()` skips
it and `clean()` (run on start) deletes it and every `*.tmp`. So a crash at any point leaves either the previous
checkpoint or a complete new one, and the previous checkpoint's files are never touched.

Resume: `resumable()` checks every file of the newest complete checkpoint against the sha256 in its COMPLETE
(a flipped bit, a truncated or emptied file). A corrupt one is moved aside to `step-N.corrupt/` with a one-line
warning and the previous complete checkpoint is used (`prune` keeps `keep_checkpoints`, 2 by default, so there
is one); when no checkpoint is intact the run is refused with a `CheckpointError` (nothing is moved).

Lock: `RunLock` holds an exclusive `flock` on `<run>/run.lock` for the trainer's lifetime, with the holder's pid,
host, start time and command line written inside, so a second trainer on the same run directory stops at once
with `RunLockedError` naming the first. The kernel drops the lock when the holder exits, even on kill -9.

`train_state.pt` and the RNG files are read with `torch.load(weights_only=True)` and only from the run's own
directory (nothing here unpickles arbitrary objects); the weights are safetensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.fsutil import atomic_write_text, fsync_path, sha256_file

STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(PocketLMError, RuntimeError):
    """A training checkpoint is missing, incomplete, corrupt, or belongs to a different configuration."""


class RunLockedError(CheckpointError):
    """Another process is training in this run directory."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"




def is_complete(folder: Path) -> bool:
    return (folder / "COMPLETE").is_file() and STEP_RE.match(folder.name) is not None


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def checkpoint_step(folder: Path) -> int:
    """The optimizer step of a checkpoint folder `step-N`."""
    m = STEP_RE.match(Path(folder).name)
    if m is None:
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected a name like step-00000010)")
    return int(m.group(1))


def clean(run_dir: str | os.PathLike) -> list[Path]:
    """Delete partial checkpoints (`*.tmp`, or a step folder without COMPLETE); return what was removed.
    Quarantined `*.corrupt` folders are kept for inspection."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not is_complete(p) and not p.name.endswith(".corrupt"):
                shutil.rmtree(p)
                removed.append(p)
    return removed


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))
    for p in done[:-keep] if keep > 0 else []:
        (p / "COMPLETE").unlink()  # first make it incomplete, so a crash mid-delete leaves no half checkpoint
        shutil.rmtree(p)


def save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def begin(run_dir: Path, step: int) -> Path:
    """Create an empty `step-N.tmp/` (rank 0) and return it."""
    tmp = step_dir(run_dir, step).with_name(f"step-{step:08d}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int) -> Path:
    """fsync every file of `tmp` and the folder, rename it to `step-N`, then write COMPLETE (rank 0)."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(f)
        files[str(f.relative_to(tmp))] = sha256_file(f)
    for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
        fsync_path(d)
    final = tmp.with_name(f"step-{step:08d}")
    if final.exists():  # an incomplete leftover of the same step (clean() normally removed it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)
    atomic_write_text(final / "COMPLETE", json.dumps({"step": step, "files": files}, indent=1) + "\n")
    return final


def verify(folder: Path) -> str | None:
    """None when every file that COMPLETE lists is present with its recorded sha256; else why not, in one line."""
    folder = Path(folder)
    marker = folder / "COMPLETE"
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{marker}: unreadable ({e})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files or meta.get("step") != checkpoint_step(folder):
        return f"{marker}: not a file list for step {checkpoint_step(folder)}"
    for rel, want in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            return f"{path}: missing"
        got = sha256_file(path)
        if got != want:
            return f"{path}: sha256 {got[:16]}... does not match {want[:16]}... in COMPLETE"
    return None


def resumable(run_dir: str | os.PathLike, *, warn=None) -> Path | None:
    """The newest complete checkpoint whose files match their sha256s (None: the run has no checkpoint).

    Newer corrupt checkpoints are renamed to `step-N.corrupt` (kept, ignored from then on) and reported through
    `warn` (one line each). When every complete checkpoint is corrupt nothing is moved and CheckpointError says
    why for each: starting over silently would throw the run away."""
    root = Path(run_dir) / "checkpoints"
    done = sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), reverse=True) if root.is_dir() else []
    bad = []
    for folder in done:
        reason = verify(folder)
        if reason is None:
            for corrupt, why in bad:
                aside = corrupt.with_name(corrupt.name + ".corrupt")
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(corrupt, aside)
                fsync_path(root)
                (warn or _stderr)(f"checkpoint {corrupt} is corrupt ({why}); moved it to {aside.name} and resuming "
                                  f"from the previous complete checkpoint {folder.name}")
            return folder
        bad.append((folder, reason))
    if bad:
        raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from: "
                              + "; ".join(f"{f.name}: {why}" for f, why in bad)
                              + ". Restore the files, or start over in a new run directory")
    return None


def _stderr(line: str) -> None:
    print(f"pocketlm train: {line}", file=sys.stderr, flush=True)


def load_state(folder: Path, name: str) -> dict:
    """A `torch.save`d state from a checkpoint folder, with weights_only=True (tensors and plain containers)."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError on an empty file, UnpicklingError, RuntimeError from the zip reader
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


# ---- the run directory lock ---------------------------------------------------------------------------------------

_held_locks: dict[str, list] = {}  # real path of the lock file -> [fd, holders in this process]


class RunLock:
    """An exclusive lock on a run directory for as long as this object lives (or until `release()`).

    `fcntl.flock` on `<run>/run.lock`: the kernel releases it when the process ends, however it ends, so a stale
    lock file never blocks anyone. The lock is per process: trainers created one after another in the same
    process (the recipe's training chunks, a retry after an exception) share it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "run.lock"
        key = os.path.realpath(self.path)
        held = _held_locks.get(key)
        if held is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"{Path(run_dir)} is in use by another trainer ({holder}); wait for it to "
                                     "finish or stop it, or train in another --run-dir") from None
            except OSError as e:  # ENOLCK / EOPNOTSUPP: a file system without flock (some network mounts)
                _stderr(f"cannot lock {self.path} ({e.strerror}); make sure no other trainer uses this run "
                        "directory")
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            held = _held_locks[key] = [fd, 0]
        held[1] += 1
        self._release = weakref.finalize(self, _drop_holder, key)

    def release(self) -> None:
        self._release()


def _drop_holder(key: str) -> None:
    held = _held_locks.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held_locks[key]
        with contextlib.suppress(OSError):  # (not locked where the file system has no flock)
            fcntl.flock(held[0], fcntl.LOCK_UN)  # also for a forked child that shares the descriptor
        os.close(held[0])


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


# ---- RNG states ---------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class StateDictView:
    """A full state dict that `pocketlm.formats.hf.save_checkpoint` can write like a model (FSDP ranks hold
    shards, so the gathered full tensors are written instead of the module)."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def named_parameters(self):
        return iter(self._state.items())

    def parameters(self):
        return iter(self._state.values())
