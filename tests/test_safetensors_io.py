"""Tests of the safetensors checkpoint layer (pocketlm.formats.safetensors_io).

RELIABILITY.md §6 items 1-4: the no-pickle gate, a bit-exact round trip (single file and sharded), a corrupt-file
corpus over the header parser and the sharded index, a seeded mutation fuzz whose only allowed failure is
WeightFormatError, and a peak-RSS check that tensors are streamed one at a time.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fuzzing import run_mutation_fuzz
import torch
from safetensors.torch import save_file

from pocketlm.errors import WeightFormatError
from pocketlm.formats.safetensors_io import (
    INDEX_FILE, CheckpointReader, parse_header, read_header, write_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "pocketlm"


# ----- round trip -----------------------------------------------------------------------------------------------

ROUND_TRIP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int64, torch.bool,
                     torch.float64, torch.int32, torch.int16]


def random_tensor(g: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random *bits* (NaNs, infinities and denormals included) of the given dtype and shape."""
    n_bytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def random_shape(rng: random.Random) -> tuple[int, ...]:
    kind = rng.random()
    if kind < 0.1:
        return ()
    if kind < 0.2:
        return tuple(rng.choice([0, 3]) if i == 0 else rng.randint(1, 3) for i in range(rng.randint(1, 3)))
    if kind < 0.3:
        return tuple(rng.randint(1, 3) for _ in range(5))
    return tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))


def random_state(seed: int, n: int) -> dict[str, torch.Tensor]:
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w{rng.randint(0, 9)}": random_tensor(g, rng.choice(ROUND_TRIP_DTYPES), random_shape(rng))
            for i in range(n)}


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(reader: CheckpointReader, state: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.keys()) == sorted(state)
    for name, t in state.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert reader.shape(name) == tuple(t.shape) and reader.dtype(name) == t.dtype
        assert bits(got) == bits(t), name


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 2000])
def test_round_trip_bit_identical(tmp_path, max_shard_bytes):
    state = random_state(seed=1234, n=500)
    shapes = {tuple(t.shape) for t in state.values()}
    assert () in shapes and any(0 in s for s in shapes) and any(len(s) == 5 for s in shapes)
    files = write_checkpoint(tmp_path, state, max_shard_bytes=max_shard_bytes, metadata={"step": "7", "é": "ü"})
    with CheckpointReader(tmp_path) as r:
        assert r.metadata == {"format": "pt", "step": "7", "é": "ü"}
        assert r.files == files
        assert r.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
        assert_same(r, state)
    if max_shard_bytes == 2000:
        assert len(files) > 5 and (tmp_path / INDEX_FILE).exists()
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == r.total_bytes
        assert set(index["weight_map"]) == set(state)
        for f in files:  # no shard is bigger than the limit unless it holds a single tensor
            h = read_header(f)
            assert len(h.tensors) == 1 or sum(e.n_bytes for e in h.tensors.values()) <= 2000
    else:
        assert [f.name for f in files] == ["model.safetensors"] and not (tmp_path / INDEX_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_reader_accepts_a_single_file_and_converts_dtype(tmp_path):
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    (file,) = write_checkpoint(tmp_path, state)
    r = CheckpointReader(file)
    assert r.get("a", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(r.get("a", dtype=torch.float64), state["a"].double())
    assert "a" in r and len(r) == 1 and r.file_of("a") == file
    with pytest.raises(WeightFormatError, match="no tensor named 'b'"):
        r.get("b")


def test_writer_handles_views_shared_storage_and_iterables(tmp_path):
    base = torch.randn(8, 8)
    items = [("t", base.t()), ("q", base[:2]), ("k", base[2:4]), ("all", base),
             ("g", torch.ones(3, requires_grad=True))]
    write_checkpoint(tmp_path, iter(items))
    r = CheckpointReader(tmp_path)
    for name, t in items:
        assert torch.equal(r.get(name), t.detach()), name
    with pytest.raises(ValueError, match="given twice"):
        write_checkpoint(tmp_path / "dup", [("a", base), ("a", base)])
    with pytest.raises(TypeError):
        write_checkpoint(tmp_path / "bad", {"a": [1, 2]})


def test_writer_matches_the_safetensors_library_bit_for_bit(tmp_path):
    state = random_state(seed=5, n=20)
    write_checkpoint(tmp_path / "ours", state, metadata={"k": "v"})
    save_file(state, tmp_path / "lib.safetensors", metadata={"format": "pt", "k": "v"})
    ours, lib = tmp_path / "ours" / "model.safetensors", tmp_path / "lib.safetensors"
    h_ours, h_lib = read_header(ours), read_header(lib)
    # The library writes __metadata__ in hash order (it varies from run to run), so compare parsed headers
    # and the data sections byte for byte.
    assert h_ours.tensors == h_lib.tensors and h_ours.metadata == h_lib.metadata
    assert ours.read_bytes()[h_ours.data_start:] == lib.read_bytes()[h_lib.data_start:]


def test_resave_removes_stale_shards_and_failed_save_keeps_old_checkpoint(tmp_path):
    state = random_state(seed=3, n=40)
    total = sum(t.numel() * t.element_size() for t in state.values())
    many = write_checkpoint(tmp_path, state, max_shard_bytes=total // 12)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "model-00001-of-00009.txt").write_text("not a shard name")
    few = write_checkpoint(tmp_path, state, max_shard_bytes=total // 3)
    assert 1 < len(few) < len(many)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f.name for f in few] + [INDEX_FILE, "notes.txt", "model-00001-of-00009.txt"])
    assert_same(CheckpointReader(tmp_path), state)
    write_checkpoint(tmp_path, state)  # back to one file: the index and every shard go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-00001-of-00009.txt", "model.safetensors", "notes.txt"]

    def broken():
        yield "a", torch.zeros(2)
        raise RuntimeError("crash in the middle of a save")
    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, broken(), max_shard_bytes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-00001-of-00009.txt", "model.safetensors", "notes.txt"]
    assert_same(CheckpointReader(tmp_path), state)


# ----- corrupt corpus -------------------------------------------------------------------------------------------

def st_bytes(header: dict | bytes, data: bytes = b"", *, n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def ent(dtype: str = "F32", shape: list = (2,), offsets: list = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = {"__metadata__": {"format": "pt"}, "a": ent(offsets=[0, 8]), "b": ent("F16", [2, 2], [8, 16])}
DATA = bytes(range(16))
_good = st_bytes(GOOD, DATA)

SINGLE_FILE_CASES: dict[str, bytes] = {
    "empty file": b"",
    "7-byte file": b"\x08\0\0\0\0\0\0",
    "header length > 100,000,000": st_bytes(GOOD, DATA, n=100_000_001),
    "header length 2^64-1": st_bytes(GOOD, DATA, n=2**64 - 1),
    "header length beyond file": st_bytes(GOOD, DATA, n=len(_good)),
    "header not UTF-8": st_bytes(b'{"a\xff": 1}'),
    "header not JSON": st_bytes(b"{not json"),
    "header JSON array": st_bytes(b"[1, 2]"),
    "header JSON string": st_bytes(b'"{}"'),
    "header starts with a space": st_bytes(b' {"__metadata__": {}}'),
    "duplicate key": st_bytes(b'{"a": ' + json.dumps(ent()).encode() + b', "a": ' + json.dumps(ent()).encode() + b"}",
                              bytes(8)),
    "deeply nested JSON": st_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "int with 10,000 digits": st_bytes(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], '
                                       b'"data_offsets": [0, 8]}}', bytes(8)),
    "bad dtype": st_bytes({"a": ent("F17")}, bytes(8)),
    "dtype not a string": st_bytes({"a": ent(4)}, bytes(8)),
    "negative shape": st_bytes({"a": ent(shape=[-2])}, bytes(8)),
    "float shape": st_bytes({"a": ent(shape=[2.0])}, bytes(8)),
    "bool shape": st_bytes({"a": ent(shape=[True, 2])}, bytes(8)),
    "shape not a list": st_bytes({"a": ent(shape="2")}, bytes(8)),
    "empty tensor with a dim of 2^64": st_bytes({"a": ent(shape=[2**64, 0], offsets=[0, 0]), "b": ent()}, bytes(8)),
    "shape product overflows int64": st_bytes({"a": ent(shape=[2**40, 2**40])}, bytes(8)),
    "entry not an object": st_bytes({"a": [0, 8]}, bytes(8)),
    "entry missing data_offsets": st_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "entry with an extra key": st_bytes({"a": {**ent(), "x": 1}}, bytes(8)),
    "data_offsets of three ints": st_bytes({"a": ent(offsets=[0, 4, 8])}, bytes(8)),
    "negative offset": st_bytes({"a": ent(offsets=[-8, 0])}, bytes(8)),
    "offsets overlapping": st_bytes({"a": ent(offsets=[0, 8]), "b": ent(offsets=[4, 12])}, bytes(12)),
    "offsets out of order": st_bytes({"a": ent(offsets=[8, 16]), "b": ent("F32", [3], [0, 12])}, bytes(16)),
    "hole between tensors": st_bytes({"a": ent(offsets=[0, 8]), "b": ent(offsets=[12, 20])}, bytes(20)),
    "hole at the start": st_bytes({"a": ent(offsets=[4, 12])}, bytes(12)),
    "offsets past end": st_bytes({"a": ent(offsets=[0, 8]), "b": ent(offsets=[8, 16])}, bytes(12)),
    "end < begin": st_bytes({"a": ent(shape=[0], offsets=[8, 0])}, bytes(8)),
    "size mismatch with shape": st_bytes({"a": ent(shape=[3], offsets=[0, 8])}, bytes(8)),
    "two tensors on the same bytes": st_bytes({"a": ent(offsets=[0, 8]), "b": ent(offsets=[0, 8])}, bytes(8)),
    "truncated data": _good[:-1],
    "extra trailing bytes": _good + b"\0",
    "metadata value not a string": st_bytes({"__metadata__": {"step": 7}, "a": ent()}, bytes(8)),
    "metadata not an object": st_bytes({"__metadata__": ["format", "pt"], "a": ent()}, bytes(8)),
}


@pytest.mark.parametrize("case", sorted(SINGLE_FILE_CASES))
def test_corrupt_file_raises_weight_format_error(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(SINGLE_FILE_CASES[case])
    t0 = time.perf_counter()
    with pytest.raises(WeightFormatError) as exc:
        CheckpointReader(path)
    assert time.perf_counter() - t0 < 0.1, case
    assert str(path) in str(exc.value)


def test_good_corpus_file_is_valid(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_good)
    r = CheckpointReader(tmp_path)
    assert r.keys() == ["a", "b"] and r.shape("b") == (2, 2) and r.get("a").dtype == torch.float32


def _sharded(tmp_path: Path, weight_map: dict | str | bytes, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name)
    if isinstance(weight_map, bytes):
        raw = weight_map
    elif isinstance(weight_map, str):
        raw = weight_map.encode()
    else:
        raw = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()
    (tmp_path / INDEX_FILE).write_bytes(raw)
    return tmp_path


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
X = {"x": torch.zeros(2)}
Y = {"y": torch.ones(3)}
SHARDED_CASES = {
    "index bad JSON": ('{"weight_map": {"x": ', {S1: X}),
    "index not UTF-8": (b'{"weight_map": {"x\xff": 1}}', {S1: X}),
    "index weight_map wrong type": ('{"weight_map": ["x", "y"]}', {S1: X}),
    "index without weight_map": ('{"metadata": {}}', {S1: X}),
    "index metadata wrong type": ('{"metadata": 3, "weight_map": {}}', {S1: X}),
    "index shard name not a string": ({"x": 1}, {S1: X}),
    "index duplicate key": ('{"weight_map": {"x": "%s", "x": "%s"}}' % (S1, S2), {S1: X, S2: Y}),
    "missing shard": ({"x": S1, "y": S2}, {S1: X}),
    "key in index but not in shard": ({"x": S1, "y": S1, "z": S2}, {S1: X, S2: {"z": torch.zeros(1)}}),
    "key in shard but not in index": ({"x": S1}, {S1: {**X, **Y}}),
    "key indexed to the other shard": ({"x": S2, "y": S1}, {S1: X, S2: Y}),
    "tensor in two shards": ({"x": S1, "y": S2}, {S1: X, S2: {**X, **Y}}),
    "path traversal ..": ({"x": "../model.safetensors"}, {}),
    "path traversal with a folder": ({"x": "sub/model.safetensors"}, {}),
    "absolute shard path": ({"x": "/etc/passwd.safetensors"}, {}),
    "shard not a .safetensors name": ({"x": "model.bin"}, {}),
    "corrupt shard header": ({"x": S1}, {}),
}


@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_corrupt_sharded_checkpoint_raises_weight_format_error(tmp_path, case):
    weight_map, shards = SHARDED_CASES[case]
    folder = _sharded(tmp_path, weight_map, shards)
    if case == "corrupt shard header":
        (folder / S1).write_bytes(SINGLE_FILE_CASES["offsets overlapping"])
    t0 = time.perf_counter()
    with pytest.raises(WeightFormatError) as exc:
        CheckpointReader(folder)
    assert time.perf_counter() - t0 < 0.1, case
    assert str(folder) in str(exc.value)


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(_good)
    with pytest.raises(WeightFormatError, match="weights.safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(WeightFormatError, match="no such"):
        CheckpointReader(tmp_path / "nope")


def test_corpus_is_large_enough():
    assert len(SINGLE_FILE_CASES) + len(SHARDED_CASES) >= 25


# ----- mutation fuzz --------------------------------------------------------------------------------------------

EXTREMES = [(0, 8), (2**64 - 1, 8), (2**63 - 1, 8), (0xFFFFFFFF, 4), (100_000_001, 8)]
TOKENS = [b"-1", b"99999999999999999999", b"0", b"[]", b"{}", b'"', b",", b"]", b"}", b"null", b"1e400", b"\\u0000"]
FIELD_VALUES = [-1, 0, 1, 2**63 - 1, 2**64, 1.5, "F32", "BF16", "X", None, [], [0], [0, 0], [2**62, 2**62], True]


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    """Change one field of one header entry, re-serialize, fix the header length: reaches the deep checks."""
    n = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8:8 + n])
    name = rng.choice(sorted(header))
    entry = header[name]
    if name == "__metadata__":
        entry[rng.choice([*entry, "new"])] = rng.choice(FIELD_VALUES)
    else:
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.5 and isinstance(entry[field], list) and entry[field]:
            entry[field][rng.randrange(len(entry[field]))] = rng.choice(FIELD_VALUES + [rng.randint(0, 64)])
        else:
            entry[field] = rng.choice(FIELD_VALUES)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def mutate(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.4:
        data = mutate_header(data, rng)
        if rng.random() < 0.5:
            return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        elif op == 1:
            value, size = rng.choice(EXTREMES)
            buf[pos:pos + size] = value.to_bytes(size, "little")
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:  # a JSON-ish token spliced into the header, with the header length fixed up half the time
            tok = rng.choice(TOKENS)
            pos = rng.randrange(8, max(9, min(len(buf), 8 + struct.unpack_from("<Q", data)[0])))
            buf[pos:pos + rng.randint(0, 3)] = tok
            if rng.random() < 0.5 and len(buf) >= 8:
                n = struct.unpack_from("<Q", data)[0] + len(buf) - len(data)
                buf[:8] = struct.pack("<Q", max(n, 0))
    return bytes(buf)


@pytest.fixture
def fast_dir(tmp_path):
    """A tmpfs folder when there is one: the fuzz rewrites a file thousands of times."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="pocketlm-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_mutation_fuzz_only_weight_format_error(tmp_path, fast_dir):
    src = tmp_path / "src"
    write_checkpoint(src, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                           "b": torch.ones(2, dtype=torch.bool),
                           "e": torch.zeros(0, 2, dtype=torch.bfloat16), "s": torch.tensor(7, dtype=torch.int64)},
                     metadata={"k": "v"})
    valid = (src / "model.safetensors").read_bytes()

    def load(path, data):
        r = CheckpointReader(path)
        for name in r.keys():
            bits(r.get(name))  # touch every byte
        n = struct.unpack_from("<Q", data)[0]  # the pure in-memory parser agrees
        assert parse_header(data[8:8 + n], len(data) - 8 - n, "mem")[0] == read_header(path).tensors

    case, outcomes = run_mutation_fuzz("safetensors", fast_dir / "fuzz.safetensors", lambda rng: mutate(valid, rng),
                                       load, WeightFormatError, default_seconds=5)
    assert case > 300 and outcomes["WeightFormatError"] > 0 and outcomes["ok"] > 0


# ----- peak memory while loading --------------------------------------------------------------------------------

RSS_SCRIPT = r"""
import gc, json, re, sys, torch
from pocketlm.formats.safetensors_io import CheckpointReader

def hwm_mb():  # peak resident set since the last reset
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

r = CheckpointReader(sys.argv[1])
growth = {}
for mode in ("copy", "keep", "half"):
    dst = {k: torch.zeros(r.shape(k), dtype=r.dtype(k)) for k in r.keys()} if mode == "copy" else None
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (Linux >= 4.0)
    start = hwm_mb()
    kept = []
    for name in r.keys():
        if mode == "copy":  # what a model loader does: copy into parameters that already exist
            dst[name].copy_(r.get(name))
        elif mode == "keep":  # keep the returned tensors (memory-mapped views), touching every page
            t = r.get(name); float(t.sum()); kept.append(t)
        else:  # convert to half and keep
            kept.append(r.get(name, dtype=torch.float16))
    growth[mode] = hwm_mb() - start
    del dst, kept
print(json.dumps(growth))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_loading_streams_one_tensor_at_a_time(tmp_path):
    n, mb = 10, 20  # ~200 MB checkpoint of 20 MB tensors, in two shards
    state = {f"layers.{i}.weight": torch.full((mb * 2**20 // 4,), float(i)) for i in range(n)}
    write_checkpoint(tmp_path, state, max_shard_bytes=100 * 2**20)
    del state
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout)
    slack = 16  # MB: allocator and interpreter noise
    for mode, kept_mb in [("copy", 0), ("keep", n * mb), ("half", n * mb / 2)]:
        print(f"{mode}: peak RSS growth {growth[mode]:.1f} MB (kept {kept_mb} MB, largest tensor {mb} MB)")
        assert growth[mode] <= kept_mb + 1.2 * mb + slack, (mode, growth)


# ----- the no-pickle gate ---------------------------------------------------------------------------------------

def pickle_findings(root: Path) -> list[str]:
    """Every `import pickle`, `pickle.load(s)`, `jinja2.Environment(` and `torch.load(` without
    `weights_only=True` in the Python files under `root`."""
    findings = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = lambda node: f"{path.relative_to(root)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                findings += [f"{where(node)} import {a.name}" for a in node.names
                             if a.name.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "_pickle",
                                                                                           "dill"):
                findings.append(f"{where(node)} from {node.module} import")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                attr = node.func.attr
                if owner.endswith("pickle") and attr in ("load", "loads", "Unpickler"):
                    findings.append(f"{where(node)} {owner}.{attr}(")
                elif owner == "jinja2" and attr == "Environment":
                    findings.append(f"{where(node)} jinja2.Environment( (use the sandboxed environment)")
                elif owner == "torch" and attr == "load":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        findings.append(f"{where(node)} torch.load( without weights_only=True")
        # textual backstop for spellings the AST walk does not see (aliases, getattr tricks)
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(r"\bpickle\.loads?\(|jinja2\.Environment\(", line) and f":{i} " not in " ".join(findings):
                findings.append(f"{path.relative_to(root)}:{i} {line.strip()}")
    return findings


def test_no_pickle_gate():
    assert SRC.is_dir()
    assert pickle_findings(SRC) == []


def test_no_pickle_gate_catches_offenders(tmp_path):
    (tmp_path / "bad.py").write_text("import pickle\nimport torch, jinja2\nx = pickle.loads(b'')\n"
                                     "y = torch.load('a.pt')\nz = torch.load('a.pt', weights_only=False)\n"
                                     "ok = torch.load('a.pt', weights_only=True)\ne = jinja2.Environment()\n")
    found = pickle_findings(tmp_path)
    assert len(found) == 5, found


def test_torch_load_weights_only_refuses_a_malicious_pickle(tmp_path):
    import pickle  # test-only: builds the attack that the gate keeps out of src/

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)  # a zip checkpoint whose data.pkl runs a shell command on load
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not sentinel.exists()
    pickle.loads(pickle.dumps(Evil()))  # the payload is live: unpickled without the guard, it runs
    assert sentinel.exists()
