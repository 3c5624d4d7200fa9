"""A strict, zero-copy GGUF reader (format versions 2 and 3, little-endian).

Layout (ggml `docs/gguf.md`; llama.cpp `ggml/src/gguf.cpp`):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  (string key, u32 value_type, value)
    n_tensors x  (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    data section: tensor i starts at data_start + offset_i

Every count read from the file is checked against the bytes left *before* any loop or allocation, with Python
ints (no overflow), and every failure raises `WeightFormatError` naming the file, the byte position and the
offending value. This closes the bug classes listed in RELIABILITY.md §1.3 / §1.5 that llama.cpp, Ollama and
gguf-py had: counts of 2^64-1 that loop forever, tensor sizes that overflow int64, offset + size past the end
of the file, overlapping tensors, array element types not checked, arrays nested without bound
(RecursionError), invalid UTF-8, duplicate keys and tensor names, alignments that are 0 or not a power of two.

Deviations from the permissive readers:
- dims must be > 0, n_dims in 1..4, tensor names at most 64 bytes (GGML_MAX_NAME), keys 1..65535 bytes;
- BOOL values must be 0 or 1;
- arrays may nest at most `MAX_ARRAY_DEPTH` (8) levels;
- tensors may sit anywhere in the data section (aligned, inside it, non-overlapping); llama.cpp additionally
  requires them packed in order.

The file is memory-mapped: `tensor_bytes` / `tensor` return read-only numpy views into the map, so reading a
tensor costs no copy. Metadata arrays are copied out (they are small and should outlive the file).
"""

from __future__ import annotations

import enum
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from pocketlm.errors import WeightFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 8  # gguf-py recursed without bound on nested arrays (RELIABILITY.md §1.3)
MAX_KEY_BYTES = 65535
MAX_TENSOR_NAME_BYTES = 64  # GGML_MAX_NAME
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = 2**63 - 1
# Type specs for `GGUFFile.metadata_get`: any integer / any float scalar (converters differ in the width they write)
UINT = ("uint32", "int32", "uint64", "int64")
FLOAT = ("float32", "float64")


class GGUFValueType(enum.IntEnum):
    """Metadata value types of the GGUF spec (`gguf_type` in gguf.h)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: little-endian numpy dtype (its itemsize is the size in the file).
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),  # stored as one byte, 0 or 1
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Standard-size struct codes (numpy's dtype.char is platform-sized: "L" is 8 bytes in numpy, 4 in "<L").
_STRUCT_CODES = {"u1": "B", "i1": "b", "u2": "H", "i2": "h", "u4": "I", "i4": "i", "f4": "f",
                 "u8": "Q", "i8": "q", "f8": "d"}
_SCALAR_STRUCTS = {t: struct.Struct("<" + _STRUCT_CODES[d.str[1:]]) for t, d in _SCALAR_DTYPES.items()}
assert all(s.size == _SCALAR_DTYPES[t].itemsize for t, s in _SCALAR_STRUCTS.items())
# Smallest number of bytes one element of each type can take (used to bound counts before looping).
_MIN_ELEMENT_BYTES = {**{t: d.itemsize for t, d in _SCALAR_DTYPES.items()},
                      GGUFValueType.STRING: 8,  # u64 length, possibly empty
                      GGUFValueType.ARRAY: 12}  # u32 element type + u64 length


class GGMLType(NamedTuple):
    """A ggml tensor type: `block_size` elements are stored in `type_size` bytes."""

    name: str
    block_size: int
    type_size: int


# ggml.h `ggml_type` with ggml.c `type_traits` (block size, bytes per block); checked in the tests against
# gguf-py's `GGML_QUANT_SIZES`. Ids 4, 5 (removed Q4_2/Q4_3) and 31-33, 36-38 (removed) are not types.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 40),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
}
GGML_TYPE_IDS = {t.name: i for i, t in GGML_TYPES.items()}

# Unquantized ggml types that `GGUFFile.tensor` returns as numpy arrays (BF16 is widened to float32).
_PLAIN_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 24: np.dtype("<i1"), 25: np.dtype("<i2"),
                 26: np.dtype("<i4"), 27: np.dtype("<i8"), 28: np.dtype("<f8"), 30: np.dtype("<u2")}


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file."""

    name: str
    shape: tuple[int, ...]  # PyTorch order: the ggml `ne` reversed (ne[0] is the fastest-varying dimension)
    ggml_type: int  # key of GGML_TYPES
    n_bytes: int  # bytes in the data section
    offset: int  # absolute byte offset in the file (data section start + the offset stored in the file)


_REQUIRED = object()


def type_spec(vtype: GGUFValueType, elem_type: GGUFValueType | None = None) -> str:
    """Spell a value type the way `metadata_get` expects it: "uint32", "string", "array[float32]"."""
    if vtype == GGUFValueType.ARRAY:
        return f"array[{'?' if elem_type is None else elem_type.name.lower()}]"
    return vtype.name.lower()


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; every failure is a WeightFormatError."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> WeightFormatError:
        return WeightFormatError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"truncated: {what} needs {n} bytes, only {self.left} left")

    def scalar(self, vtype: GGUFValueType, what: str) -> int | float:
        st = _SCALAR_STRUCTS[vtype]
        self.need(st.size, what)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(GGUFValueType.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(GGUFValueType.UINT64, what))

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what} length {n} exceeds the limit of {max_len} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8: {raw[:40]!r} ({e.reason} at {e.start})") from None
        self.pos += n
        return text


class GGUFFile:
    """A parsed, memory-mapped GGUF file.

    Args:
        path: the `.gguf` file.

    Attributes:
        version: 2 or 3.
        metadata: key -> value. Scalars are Python int/float/bool/str; string arrays list[str]; numeric arrays
            numpy arrays (bool arrays of dtype bool); nested arrays lists of those.
        field_types: key -> GGUFValueType of the value (ARRAY for arrays).
        array_types: key -> GGUFValueType of the elements, for array values only.
        tensors: name -> TensorInfo, in file order.
        alignment: `general.alignment`, or 32.
        data_offset: absolute offset of the data section.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            # np.memmap cannot map an empty file; an empty file fails the magic check below anyway.
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        except OSError as e:
            raise WeightFormatError(f"{self.path}: cannot open GGUF file: {e}") from None
        self.metadata: dict[str, Any] = {}
        self.field_types: dict[str, GGUFValueType] = {}
        self.array_types: dict[str, GGUFValueType] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._names: set[str] = set()  # tensor names seen while parsing; `tensors` is filled once all pass
        self._closed = False
        self._parse(_Cursor(memoryview(self._map), self.path))

    # ----- parsing -------------------------------------------------------------------------------------------

    def _parse(self, c: _Cursor) -> None:
        c.need(4, "magic")
        magic = bytes(c.buf[0:4])
        if magic != GGUF_MAGIC:
            raise c.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version >= 1 << 16 else ""
            raise c.fail(f"unsupported GGUF version {self.version}{hint}; supported: {SUPPORTED_VERSIONS}")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # Each KV needs >= 8 (key length) + 1 (key) + 4 (type) + 1 (smallest value) bytes; each tensor info
        # >= 8 + 1 (name) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset). Reject impossible counts now.
        if n_kv * 14 + n_tensors * 33 > c.left:
            raise c.fail(f"impossible counts: {n_tensors} tensors and {n_kv} metadata entries "
                         f"cannot fit in {c.left} bytes")
        for _ in range(n_kv):
            self._read_kv(c)
        self.alignment = self._alignment(c)
        infos = [self._read_tensor_info(c) for _ in range(n_tensors)]
        data_start = -(-c.pos // self.alignment) * self.alignment
        self.data_offset = data_start
        if n_tensors and data_start > len(c.buf):
            raise c.fail(f"data section would start at {data_start}, past the end of the file")
        data_len = len(c.buf) - data_start
        # Tensors: aligned, inside the data section, and no two share a byte (sorted sweep).
        end_prev, name_prev = 0, None
        for name, shape, gtype, n_bytes, rel in sorted(infos, key=lambda t: (t[4], t[3])):
            if rel + n_bytes > data_len:
                raise c.fail(f"tensor {name!r}: offset {rel} + size {n_bytes} exceeds the data section "
                             f"({data_len} bytes)")
            if rel < end_prev:
                raise c.fail(f"tensor {name!r} at offset {rel} overlaps tensor {name_prev!r} ending at {end_prev}")
            end_prev, name_prev = rel + n_bytes, name
        for name, shape, gtype, n_bytes, rel in infos:
            self.tensors[name] = TensorInfo(name, shape, gtype, n_bytes, data_start + rel)

    def _read_kv(self, c: _Cursor) -> None:
        key = c.string("metadata key", MAX_KEY_BYTES)
        if not key:
            raise c.fail("empty metadata key")
        if key in self.metadata:
            raise c.fail(f"duplicate metadata key {key!r}")
        vtype = self._value_type(c, f"type of {key!r}")
        self.field_types[key] = vtype
        if vtype == GGUFValueType.ARRAY:
            self.metadata[key], self.array_types[key] = self._read_array(c, key, depth=1)
        else:
            self.metadata[key] = self._read_scalar(c, vtype, key)

    def _value_type(self, c: _Cursor, what: str) -> GGUFValueType:
        raw = c.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise c.fail(f"{what}: unknown value type {raw}") from None

    def _read_scalar(self, c: _Cursor, vtype: GGUFValueType, key: str) -> int | float | bool | str:
        if vtype == GGUFValueType.STRING:
            return c.string(f"value of {key!r}")
        value = c.scalar(vtype, f"value of {key!r}")
        if vtype == GGUFValueType.BOOL:
            if value not in (0, 1):
                raise c.fail(f"value of {key!r}: bool byte is {value}, expected 0 or 1")
            return bool(value)
        return value

    def _read_array(self, c: _Cursor, key: str, depth: int) -> tuple[Any, GGUFValueType]:
        if depth > MAX_ARRAY_DEPTH:
            raise c.fail(f"array {key!r} is nested deeper than {MAX_ARRAY_DEPTH} levels")
        etype = self._value_type(c, f"element type of array {key!r}")
        n = c.u64(f"length of array {key!r}")
        if n * _MIN_ELEMENT_BYTES[etype] > c.left:
            raise c.fail(f"array {key!r}: {n} elements of type {etype.name} cannot fit in {c.left} bytes")
        if etype == GGUFValueType.STRING:
            return [c.string(f"element of array {key!r}") for _ in range(n)], etype
        if etype == GGUFValueType.ARRAY:
            return [self._read_array(c, key, depth + 1)[0] for _ in range(n)], etype
        dtype = _SCALAR_DTYPES[etype]
        values = np.frombuffer(c.buf, dtype=dtype, count=n, offset=c.pos).copy()
        c.pos += n * dtype.itemsize
        if etype == GGUFValueType.BOOL:
            if values.size and values.max() > 1:
                raise c.fail(f"array {key!r}: bool element is {int(values.max())}, expected 0 or 1")
            values = values.astype(bool)
        return values, etype

    def _alignment(self, c: _Cursor) -> int:
        key = "general.alignment"
        if key not in self.metadata:
            return DEFAULT_ALIGNMENT
        if self.field_types[key] != GGUFValueType.UINT32:
            raise WeightFormatError(f"{self.path}: {key} must be uint32, got {self.field_types[key].name}")
        align = self.metadata[key]
        if align == 0 or align & (align - 1):
            raise WeightFormatError(f"{self.path}: {key} = {align} is not a non-zero power of two")
        return align

    def _read_tensor_info(self, c: _Cursor) -> tuple[str, tuple[int, ...], int, int, int]:
        name = c.string("tensor name", MAX_TENSOR_NAME_BYTES)
        if name in self._names:
            raise c.fail(f"duplicate tensor name {name!r}")
        n_dims = c.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r}: n_dims = {n_dims}, expected 1..{MAX_DIMS}")
        ne = [c.u64(f"dimension of tensor {name!r}") for _ in range(n_dims)]
        n_elements = 1
        for d in ne:
            if d == 0:
                raise c.fail(f"tensor {name!r}: dimension 0 in ne={ne}")
            n_elements *= d
        if n_elements > INT64_MAX:
            raise c.fail(f"tensor {name!r}: ne={ne} has {n_elements} elements, more than int64 holds")
        gtype = c.u32(f"ggml type of tensor {name!r}")
        if gtype not in GGML_TYPES:
            raise c.fail(f"tensor {name!r}: unknown ggml type {gtype}")
        block, type_size = GGML_TYPES[gtype][1:]
        if ne[0] % block:
            raise c.fail(f"tensor {name!r}: ne[0] = {ne[0]} is not a multiple of the "
                         f"{GGML_TYPES[gtype].name} block size {block}")
        n_bytes = n_elements // block * type_size
        rel = c.u64(f"offset of tensor {name!r}")
        if rel % self.alignment:
            raise c.fail(f"tensor {name!r}: offset {rel} is not a multiple of the alignment {self.alignment}")
        self._names.add(name)
        return name, tuple(reversed(ne)), gtype, n_bytes, rel

    # ----- public API ----------------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        """`general.architecture` (e.g. "phi3")."""
        return self.metadata_get("general.architecture", "string")

    def type_spec(self, key: str) -> str:
        """The type of a metadata value as a string: "uint32", "string", "array[float32]", ..."""
        if key not in self.field_types:
            raise WeightFormatError(f"{self.path}: no metadata key {key!r}")
        return type_spec(self.field_types[key], self.array_types.get(key))

    def metadata_get(self, key: str, expected: str | GGUFValueType | tuple[str | GGUFValueType, ...],
                     default: Any = _REQUIRED) -> Any:
        """Return `metadata[key]` after checking its type.

        Args:
            key: metadata key, e.g. "tokenizer.ggml.scores".
            expected: a type spec ("uint32", "string", "array[float32]", "array[string]") or a GGUFValueType
                for scalars, or a tuple of those, any of which is accepted (e.g. ("uint32", "int32")).
            default: returned when the key is absent; without it an absent key raises WeightFormatError.
        """
        if key not in self.metadata:
            if default is _REQUIRED:
                raise WeightFormatError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        wanted = expected if isinstance(expected, tuple) else (expected,)
        specs = {type_spec(w) if isinstance(w, GGUFValueType) else w for w in wanted}
        actual = self.type_spec(key)
        if actual not in specs:
            raise WeightFormatError(f"{self.path}: metadata {key!r} has type {actual}, expected "
                                    f"{' or '.join(sorted(specs))}")
        return self.metadata[key]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def _info(self, name: str) -> TensorInfo:
        if self._closed:
            raise ValueError(f"{self.path}: GGUFFile is closed")
        if name not in self.tensors:
            raise WeightFormatError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor: a read-only uint8 view into the memory map (any ggml type)."""
        info = self._info(name)
        return self._map[info.offset:info.offset + info.n_bytes]

    def tensor(self, name: str) -> np.ndarray:
        """An unquantized tensor as a numpy array of shape `TensorInfo.shape`.

        F32/F16/F64/I8/I16/I32/I64 are zero-copy read-only views; BF16 is converted to a new float32 array.
        Quantized types raise WeightFormatError: read them with `tensor_bytes` and a codec from `quant/`.
        """
        info = self._info(name)
        if info.ggml_type not in _PLAIN_DTYPES:
            raise WeightFormatError(f"{self.path}: tensor {name!r} is {GGML_TYPES[info.ggml_type].name}, "
                                    f"a quantized type; use tensor_bytes() and a dequantizer")
        raw = self.tensor_bytes(name).view(_PLAIN_DTYPES[info.ggml_type]).reshape(info.shape)
        if info.ggml_type == GGML_TYPE_IDS["BF16"]:
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they are freed)."""
        self._map = np.zeros(0, np.uint8)
        self._closed = True

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")
