"""The local model store: `$POCKETLM_HOME/models` (default `~/.cache/pocketlm/models`).

Layout, one folder per model name (the name percent-encoded, so `hf.co/a/b:c` is one folder):

    models/<name>/manifest.json   name, source, format, quantization, size, times, Modelfile defaults
    models/<name>/model/          the weights as `pocketlm.load` reads them (checkpoint folder or one .gguf)
    models/.partial/<name>/       a pull in progress (resumed by the next pull; never listed, never loaded)
    models/.locks/<name>.lock     held (flock) while a pull, import, copy or removal of that name runs

A model only appears under `models/<name>/` by one `os.replace` of a complete, verified folder, so a model
that `list` shows is always whole. `cp` hard-links the weights (no second copy on disk); `rm` removes the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from pocketlm.errors import ModelNotFoundError, StoreError
from pocketlm.store.registry import TAGS, canonical, is_name, source_for

MANIFEST = "manifest.json"
WEIGHTS_DIR = "model"
MANIFEST_VERSION = 1


def home() -> Path:
    """`$POCKETLM_HOME`, else `~/.cache/pocketlm`: the store, saved chats and the chat history live here."""
    env = os.environ.get("POCKETLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pocketlm"


def _dirname(name: str) -> str:
    return quote(name, safe="-_.")


@dataclass
class Entry:
    """One model in the store."""

    name: str
    folder: Path
    manifest: dict

    @property
    def weights(self) -> Path:
        """What `pocketlm.load` takes: the checkpoint folder, or the .gguf file inside it."""
        return self.folder / self.manifest["weights"]

    @property
    def modelfile(self) -> dict:
        """{"from", "system", "parameters", "license"}: the defaults `run`, `chat` and `serve` apply."""
        return self.manifest.get("modelfile") or {}

    @property
    def size(self) -> int:
        return int(self.manifest.get("size", 0))

    @property
    def modified(self) -> float:
        return float(self.manifest.get("modified", (self.folder / MANIFEST).stat().st_mtime))


class Store:
    """The models under one root folder (default `home() / "models"`)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else home() / "models"

    # ---- paths and locks ----------------------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        return self.root / _dirname(name)

    def staging(self, name: str) -> Path:
        """The folder a pull of `name` downloads into; the same path every time, so a second pull resumes."""
        return self.root / ".partial" / _dirname(name)

    @contextlib.contextmanager
    def lock(self, name: str, *, wait_message: bool = True) -> Iterator[None]:
        """Hold the lock of `name` (an flock on `.locks/<name>.lock`): concurrent pulls of one name take turns,
        the second then finds the model complete. Released when the process dies, so it never goes stale."""
        import fcntl

        path = self.root / ".locks" / f"{_dirname(name)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    print(f"waiting for another pocketlm process working on {name} ...", file=sys.stderr)
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- reading ------------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every complete model, sorted by name."""
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.name.startswith(".") or not (d / MANIFEST).is_file():
                    continue
                entry = self._read(d)
                if entry is not None:
                    out.append(entry)
        return sorted(out, key=lambda e: e.name)

    def _read(self, folder: Path) -> Entry | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # not a store folder (or damaged by hand): not a model
        name = manifest.get("name") if isinstance(manifest, dict) else None
        if not isinstance(name, str) or "weights" not in manifest:
            return None
        return Entry(name, folder, manifest)

    def find(self, name: str) -> Entry | None:
        """The entry of `name` (any spelling `canonical` accepts), or None."""
        folder = self.folder(canonical(name))
        return self._read(folder) if (folder / MANIFEST).is_file() else None

    def get(self, name: str) -> Entry:
        """The entry of `name`; ModelNotFoundError (with the command that fetches it) when it is not here."""
        entry = self.find(name)
        if entry is None:
            raise ModelNotFoundError(not_found_message(name, self))
        return entry

    # ---- writing ------------------------------------------------------------------------------------------------
    def place(self, name: str, staged: Path, manifest: dict) -> Entry:
        """Move a complete folder `staged` (holding `model/`) into the store as `name`, atomically: the old model
        of that name, if any, stays loadable until the one `os.replace` that swaps the new one in."""
        name = canonical(name)
        now = time.time()
        manifest = dict(manifest, name=name, version=MANIFEST_VERSION, modified=now)
        manifest.setdefault("created", now)
        manifest["size"] = _tree_size(staged / WEIGHTS_DIR)
        tmp = staged / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, staged / MANIFEST)
        final = self.folder(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
        os.replace(staged, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Entry(name, final, manifest)

    def new_staging(self, name: str) -> Path:
        """A fresh, empty folder on the store's file system for building `name` (import, copy, create)."""
        d = self.root / ".partial" / f"{_dirname(name)}.{os.getpid()}.{time.monotonic_ns()}"
        d.mkdir(parents=True)
        return d

    def remove(self, name: str) -> Entry:
        """Delete `name` from the store; ModelNotFoundError when it is not here."""
        name = canonical(name)
        with self.lock(name):
            entry = self.get(name)
            trash = entry.folder.with_name(f".rm-{entry.folder.name}-{os.getpid()}")
            os.replace(entry.folder, trash)  # gone from `list` at once, even if the delete below is slow
            shutil.rmtree(trash, ignore_errors=True)
        return entry

    def copy(self, src: str, dst: str) -> Entry:
        """`dst` becomes a copy of `src` (weights hard-linked where the file system allows); its own defaults."""
        src, dst = canonical(src), canonical(dst)
        if src == dst:
            raise StoreError(f"cp: source and destination are the same model {src!r}")
        entry = self.get(src)
        with self.lock(dst):
            staged = self.new_staging(dst)
            try:
                link_tree(entry.folder / WEIGHTS_DIR, staged / WEIGHTS_DIR)
                manifest = {k: v for k, v in entry.manifest.items() if k not in ("name", "created", "modified")}
                manifest["copied_from"] = src
                return self.place(dst, staged, manifest)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise

    def import_path(self, path: str | os.PathLike, name: str, *, modelfile: dict | None = None) -> Entry:
        """Add a local checkpoint folder, `.safetensors` file (with its folder) or `.gguf` file under `name`.

        The model's headers are read first (config, tensor names and types: a file pocketlm cannot run fails
        before anything is written), then its files are hard-linked (copied across file systems) into the store."""
        name = canonical(name)
        src = Path(path).expanduser()
        if not src.exists():
            raise StoreError(f"import: {str(src)!r} does not exist")
        from pocketlm.store.describe import check_loadable
        check_loadable(src)
        with self.lock(name):
            staged = self.new_staging(name)
            try:
                if src.is_file() and src.suffix == ".gguf":
                    link_tree(src, staged / WEIGHTS_DIR / src.name)
                    weights = f"{WEIGHTS_DIR}/{src.name}"
                else:
                    folder = src if src.is_dir() else src.parent
                    link_tree(folder, staged / WEIGHTS_DIR, skip_hidden=True)
                    weights = WEIGHTS_DIR
                manifest = {"weights": weights, "source": {"kind": "import", "path": str(src.resolve())}}
                from pocketlm.store.describe import describe_weights
                manifest.update(describe_weights(staged / weights))
                if modelfile:
                    manifest["modelfile"] = modelfile
                return self.place(name, staged, manifest)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise


def link_tree(src: Path, dst: Path, *, skip_hidden: bool = False) -> None:
    """Hard-link (else copy) file `src` to `dst`, or every file of folder `src` under folder `dst`."""
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src)
        if skip_hidden and any(part.startswith(".") for part in rel.parts):
            continue
        if item.is_file():
            link_tree(item, dst / rel)
    dst.mkdir(parents=True, exist_ok=True)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def not_found_message(spec: str, store: Store) -> str:
    """The one message for a name that is not in the store: the command that fetches it, or what to do."""
    name = canonical(spec)
    try:
        source_for(name)
        pullable = True
    except ModelNotFoundError:
        pullable = False
    if pullable:
        return f"model {name!r} is not in the store ({store.root}); fetch it with `pocketlm pull {name}`"
    have = [e.name for e in store.entries()]
    return (f"{spec!r} is neither an existing path nor a preset, nor a model in the store ({store.root}; "
            + (f"it has {', '.join(have)}" if have else "it is empty") + "); pull one of the tags ("
            + ", ".join(sorted(TAGS)) + ") or hf.co/OWNER/REPO[:FILE], or `pocketlm import PATH --name NAME`")


def resolve(spec: str | None, store: Store | None = None) -> Entry | None:
    """The store entry MODEL names, or None when MODEL is something else `pocketlm.load` reads (an existing
    path or a preset). Raises ModelNotFoundError for a name that is in neither (the message says how to fetch it).
    """
    if spec is None:
        return None
    from pocketlm.config import PRESETS
    from pocketlm.vision import VISION_PRESETS
    if spec in PRESETS or spec in VISION_PRESETS or Path(spec).expanduser().exists():
        return None
    store = store or Store()
    if not is_name(spec):
        return None  # not spelled like a name (a path with slashes): the loader's own error says what it is
    entry = store.find(spec)
    if entry is None:
        raise ModelNotFoundError(not_found_message(spec, store))
    return entry
