"""Token shards: the on-disk format pretraining reads, an atomic writer, and a resumable mixture loader.

Format (version 1). A dataset is one folder:

    index.json          {"format": "pocketlm-token-shards", "version": 1, "dtype": "uint16" | "uint32",
                         "eos_id": int | null, "num_tokens": int, "num_documents": int,
                         "shards": [{"file": "shard-00000.bin", "num_tokens": int, "sha256": hex}, ...]}
    shard-00000.bin     the token ids, raw little-endian, no header, documents concatenated in order, each one
    shard-00001.bin     followed by `eos_id` when the writer was given one (a document may span two shards)

uint16 holds any id below 65536 (the Phi-3 vocabulary has 32064 rows); uint32 is for larger vocabularies. The
folder appears at once: the writer fills `<folder>.tmp/`, fsyncs every file and the folder, writes index.json
last and renames the folder into place, so a folder with an index.json is always complete. The same documents
and settings always give the same bytes.

Loading. `TokenWindows` cuts the concatenated stream into training rows of `seq_len + 1` tokens with stride
`seq_len` (every token is a target once, nanoGPT-style; rows cross document boundaries, separated by eos).
`MixtureLoader` draws global sample k from a source chosen by a hash of (seed, k) against the current source
weights (which the trainer changes between pretraining phases) and takes that source's next row from a
per-epoch permutation seeded by (seed, source name, epoch). Each rank materialises only its slice of every
global batch, so the sample stream does not depend on the world size, and the whole position is a few integers:
`state_dict()` = global samples drawn + per-source rows drawn (-> epoch, offset in the permutation, and the
shard/offset of the next row) + seed + weights. Restoring it continues the same stream exactly, also with a
different world size (every remaining sample is covered once).

Deviations: no per-document attention masking in pretraining (rows cross documents, as in GPT-2/nanoGPT and
Phi-3's own pretraining); packed chat rows with document masks live in `pocketlm.train.sft`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.fsutil import fsync_path

FORMAT = "pocketlm-token-shards"
VERSION = 1
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(PocketLMError, ValueError):
    """A token shard folder, dataset file or loader state is missing, corrupt or inconsistent."""


class ShardWriter:
    """Write documents (lists of ids) into a new shard folder; `close()` makes it appear atomically.

    Args:
        folder: the dataset folder to create (must not exist).
        dtype: "uint16" (ids < 65536) or "uint32".
        shard_tokens: tokens per shard file (the last one may be shorter).
        eos_id: appended after every document (None: documents are concatenated as given).
    """

    def __init__(self, folder: str | os.PathLike, *, dtype: str = "uint16", shard_tokens: int = 1 << 26,
                 eos_id: int | None = None):
        if dtype not in DTYPES:
            raise DataError(f"shard dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder = Path(folder)
        if self.folder.exists():
            raise DataError(f"{self.folder}: already exists; shard folders are written once")
        self.tmp = self.folder.with_name(self.folder.name + ".tmp")
        if self.tmp.exists():  # a writer that died: its partial output is garbage
            for f in self.tmp.iterdir():
                f.unlink()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.dtype, self.np_dtype, self.shard_tokens, self.eos_id = dtype, DTYPES[dtype], shard_tokens, eos_id
        self.limit = np.iinfo(self.np_dtype).max
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._shards: list[dict] = []
        self.num_tokens = self.num_documents = 0
        self._closed = False

    def add(self, ids: Iterable[int]) -> None:
        if self._closed:
            raise DataError(f"{self.folder}: writer is closed")
        arr = np.asarray(list(ids) + ([self.eos_id] if self.eos_id is not None else []), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > self.limit):
            raise DataError(f"token id {int(arr.max() if arr.max() > self.limit else arr.min())} does not fit "
                            f"{self.dtype}")
        self._buf.append(arr.astype(self.np_dtype))
        self._buffered += arr.size
        self.num_tokens += arr.size
        self.num_documents += 1
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self._buf) if self._buf else np.zeros(0, self.np_dtype)
        out, rest = data[:n], data[n:]
        self._buf, self._buffered = ([rest] if rest.size else []), rest.size
        name = f"shard-{len(self._shards):05d}.bin"
        raw = out.astype(out.dtype.newbyteorder("<"), copy=False).tobytes()
        with open(self.tmp / name, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        self._shards.append({"file": name, "num_tokens": int(out.size), "sha256": hashlib.sha256(raw).hexdigest()})

    def close(self) -> Path:
        if self._closed:
            return self.folder
        if self._buffered:
            self._flush(self._buffered)
        index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, "eos_id": self.eos_id,
                 "num_tokens": self.num_tokens, "num_documents": self.num_documents, "shards": self._shards}
        (self.tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        fsync_path(self.tmp / "index.json")
        fsync_path(self.tmp)
        os.replace(self.tmp, self.folder)
        fsync_path(self.folder.parent)
        self._closed = True
        return self.folder

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()


def write_shards(folder: str | os.PathLike, documents: Iterable[Iterable[int]], **kw) -> Path:
    """Write `documents` into a new shard folder (see ShardWriter for the keyword arguments)."""
    with ShardWriter(folder, **kw) as w:
        for doc in documents:
            w.add(doc)
    return w.folder


class ShardSet:
    """A shard folder opened read-only: the token stream as memory-mapped arrays."""

    def __init__(self, folder: str | os.PathLike, *, verify: bool = False):
        self.folder = Path(folder)
        path = self.folder / "index.json"
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{self.folder}: no index.json (not a token shard folder, or not finished)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{path}: format {index.get('format')!r} version {index.get('version')!r}; expected "
                            f"{FORMAT!r} version {VERSION}")
        if index.get("dtype") not in DTYPES:
            raise DataError(f"{path}: dtype {index.get('dtype')!r} is not one of {sorted(DTYPES)}")
        self.index = index
        dtype = np.dtype(DTYPES[index["dtype"]]).newbyteorder("<")
        self.arrays, starts = [], [0]
        for s in index["shards"]:
            f = self.folder / s["file"]
            if not f.is_file() or f.stat().st_size != s["num_tokens"] * dtype.itemsize:
                raise DataError(f"{f}: missing or not {s['num_tokens']} tokens long")
            if verify and hashlib.sha256(f.read_bytes()).hexdigest() != s["sha256"]:
                raise DataError(f"{f}: sha256 does not match index.json")
            self.arrays.append(np.memmap(f, dtype=dtype, mode="r") if s["num_tokens"] else np.zeros(0, dtype))
            starts.append(starts[-1] + s["num_tokens"])
        self.starts = np.asarray(starts, dtype=np.int64)
        self.num_tokens = int(starts[-1])

    def locate(self, offset: int) -> tuple[int, int]:
        """(shard number, offset inside it) of a global token offset."""
        shard = int(np.searchsorted(self.starts, offset, side="right")) - 1
        return shard, offset - int(self.starts[shard])

    def read(self, offset: int, n: int) -> np.ndarray:
        """n tokens from global offset `offset`, as int64 (may span shards)."""
        if offset < 0 or offset + n > self.num_tokens:
            raise DataError(f"{self.folder}: read [{offset}, {offset + n}) is outside [0, {self.num_tokens})")
        out, shard, pos = [], *self.locate(offset)
        while n > 0:
            take = min(n, len(self.arrays[shard]) - pos)
            out.append(np.asarray(self.arrays[shard][pos:pos + take], dtype=np.int64))
            n, shard, pos = n - take, shard + 1, 0
        return np.concatenate(out)


class Source(Protocol):
    """What MixtureLoader draws from: a fixed number of rows, each a dict of equally shaped int arrays."""

    def __len__(self) -> int: ...

    def item(self, i: int) -> dict[str, np.ndarray]: ...


class TokenWindows:
    """Rows of `seq_len + 1` consecutive tokens at stride `seq_len`: {"input_ids", "labels"}, each (seq_len,)."""

    def __init__(self, shards: ShardSet | str | os.PathLike, seq_len: int):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        self.seq_len = seq_len
        self.n = max(0, (self.shards.num_tokens - 1) // seq_len)
        if self.n == 0:
            raise DataError(f"{self.shards.folder}: {self.shards.num_tokens} tokens give no row of "
                            f"{seq_len + 1} tokens")

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> dict[str, np.ndarray]:
        w = self.shards.read(i * self.seq_len, self.seq_len + 1)
        return {"input_ids": w[:-1], "labels": w[1:]}

    def where(self, i: int) -> tuple[int, int]:
        return self.shards.locate(i * self.seq_len)


def _uniform(seed: int, k: int) -> float:
    """A float in [0, 1) from (seed, k): splitmix64, so the draw for sample k needs no state."""
    z = (seed * 0x9E3779B97F4A7C15 + (k + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


class MixtureLoader:
    """Batches drawn from weighted sources, deterministic in (seed, sample index), resumable exactly.

    Args:
        sources: name -> Source (TokenWindows, or the SFT/DPO row sources of pocketlm.train).
        weights: name -> non-negative weight (a missing name weighs 0); change it with `set_weights`.
        global_batch: rows per global micro-batch (all ranks together).
        rank, world_size: this process takes rows [rank * global_batch / world_size, ...) of every batch.
        seed: the shuffle and mixture seed.
    """

    def __init__(self, sources: Mapping[str, Source], weights: Mapping[str, float], *, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if not sources:
            raise DataError("no data sources")
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.sources = dict(sources)
        self.names = sorted(self.sources)
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.samples = 0
        self.counts = {n: 0 for n in self.names}
        self._perm: dict[str, tuple[int, np.ndarray]] = {}
        self.set_weights(weights)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        unknown = set(weights) - set(self.sources)
        if unknown:
            raise DataError(f"weights name unknown sources {sorted(unknown)}; sources are {self.names}")
        w = [float(weights.get(n, 0.0)) for n in self.names]
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise DataError(f"source weights must be non-negative with a positive sum, got {dict(weights)}")
        self.weights = dict(zip(self.names, w))
        total, acc = sum(w), 0.0
        self._cum = []
        for x in w:
            acc += x / total
            self._cum.append(acc)

    def _choose(self, k: int) -> str:
        u = _uniform(self.seed, k)
        for name, c in zip(self.names, self._cum):
            if u < c and self.weights[name] > 0:
                return name
        return [n for n in self.names if self.weights[n] > 0][-1]

    def _row(self, name: str, count: int) -> int:
        n = len(self.sources[name])
        epoch, j = divmod(count, n)
        cached = self._perm.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), epoch])
            cached = (epoch, rng.permutation(n))
            self._perm[name] = cached
        return int(cached[1][j])

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch, stacked: {key: (global_batch / world_size, ...)}."""
        per = self.global_batch // self.world_size
        lo, hi = self.rank * per, (self.rank + 1) * per
        rows = []
        for b in range(self.global_batch):
            name = self._choose(self.samples)
            if lo <= b < hi:
                rows.append(self.sources[name].item(self._row(name, self.counts[name])))
            self.counts[name] += 1
            self.samples += 1
        return {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}

    def position(self, name: str) -> dict[str, int]:
        """Where source `name` stands: epoch, offset in that epoch's permutation, shard and offset of the next row."""
        src, count = self.sources[name], self.counts[name]
        epoch, offset = divmod(count, len(src))
        pos = {"epoch": epoch, "offset": offset}
        if hasattr(src, "where"):
            pos["shard"], pos["shard_offset"] = src.where(self._row(name, count))
        return pos

    def state_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "counts": dict(self.counts),
                "weights": dict(self.weights), "sizes": {n: len(self.sources[n]) for n in self.names},
                "positions": {n: self.position(n) for n in self.names}}

    def load_state_dict(self, state: Mapping) -> None:
        sizes = {n: len(self.sources[n]) for n in self.names}
        if state.get("seed") != self.seed or dict(state.get("sizes", {})) != sizes:
            raise DataError(f"loader state is for seed {state.get('seed')} and source sizes {state.get('sizes')}; "
                            f"this loader has seed {self.seed} and sizes {sizes} (the data changed?)")
        if set(state["counts"]) != set(self.names):
            raise DataError(f"loader state names sources {sorted(state['counts'])}; this loader has {self.names}")
        self.samples = int(state["samples"])
        self.counts = {n: int(state["counts"][n]) for n in self.names}
        self.set_weights(state["weights"])
