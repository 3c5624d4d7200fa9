"""Checkpoint I/O in the official Hugging Face layout: safetensors files, streamed, never unpickled.

Layout (safetensors `README.md`, `safetensors/src/tensor.rs`; HF `transformers` sharding):

    u64 little-endian N | N bytes of UTF-8 JSON header | data section
    header = {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}}

    folder/model.safetensors                                      one file, or
    folder/model-00001-of-0000N.safetensors ... + model.safetensors.index.json
        index = {"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file name}}

`read_header` is our own strict, pure-Python parser (RELIABILITY.md §1.1): header length <= 100,000,000 and
inside the file, UTF-8, a JSON object without duplicate keys, `__metadata__` str -> str, known dtypes, shapes of
non-negative ints, byte counts computed with Python ints, offsets contiguous with no overlap and no hole, and a
data section exactly as long as the tensors need -- so a truncated or polyglot file is rejected before any
tensor is read. Tensors are then read one at a time through `safetensors.safe_open`, which memory-maps; each
`get` opens and closes its own handle, so a tensor that the caller copies and drops releases its pages, and
loading a model never holds the file and the model in memory at once.

`write_checkpoint` writes shards to temporary files, fsyncs them, and renames them into place, the index last,
so an interrupted save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pocketlm.errors import WeightFormatError
from pocketlm.fsutil import fsync_path

MAX_HEADER_BYTES = 100_000_000  # safetensors MAX_HEADER_SIZE
INT64_MAX = 2**63 - 1  # a dimension must fit torch's int64 sizes (an empty tensor could otherwise claim 2^64)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8), "U32": (torch.uint32, 4), "U16": (torch.uint16, 2), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
_TORCH_TO_NAME = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def n_bytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors in data order, metadata, and where the data section starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


# ----- the strict header parser ----------------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _element_bytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor, or None as soon as the count exceeds `limit` (keeps huge shape lists cheap)."""
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def parse_header(raw: bytes, data_len: int, where: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate a header's JSON bytes against a data section of `data_len` bytes.

    Returns the tensors (sorted by offset) and the `__metadata__`. Raises WeightFormatError naming `where`.
    """
    def fail(what: str) -> WeightFormatError:
        return WeightFormatError(f"{where}: {what}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise fail(f"header does not start with '{{': {text[:40]!r}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise fail(f"duplicate key {e.args[0]!r} in header") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int-digit limit, deep nesting
        raise fail(f"header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise fail(f"header is a JSON {type(obj).__name__}, expected an object")

    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail(f"__metadata__ must map strings to strings, got {str(metadata)[:100]}")

    entries: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets; got {str(info)[:100]}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= INT64_MAX for d in shape):
            raise fail(f"tensor {name!r}: shape must be a list of ints in [0, 2^63), got {str(shape)[:100]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise fail(f"tensor {name!r}: data_offsets must be [begin, end] of non-negative ints, got {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise fail(f"tensor {name!r}: data_offsets end {end} < begin {begin}")
        n_bytes = _element_bytes(shape, DTYPES[dtype][1], end - begin)
        if n_bytes != end - begin:
            raise fail(f"tensor {name!r}: shape {shape[:8]} of {dtype} does not fill data_offsets {offsets} "
                       f"({end - begin} bytes)")
        entries[name] = TensorEntry(dtype, tuple(shape), begin, end)

    # Contiguous, in order, no overlap, no hole, full coverage (this is what blocks polyglot files).
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    expected = 0
    for name, e in ordered:
        if e.begin != expected:
            kind = "overlaps the previous tensor" if e.begin < expected else "leaves a hole after the previous tensor"
            raise fail(f"tensor {name!r}: data_offsets {[e.begin, e.end]} {kind} (expected begin {expected})")
        expected = e.end
    if expected != data_len:
        kind = "is truncated" if expected > data_len else "has trailing bytes"
        raise fail(f"data section {kind}: tensors need {expected} bytes, the file has {data_len}")
    return dict(ordered), metadata


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a `.safetensors` file without reading any tensor data."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise WeightFormatError(f"{where}: file is {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise WeightFormatError(f"{where}: header length {n} exceeds the limit {MAX_HEADER_BYTES}")
            if 8 + n > size:
                raise WeightFormatError(f"{where}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise WeightFormatError(f"{where}: cannot read safetensors file: {e}") from None
    if len(raw) != n:
        raise WeightFormatError(f"{where}: file shrank while reading the header")
    tensors, metadata = parse_header(raw, size - 8 - n, where)
    return SafetensorsHeader(tensors, metadata, 8 + n)


# ----- the reader -----------------------------------------------------------------------------------------------

def _safe_shard_name(name: object, index_path: Path) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or not name.endswith(".safetensors")):
        raise WeightFormatError(f"{index_path}: shard file name {name!r} is not a plain *.safetensors file name")
    return name


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        text = index_path.read_text(encoding="utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise WeightFormatError(f"{index_path}: duplicate key {e.args[0]!r}") from None
    except (OSError, ValueError, RecursionError) as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise WeightFormatError(f"{index_path}: cannot parse the index: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise WeightFormatError(f"{index_path}: expected an object with a 'weight_map' object")
    if not isinstance(obj.get("metadata", {}), dict):
        raise WeightFormatError(f"{index_path}: 'metadata' must be an object")
    return {str(k): _safe_shard_name(v, index_path) for k, v in obj["weight_map"].items()}


class CheckpointReader:
    """Read a safetensors checkpoint (one file, a folder with `model.safetensors`, or a sharded folder).

    Every header (and the index) is validated when the reader is created; tensors are read one at a time.

    Args:
        path: a `.safetensors` file, or a folder holding `model.safetensors` or
            `model.safetensors.index.json` with its shards (`model.safetensors` wins when both exist, as in HF).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        if path.is_file():
            self.files = [path]
        elif (path / SINGLE_FILE).is_file():
            self.files = [path / SINGLE_FILE]
        elif (path / INDEX_FILE).is_file():
            self.files = self._open_index(path / INDEX_FILE)
            return
        elif path.is_dir():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise WeightFormatError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors files here: {found})")
        else:
            raise WeightFormatError(f"{path}: no such checkpoint file or folder")
        self._add(self.files[0], read_header(self.files[0]))

    def _add(self, file: Path, header: SafetensorsHeader) -> None:
        for name, entry in header.tensors.items():
            if name in self._where:
                raise WeightFormatError(f"{file}: tensor {name!r} is also in {self._where[name]}")
            self._where[name], self._entries[name] = file, entry
        self.metadata.update(header.metadata)

    def _open_index(self, index_path: Path) -> list[Path]:
        weight_map = _read_index(index_path)
        folder = index_path.parent
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise WeightFormatError(f"{index_path}: shard {shard!r} is missing from {folder}")
        for shard in shards:
            file = folder / shard
            header = read_header(file)
            self._add(file, header)
            for name in header.tensors:
                if name not in weight_map:
                    raise WeightFormatError(f"{file}: tensor {name!r} is not in the index {index_path.name}")
                if weight_map[name] != shard:
                    raise WeightFormatError(f"{file}: tensor {name!r} is indexed to {weight_map[name]!r}")
        for name, shard in weight_map.items():
            if name not in self._where:
                raise WeightFormatError(f"{index_path}: tensor {name!r} is indexed to {shard!r} but not in it")
        return [folder / s for s in shards]

    def keys(self) -> list[str]:
        """Tensor names, file by file in data order (sequential reads)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> TensorEntry:
        if name not in self._entries:
            raise WeightFormatError(f"checkpoint {self.files[0].parent}: no tensor named {name!r}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name).dtype][0]

    def file_of(self, name: str) -> Path:
        self._entry(name)
        return self._where[name]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(e.n_bytes for e in self._entries.values())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor, memory-mapped (converted to `dtype` if given and different).

        Without conversion the result is a copy-on-write view of the file's pages: writing to it never
        touches the file. The handle is closed before returning; the view keeps its own mapping alive.
        """
        entry, file = self._entry(name), self._where[name]
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                t = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise WeightFormatError(f"{file}: cannot read tensor {name!r}: {e}") from None
        if tuple(t.shape) != entry.shape or t.dtype != DTYPES[entry.dtype][0]:  # the file changed under us
            raise WeightFormatError(f"{file}: tensor {name!r} is {t.dtype}{tuple(t.shape)}, the header said "
                                    f"{entry.dtype}{entry.shape}")
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time."""
        for name in self.keys():
            yield name, self.get(name, dtype)

    def close(self) -> None:
        """Nothing is held open between `get` calls; kept for the context-manager protocol."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({[str(f) for f in self.files]}, {len(self)} tensors, {self.total_bytes} bytes)"


# ----- the writer -----------------------------------------------------------------------------------------------

def _prepare(name: object, t: object) -> torch.Tensor:
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"tensor name must be a non-empty string other than '__metadata__', got {name!r}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r} is a {type(t).__name__}, expected torch.Tensor")
    if t.dtype not in _TORCH_TO_NAME:
        raise ValueError(f"tensor {name!r} has dtype {t.dtype}, not storable; supported: {sorted(DTYPES)}")
    return t.detach().to("cpu").contiguous()


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_checkpoint(folder: str | os.PathLike[str],
                     tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                     max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write tensors as `model.safetensors`, or as HF shards plus `model.safetensors.index.json`.

    Tensors are grouped greedily, in the given order, into shards of at most `max_shard_bytes` of data (a
    larger tensor gets a shard of its own); one shard is written as `model.safetensors`. Shards of a previous
    save in the folder that the new checkpoint does not name are removed.

    Args:
        folder: created if missing.
        tensors: a mapping or an iterable of (name, tensor); only one shard's worth is held at a time.
        max_shard_bytes: data bytes per shard.
        metadata: str -> str stored in every file's `__metadata__` (after {"format": "pt"}).

    Returns:
        The files written, in shard order.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"metadata must map strings to strings, got {meta!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    temps: list[Path] = []  # one per shard, in order
    shard_names: list[list[str]] = []
    seen: set[str] = set()
    total = 0

    def flush(shard: dict[str, torch.Tensor]) -> None:
        tmp = folder / f".tmp-{token}-{len(temps):05d}.safetensors"
        temps.append(tmp)
        save_file(shard, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; weights are shared like any file
        fsync_path(tmp)
        shard_names.append(list(shard))

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    try:
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, ptrs = 0, set()
        for name, t in items:
            if name in seen:
                raise ValueError(f"tensor name {name!r} given twice")
            seen.add(name)
            t = _prepare(name, t)
            n = t.numel() * t.element_size()
            if shard and shard_bytes + n > max_shard_bytes:
                flush(shard)
                shard, shard_bytes, ptrs = {}, 0, set()
            if n and t.untyped_storage().data_ptr() in ptrs:
                t = t.clone()  # safetensors refuses tensors sharing memory within a file
            if n:
                ptrs.add(t.untyped_storage().data_ptr())
            shard[name], shard_bytes, total = t, shard_bytes + n, total + n
        if shard or not temps:
            flush(shard)

        # Commit: take away the old entry point first, so a crash mid-way leaves nothing that looks complete.
        (folder / INDEX_FILE).unlink(missing_ok=True)
        if len(temps) == 1:
            finals = [folder / SINGLE_FILE]
        else:
            (folder / SINGLE_FILE).unlink(missing_ok=True)
            finals = [folder / f"model-{i + 1:05d}-of-{len(temps):05d}.safetensors" for i in range(len(temps))]
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        if len(finals) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f.name for f, names in zip(finals, shard_names) for n in sorted(names)}}
            tmp_index = folder / f".tmp-{token}-index.json"
            temps.append(tmp_index)
            tmp_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            fsync_path(tmp_index)
            os.replace(tmp_index, folder / INDEX_FILE)
        keep = {f.name for f in finals}
        for stale in folder.iterdir():
            if SHARD_PATTERN.match(stale.name) and stale.name not in keep:
                stale.unlink()
        fsync_path(folder)
        return finals
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
