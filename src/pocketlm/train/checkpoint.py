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

`train_state.pt` and the RNG files are read with `torch.load(weights_only=True)` and only from the run's own
directory (nothing here unpickles arbitrary objects); the weights are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.fsutil import atomic_write_text, fsync_path

STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(PocketLMError, RuntimeError):
    """A training checkpoint is missing, incomplete, or belongs to a different configuration."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(folder: Path) -> bool:
    return (folder / "COMPLETE").is_file() and STEP_RE.match(folder.name) is not None


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def clean(run_dir: str | os.PathLike) -> list[Path]:
    """Delete partial checkpoints (`*.tmp`, or a step folder without COMPLETE); return what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not is_complete(p):
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


def load_state(folder: Path, name: str) -> dict:
    """A `torch.save`d state from a checkpoint folder, with weights_only=True (tensors and plain containers)."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    return torch.load(path, map_location="cpu", weights_only=True)


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
