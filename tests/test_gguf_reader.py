"""Tests of the strict GGUF reader (pocketlm.formats.gguf).

RELIABILITY.md §6 items 3-5: round trip against gguf-py's writer and reader, the real phi-3 vocab file, a
handcrafted corrupt corpus in llama.cpp test-gguf's taxonomy, and a seeded mutation fuzz in which the only
allowed failure is WeightFormatError.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from fuzzing import flip_bytes, run_mutation_fuzz

from pocketlm.errors import WeightFormatError
from pocketlm.formats.gguf import GGML_TYPES, GGUFFile, GGUFValueType

gguf = pytest.importorskip("gguf")  # test-time only: the reader itself never imports it

V = GGUFValueType
HERE = Path(__file__).parent
VOCAB_CANDIDATES = [HERE / "data/tokenizer/ggml-vocab-phi-3.gguf", HERE / "data/gguf/ggml-vocab-phi-3.gguf"]


# ----- a byte-level builder for handcrafted files -------------------------------------------------------------

def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(x: str | bytes) -> bytes:
    raw = x.encode() if isinstance(x, str) else x
    return u64(len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, V.STRING, gstr(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, u32(value))


def arr(etype: int, n: int, body: bytes) -> bytes:
    return u32(etype) + u64(n) + body


def tinfo(name: str | bytes, ne: list[int], gtype: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    n_dims = len(ne) if n_dims is None else n_dims
    return gstr(name) + u32(n_dims) + b"".join(u64(d) for d in ne) + u32(gtype) + u64(offset)


def build(kvs: list[bytes], tis: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF", version: int = 3,
          n_kv: int | None = None, n_tensors: int | None = None, align: int = 32) -> bytes:
    head = magic + u32(version) + u64(len(tis) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tis)
    head += b"\0" * (-len(head) % align)
    return head + data


BASE_KVS = [kv_str("general.architecture", "phi3"), kv_u32("phi3.block_count", 2),
            kv("tokenizer.ggml.tokens", V.ARRAY, arr(V.STRING, 2, gstr("<s>") + gstr("</s>"))),
            kv("tokenizer.ggml.scores", V.ARRAY, arr(V.FLOAT32, 2, struct.pack("<2f", 0.5, -1.0)))]
BASE_TIS = [tinfo("a", [4, 2], 0, 0), tinfo("b", [8], 0, 32)]
BASE_DATA = np.arange(16, dtype="<f4").tobytes()


def valid_file() -> bytes:
    return build(BASE_KVS, BASE_TIS, BASE_DATA)


def write(tmp_path: Path, data: bytes, name: str = "x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_handcrafted_valid_file_reads(tmp_path):
    g = GGUFFile(write(tmp_path, valid_file()))
    assert g.version == 3 and g.architecture == "phi3" and g.alignment == 32
    assert g.metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>"]
    assert g.metadata_get("tokenizer.ggml.scores", "array[float32]").tolist() == [0.5, -1.0]
    assert g.tensors["a"].shape == (2, 4) and g.tensors["a"].n_bytes == 32
    np.testing.assert_array_equal(g.tensor("a"), np.arange(8, dtype=np.float32).reshape(2, 4))
    np.testing.assert_array_equal(g.tensor("b"), np.arange(8, 16, dtype=np.float32))


def test_ggml_type_table_matches_gguf_py():
    sizes = {int(k): v for k, v in gguf.constants.GGML_QUANT_SIZES.items()}
    for t, info in GGML_TYPES.items():
        assert sizes[t] == (info.block_size, info.type_size), info.name
        assert gguf.GGMLQuantizationType(t).name == info.name
    for required in (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15, 30):
        assert required in GGML_TYPES


# ----- round trip through gguf-py's writer ----------------------------------------------------------------------

def test_round_trip_with_gguf_py_writer(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "rt.gguf"
    w = gguf.GGUFWriter(path, "phi3")
    w.add_uint32("phi3.block_count", 3)
    w.add_int32("x.int32", -7)
    w.add_uint64("x.u64", 2**64 - 1)
    w.add_int64("x.i64", -(2**63))
    w.add_float32("x.f32", 0.25)
    w.add_float64("x.f64", 1e300)
    w.add_bool("x.bool", True)
    w.add_uint8("x.u8", 255)
    w.add_int16("x.i16", -3)
    w.add_string("x.unicode", "héllo ✓ 世界")
    w.add_array("x.strings", ["a", "", "▁b", "<0x0A>"])
    w.add_array("x.floats", [1.5, -2.0, 3.25])
    w.add_array("x.ints", [1, -2, 3])
    w.add_array("x.bools", [True, False, True])
    w.add_array("x.nested", [[1, 2], [3, 4, 5]])
    w.add_key_value("x.i8s", [1, -1, 127], V.ARRAY, sub_type=V.INT8)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    f16 = rng.standard_normal((5, 32)).astype(np.float16)
    q_src = rng.standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(q_src, gguf.GGMLQuantizationType.Q8_0)
    q4 = gguf.quants.quantize(q_src, gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("t.f32", f32)
    w.add_tensor("t.f16", f16)
    w.add_tensor("t.q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("t.q4", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = GGUFFile(path)
    m = g.metadata
    assert g.architecture == "phi3"
    assert (m["phi3.block_count"], m["x.int32"], m["x.u64"], m["x.i64"]) == (3, -7, 2**64 - 1, -(2**63))
    assert (m["x.f32"], m["x.f64"], m["x.bool"], m["x.u8"], m["x.i16"]) == (0.25, 1e300, True, 255, -3)
    assert m["x.unicode"] == "héllo ✓ 世界"
    assert m["x.strings"] == ["a", "", "▁b", "<0x0A>"]
    assert m["x.floats"].dtype == np.float32 and m["x.floats"].tolist() == [1.5, -2.0, 3.25]
    assert m["x.ints"].tolist() == [1, -2, 3]
    assert m["x.bools"].dtype == np.bool_ and m["x.bools"].tolist() == [True, False, True]
    assert [a.tolist() for a in m["x.nested"]] == [[1, 2], [3, 4, 5]]
    assert m["x.i8s"].dtype == np.int8 and m["x.i8s"].tolist() == [1, -1, 127]
    assert g.field_types["x.f32"] == V.FLOAT32 and g.array_types["x.strings"] == V.STRING
    assert g.type_spec("x.nested") == "array[array]"

    np.testing.assert_array_equal(g.tensor("t.f32"), f32)
    np.testing.assert_array_equal(g.tensor("t.f16"), f16)
    assert g.tensors["t.q8"].shape == (4, 64) and g.tensors["t.q8"].ggml_type == 8
    assert g.tensor_bytes("t.q8").tobytes() == q8.tobytes()
    assert g.tensor_bytes("t.q4").tobytes() == q4.tobytes()
    with pytest.raises(WeightFormatError, match="quantized"):
        g.tensor("t.q4")

    # Cross-check every field and tensor against gguf-py's own reader.
    r = gguf.GGUFReader(path)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "x.nested":
            continue
        theirs = field.contents()
        ours = m[key]
        ours = ours.tolist() if isinstance(ours, np.ndarray) else ours
        assert ours == pytest.approx(theirs) if isinstance(theirs, float) else ours == theirs, key
        assert g.field_types[key] == field.types[0], key
    for t in r.tensors:
        info = g.tensors[t.name]
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes and info.ggml_type == t.tensor_type
        assert tuple(reversed(info.shape)) == tuple(int(d) for d in t.shape)
        assert g.tensor_bytes(t.name).tobytes() == np.asarray(t.data).tobytes()


def test_bf16_tensor_is_widened_to_float32(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x7F80], dtype="<u2")  # 1.0, -2.0, 0.0, inf
    path = write(tmp_path, build([], [tinfo("w", [4], 30, 0)], bits.tobytes()))
    out = GGUFFile(path).tensor("w")
    assert out.dtype == np.float32 and out.tolist() == [1.0, -2.0, 0.0, float("inf")]


def test_metadata_get_checks_types(tmp_path):
    g = GGUFFile(write(tmp_path, valid_file()))
    assert g.metadata_get("phi3.block_count", ("uint32", "int32")) == 2
    assert g.metadata_get("phi3.block_count", V.UINT32) == 2
    assert g.metadata_get("missing.key", "uint32", default=None) is None
    with pytest.raises(WeightFormatError, match="tokenizer.ggml.scores.*array\\[float32\\].*array\\[uint8\\]"):
        g.metadata_get("tokenizer.ggml.scores", "array[uint8]")
    with pytest.raises(WeightFormatError, match="missing.key"):
        g.metadata_get("missing.key", "uint32")
    with pytest.raises(WeightFormatError, match="no tensor named 'zz'"):
        g.tensor_bytes("zz")


def test_real_phi3_vocab_file():
    path = next((p for p in VOCAB_CANDIDATES if p.exists()), None)
    if path is None:
        pytest.skip(f"ggml-vocab-phi-3.gguf not found in {VOCAB_CANDIDATES}")
    t0 = time.perf_counter()
    g = GGUFFile(path)
    assert time.perf_counter() - t0 < 2.0
    assert g.architecture == "phi3" and not g.tensors
    tokens = g.metadata_get("tokenizer.ggml.tokens", "array[string]")
    scores = g.metadata_get("tokenizer.ggml.scores", "array[float32]")
    types = g.metadata_get("tokenizer.ggml.token_type", "array[int32]")
    assert len(tokens) == len(scores) == len(types) == 32064
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert g.metadata_get("tokenizer.ggml.model", "string") == "llama"
    assert g.metadata_get("tokenizer.ggml.eos_token_id", "uint32") == 32000
    assert g.metadata_get("tokenizer.ggml.add_bos_token", "bool") is True


# ----- corrupt corpus (llama.cpp tests/test-gguf.cpp taxonomy) ---------------------------------------------------

def _nested(depth: int) -> bytes:
    body = arr(V.UINT8, 1, b"\x01")
    for _ in range(depth - 1):
        body = arr(V.ARRAY, 1, body)
    return kv("deep", V.ARRAY, body)


_valid = valid_file()
CORRUPT: dict[str, bytes] = {
    "empty file": b"",
    "bad magic": build(BASE_KVS, BASE_TIS, BASE_DATA, magic=b"GGUL"),
    "version 1": build(BASE_KVS, BASE_TIS, BASE_DATA, version=1),
    "version 0": build(BASE_KVS, BASE_TIS, BASE_DATA, version=0),
    "future version": build(BASE_KVS, BASE_TIS, BASE_DATA, version=4),
    "big-endian version": build(BASE_KVS, BASE_TIS, BASE_DATA, version=3 << 24),
    "n_tensors 2^64-1": build(BASE_KVS, BASE_TIS, BASE_DATA, n_tensors=2**64 - 1),
    "n_kv 2^64-1": build(BASE_KVS, BASE_TIS, BASE_DATA, n_kv=2**64 - 1),
    "n_tensors 2^63-1": build(BASE_KVS, BASE_TIS, BASE_DATA, n_tensors=2**63 - 1),
    "n_kv one too many": build(BASE_KVS, BASE_TIS, BASE_DATA, n_kv=len(BASE_KVS) + 1),
    "key length > remaining": build([u64(60000) + b"abc" + u32(4) + u32(1)], []),
    "key length > limit": build([u64(10**6) + b"abc"], []),
    "key length 2^64-1": build([u64(2**64 - 1) + b"abc" + u32(4) + u32(1)], []),
    "empty key": build([kv("", V.UINT32, u32(1))], []),
    "bad value type": build([kv("k", 13, u32(1))], []),
    "value type 2^32-1": build([kv("k", 0xFFFFFFFF, u32(1))], []),
    "duplicate key": build([kv_u32("k", 1), kv_u32("k", 2)], []),
    "duplicate tensor name": build([], [tinfo("a", [8], 0, 0), tinfo("a", [8], 0, 32)], BASE_DATA),
    "alignment 0": build([kv_u32("general.alignment", 0)], BASE_TIS, BASE_DATA),
    "alignment not a power of 2": build([kv_u32("general.alignment", 48)], BASE_TIS, BASE_DATA, align=48),
    "alignment of wrong type": build([kv("general.alignment", V.UINT64, u64(32))], BASE_TIS, BASE_DATA),
    "alignment as string": build([kv_str("general.alignment", "32")], BASE_TIS, BASE_DATA),
    "n_dims 0": build([], [tinfo("a", [], 0, 0)], BASE_DATA),
    "n_dims 5": build([], [tinfo("a", [1, 1, 1, 1, 8], 0, 0)], BASE_DATA),
    "n_dims 2^32-1 (more dims than bytes)": build([], [tinfo("a", [8], 0, 0, n_dims=0xFFFFFFFF)], BASE_DATA),
    "dim 0": build([], [tinfo("a", [4, 0], 0, 0)], BASE_DATA),
    "dims product overflows int64": build([], [tinfo("a", [2**32, 2**32], 0, 0)], BASE_DATA),
    "single dim 2^64-1": build([], [tinfo("a", [2**64 - 1], 24, 0)], BASE_DATA),
    "unknown ggml type 4": build([], [tinfo("a", [8], 4, 0)], BASE_DATA),
    "unknown ggml type 2^32-1 (negative)": build([], [tinfo("a", [8], 0xFFFFFFFF, 0)], BASE_DATA),
    "ne[0] not a multiple of the block size": build([], [tinfo("a", [16], 8, 0)], BASE_DATA),
    "offset not aligned": build([], [tinfo("a", [4], 0, 4)], BASE_DATA),
    "offset + size > file length": build([], [tinfo("a", [8], 0, 64)], BASE_DATA),
    "size > file length": build([], [tinfo("a", [1024, 1024], 0, 0)], BASE_DATA),
    "offset 2^64-32": build([], [tinfo("a", [8], 0, 2**64 - 32)], BASE_DATA),
    "overlapping tensors": build([], [tinfo("a", [16], 0, 0), tinfo("b", [8], 0, 32)], BASE_DATA),
    "same offset twice": build([], [tinfo("a", [8], 0, 0), tinfo("b", [8], 0, 0)], BASE_DATA),
    "tensor name too long": build([], [tinfo("n" * 65, [8], 0, 0)], BASE_DATA),
    "tensor name invalid UTF-8": build([], [tinfo(b"\xff\xfe", [8], 0, 0)], BASE_DATA),
    "array element type unknown": build([kv("k", V.ARRAY, arr(99, 1, b"\0"))], []),
    "array length 2^64-1": build([kv("k", V.ARRAY, arr(V.UINT8, 2**64 - 1, b"\0" * 8))], []),
    "array length * element size > remaining": build([kv("k", V.ARRAY, arr(V.FLOAT32, 1000, b"\0" * 16))], []),
    "string array count > remaining": build([kv("k", V.ARRAY, arr(V.STRING, 2**40, gstr("a")))], []),
    "arrays nested 9 deep": build([_nested(9)], []),
    "arrays nested 10000 deep": build([_nested(10000)], []),
    "string with invalid UTF-8": build([kv("k", V.STRING, gstr(b"ok\xc3\x28"))], []),
    "key with invalid UTF-8": build([kv(b"\x80key", V.UINT32, u32(1))], []),
    "string length > remaining": build([kv("k", V.STRING, u64(10**9) + b"abc")], []),
    "bool value 2": build([kv("k", V.BOOL, b"\x02")], []),
    "truncated in the header": _valid[:20],
    "truncated after magic": _valid[:6],
    "truncated in KV data": build(BASE_KVS, [])[:100],
    "truncated in tensor infos": _valid[:len(_valid) - len(BASE_DATA) - 40],
    "truncated tensor data": _valid[:-4],
    "data section missing": build(BASE_KVS, BASE_TIS, b"")[:-1],
}


def test_corrupt_corpus_is_large_enough():
    assert len(CORRUPT) >= 25


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_weight_format_error_fast(tmp_path, case):
    path = write(tmp_path, CORRUPT[case])
    t0 = time.perf_counter()
    with pytest.raises(WeightFormatError) as exc:
        GGUFFile(path)
    elapsed = time.perf_counter() - t0
    assert str(path) in str(exc.value)
    assert elapsed < 0.1, f"{case}: {elapsed:.3f}s"


def test_nested_arrays_up_to_depth_8_are_fine(tmp_path):
    g = GGUFFile(write(tmp_path, build([_nested(8)], [])))
    v = g.metadata["deep"]
    for _ in range(7):
        v = v[0]
    assert v.tolist() == [1]


def test_vocab_only_file_may_end_before_the_data_section(tmp_path):
    g = GGUFFile(write(tmp_path, build(BASE_KVS, [], align=1)))
    assert g.tensors == {} and g.metadata["phi3.block_count"] == 2


# ----- mutation fuzz ----------------------------------------------------------------------------------------------

EXTREMES = [(0, 4), (0xFFFFFFFF, 4), (0, 8), (2**63 - 1, 8), (2**64 - 1, 8), (0x7FFFFFFF, 4), (1, 8)]


def touch_all(g: GGUFFile) -> int:
    total = 0
    for name, info in g.tensors.items():
        raw = g.tensor_bytes(name)
        assert raw.size == info.n_bytes
        total += int(raw.sum(dtype=np.uint64))
    return total


def test_mutation_fuzz_only_weight_format_error(tmp_path):
    seeds = [valid_file(), build(BASE_KVS + [_nested(3), kv("b", V.ARRAY, arr(V.BOOL, 2, b"\x01\x00"))], BASE_TIS,
                                 BASE_DATA, align=32)]
    case, outcomes = run_mutation_fuzz(
        "gguf", tmp_path / "fuzz.gguf", lambda rng: flip_bytes(rng.choice(seeds), rng, EXTREMES),
        lambda path, data: touch_all(GGUFFile(path)), WeightFormatError, default_seconds=8)
    assert case > 500 and outcomes["WeightFormatError"] > 0
