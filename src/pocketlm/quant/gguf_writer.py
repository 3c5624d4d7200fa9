"""A GGUF writer (format version 3, little-endian) as an explicit state machine.

    NO_FILE --write_header--> HEADER --write_kv--> KV --write_tensor_info--> TENSOR_INFO
            --write_tensor_data (each declared tensor, in order)--> DATA --close--> CLOSED

While in NO_FILE the caller declares everything the header must count: metadata (`add_uint32`, `add_string`,
`add_array`, ...; the value type is always stated, never inferred from a Python value) and tensors
(`add_tensor_info`). Declaring after the header is written, writing out of order, a duplicate key or tensor
name, data whose size does not match its declaration, or closing before every tensor is written raises
`GGUFWriterError`. Layout and padding follow gguf-py's `GGUFWriter` (llama.cpp `gguf-py/gguf/gguf_writer.py`):
tensor offsets are multiples of `general.alignment` (32 unless set), the data section starts aligned, and each
tensor's bytes are zero-padded to the alignment. The file is written under a temporary name and renamed into
place by `close()`, so an interrupted export never leaves a file that looks complete.
"""

from __future__ import annotations

import enum
import os
import struct
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from pocketlm.errors import PocketLMError
from pocketlm.formats.gguf import (GGML_TYPE_IDS, GGML_TYPES, GGUF_MAGIC, MAX_TENSOR_NAME_BYTES, GGUFValueType,
                                   _SCALAR_STRUCTS)

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32


class GGUFWriterError(PocketLMError, ValueError):
    """A GGUF writer was used out of order or given inconsistent data."""


class WriterState(enum.Enum):
    NO_FILE = "no file"  # declaring metadata and tensors; nothing written yet
    HEADER = "header"  # magic, version and counts written
    KV = "kv"  # metadata written
    TENSOR_INFO = "tensor info"  # tensor infos and the padding before the data section written
    DATA = "data"  # writing tensor bytes, in declaration order
    CLOSED = "closed"


class _Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # PyTorch order (written reversed, as ggml `ne`)
    ggml_type: int
    n_bytes: int
    offset: int  # relative to the data section


def _pad(n: int, align: int) -> int:
    return -n % align


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


class GGUFWriter:
    """Write one GGUF file. Args: path: destination; alignment: `general.alignment` (a power of two)."""

    def __init__(self, path: str | os.PathLike[str], *, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFWriterError(f"alignment {alignment} is not a power of two")
        self.path = Path(path)
        self.alignment = alignment
        self.state = WriterState.NO_FILE
        self._kv: dict[str, bytes] = {}  # key -> encoded (type + value)
        self._tensors: list[_Tensor] = []
        self._names: set[str] = set()
        self._data_size = 0
        self._next = 0  # index of the next tensor whose data is expected
        self._file = None
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        if alignment != DEFAULT_ALIGNMENT:
            self.add_uint32("general.alignment", alignment)

    # ----- state ---------------------------------------------------------------------------------------------

    def _expect(self, state: WriterState, action: str) -> None:
        if self.state != state:
            raise GGUFWriterError(f"{self.path}: cannot {action} in state {self.state.value!r} "
                                  f"(expected {state.value!r})")

    # ----- declaring metadata (NO_FILE) ----------------------------------------------------------------------

    def _add(self, key: str, encoded: bytes) -> None:
        self._expect(WriterState.NO_FILE, f"add metadata {key!r}")
        if not isinstance(key, str) or not key:
            raise GGUFWriterError(f"metadata key {key!r} must be a non-empty string")
        if key in self._kv:
            raise GGUFWriterError(f"duplicate metadata key {key!r}")
        self._kv[key] = encoded

    @staticmethod
    def _scalar(vtype: GGUFValueType, value: Any) -> bytes:
        if vtype == GGUFValueType.STRING:
            if not isinstance(value, str):
                raise GGUFWriterError(f"string value expected, got {value!r:.60}")
            return _string(value)
        if vtype == GGUFValueType.BOOL:
            if not isinstance(value, (bool, np.bool_)):
                raise GGUFWriterError(f"bool value expected, got {value!r:.60}")
            return bytes([int(bool(value))])
        if vtype in (GGUFValueType.ARRAY,):
            raise GGUFWriterError("use add_array for arrays")
        try:
            return _SCALAR_STRUCTS[vtype].pack(value)
        except struct.error as e:
            raise GGUFWriterError(f"{value!r:.60} does not fit {vtype.name}: {e}") from None

    def add(self, key: str, value: Any, vtype: GGUFValueType) -> None:
        """Add a scalar metadata value of the stated type."""
        self._add(key, struct.pack("<I", vtype) + self._scalar(vtype, value))

    def add_uint32(self, key: str, value: int) -> None:
        self.add(key, value, GGUFValueType.UINT32)

    def add_int32(self, key: str, value: int) -> None:
        self.add(key, value, GGUFValueType.INT32)

    def add_float32(self, key: str, value: float) -> None:
        self.add(key, value, GGUFValueType.FLOAT32)

    def add_bool(self, key: str, value: bool) -> None:
        self.add(key, value, GGUFValueType.BOOL)

    def add_string(self, key: str, value: str) -> None:
        self.add(key, value, GGUFValueType.STRING)

    def add_array(self, key: str, values: Any, elem_type: GGUFValueType) -> None:
        """Add a flat array of `elem_type` (strings, or numbers written through numpy in that type)."""
        head = struct.pack("<IIQ", GGUFValueType.ARRAY, elem_type, len(values))
        if elem_type == GGUFValueType.STRING:
            body = b"".join(self._scalar(elem_type, v) for v in values)
        elif elem_type == GGUFValueType.ARRAY:
            raise GGUFWriterError("nested arrays are not written by pocketlm")
        else:
            from pocketlm.formats.gguf import _SCALAR_DTYPES
            arr = np.asarray(values)
            dtype = _SCALAR_DTYPES[elem_type]
            if elem_type == GGUFValueType.BOOL:
                arr = arr.astype(bool)
            elif arr.size and np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                if not np.issubdtype(arr.dtype, np.integer) or arr.min() < info.min or arr.max() > info.max:
                    raise GGUFWriterError(f"array {key!r}: values do not fit {elem_type.name}")
            body = arr.astype(dtype).tobytes()
        self._add(key, head + body)

    # ----- declaring tensors (NO_FILE) -----------------------------------------------------------------------

    def add_tensor_info(self, name: str, shape: tuple[int, ...], type_name: str) -> None:
        """Declare a tensor: `shape` in PyTorch order, `type_name` a ggml type ("F32", "Q4_0", ...)."""
        self._expect(WriterState.NO_FILE, f"declare tensor {name!r}")
        if name in self._names:
            raise GGUFWriterError(f"duplicate tensor name {name!r}")
        if not name or len(name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
            raise GGUFWriterError(f"tensor name {name!r} is empty or longer than {MAX_TENSOR_NAME_BYTES} bytes")
        if type_name not in GGML_TYPE_IDS:
            raise GGUFWriterError(f"tensor {name!r}: unknown ggml type {type_name!r}")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= 4 or any(d <= 0 for d in shape):
            raise GGUFWriterError(f"tensor {name!r}: shape {shape} must have 1..4 positive dimensions")
        gtype = GGML_TYPE_IDS[type_name]
        block, size = GGML_TYPES[gtype].block_size, GGML_TYPES[gtype].type_size
        if shape[-1] % block:
            raise GGUFWriterError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                                  f"{type_name} block size {block}")
        n_bytes = int(np.prod(shape)) // block * size
        self._tensors.append(_Tensor(name, shape, gtype, n_bytes, self._data_size))
        self._names.add(name)
        self._data_size += n_bytes + _pad(n_bytes, self.alignment)

    # ----- writing -------------------------------------------------------------------------------------------

    def write_header(self) -> None:
        self._expect(WriterState.NO_FILE, "write the header")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._file.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv)))
        self.state = WriterState.HEADER

    def write_kv(self) -> None:
        self._expect(WriterState.HEADER, "write metadata")
        for key, encoded in self._kv.items():
            self._file.write(_string(key) + encoded)
        self.state = WriterState.KV

    def write_tensor_info(self) -> None:
        self._expect(WriterState.KV, "write tensor infos")
        for t in self._tensors:
            ne = tuple(reversed(t.shape))
            self._file.write(_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml_type, t.offset))
        self._file.write(b"\0" * _pad(self._file.tell(), self.alignment))
        self.state = WriterState.TENSOR_INFO

    def write_tensor_data(self, name: str, data: np.ndarray) -> None:
        """Write the next declared tensor's bytes (any numpy array; its raw bytes are written)."""
        if self.state not in (WriterState.TENSOR_INFO, WriterState.DATA):
            raise GGUFWriterError(f"{self.path}: cannot write tensor data in state {self.state.value!r} "
                                  f"(expected 'tensor info' or 'data')")
        if self._next >= len(self._tensors):
            raise GGUFWriterError(f"tensor {name!r}: every declared tensor is already written")
        t = self._tensors[self._next]
        if name != t.name:
            raise GGUFWriterError(f"tensor {name!r} written out of order: {t.name!r} is next")
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != t.n_bytes:
            raise GGUFWriterError(f"tensor {name!r}: {raw.size} bytes given, {t.n_bytes} declared "
                                  f"({GGML_TYPES[t.ggml_type].name} {t.shape})")
        self._file.write(raw.tobytes())
        self._file.write(b"\0" * _pad(t.n_bytes, self.alignment))
        self._next += 1
        self.state = WriterState.DATA

    def close(self) -> None:
        """Finish the file (every declared tensor must be written) and move it into place."""
        if self.state == WriterState.CLOSED:
            return
        if self.state not in (WriterState.TENSOR_INFO, WriterState.DATA) or self._next != len(self._tensors):
            raise GGUFWriterError(f"{self.path}: cannot close in state {self.state.value!r} with "
                                  f"{self._next} of {len(self._tensors)} tensors written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        self.state = WriterState.CLOSED

    def abort(self) -> None:
        """Drop a partly written file."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
        self.state = WriterState.CLOSED

    def write(self, tensors: Callable[[str], np.ndarray] | Mapping[str, np.ndarray]) -> None:
        """Convenience: header, metadata, tensor infos, then the bytes of every declared tensor (`tensors` maps
        or is called with a name: a callable lets a large model be written one tensor at a time), close."""
        get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
        try:
            self.write_header()
            self.write_kv()
            self.write_tensor_info()
            for t in self._tensors:
                self.write_tensor_data(t.name, get(t.name))
            self.close()
        except BaseException:
            self.abort()
            raise
