"""Quantizer oracle tests (RELIABILITY.md §6 item 6): pocketlm.quant.codecs against gguf-py's numpy reference and,
when llama-cpp-python is installed, against libggml's own C reference quantizers (via ctypes)."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from pocketlm.errors import WeightFormatError
from pocketlm.quant import codecs

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402

SEED = 20261125


def _blocks(n: int, size: int, seed: int) -> np.ndarray:
    """n random blocks with the hard cases mixed in: all-zero, huge finite, denormal, partly zero, one spike."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size)).astype(np.float32)
    k = n // 10
    x[:k] = 0
    x[k:2 * k] *= np.float32(1e30)
    x[2 * k:3 * k] *= np.float32(1e-40)  # denormals
    x[3 * k:3 * k + 50] = rng.choice([-1, 1], (50, size)).astype(np.float32) * np.float32(3e38)
    x[3 * k + 50:3 * k + 100, ::3] = 0
    x[3 * k + 100:3 * k + 150] *= np.float32(1e-3)
    x[3 * k + 150:3 * k + 200, 5] = 1e4  # one outlier per block
    x[3 * k + 200:3 * k + 250] = np.abs(x[3 * k + 200:3 * k + 250])  # all positive (Q4_K min clamps to 0)
    return x


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_quantize_bit_exact_vs_gguf_py(name):
    print("seed", SEED)
    x = _blocks(12000, 32, SEED)
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, GT[name])
    ours = codecs.quantize(x, name)
    assert ours.shape == ref.shape == (12000, codecs.BLOCK[name][1])
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("name", codecs.DEQUANTIZERS)
def test_dequantize_bit_exact_vs_gguf_py(name):
    block, size = codecs.BLOCK[name]
    rng = np.random.default_rng(SEED)
    raw = rng.integers(0, 256, (3000, size), dtype=np.uint8)  # every bit pattern, NaN/inf scales included
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, GT[name]).reshape(-1)
    ours = codecs.dequantize(raw, name, (3000 * block,))
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all(), f"{(~same).sum()} values differ"


@pytest.mark.parametrize("name", codecs.QUANTIZERS)
def test_round_trip_through_gguf_py_dequantizer(name):
    """Our bytes, read by gguf-py, give our dequantized values (the layouts agree), and the error is bounded."""
    block, _ = codecs.BLOCK[name]
    x = np.random.default_rng(SEED + 1).standard_normal((400, block)).astype(np.float32)
    q = codecs.quantize(x, name)
    back = gguf.quants.dequantize(q, GT[name])
    np.testing.assert_array_equal(back, codecs.dequantize(q, name, x.shape))
    rel = np.abs(back - x).max() / np.abs(x).max()
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.15, "Q5_0": 0.08, "Q5_1": 0.08, "IQ4_NL": 0.15, "Q4_K": 0.15,
                  "Q5_K": 0.08, "Q6_K": 0.04}[name]


def _libggml():
    try:
        import llama_cpp
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    return ctypes.CDLL(path) if os.path.exists(path) else None


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q8_0"])
def test_quantize_bit_exact_vs_libggml(name):
    """The K-quants and IQ4_NL have no gguf-py quantizer: the oracle is llama.cpp's C code itself,
    `quantize_row_<type>_ref` (what `llama-quantize` runs without an importance matrix), and for IQ4_NL
    `quantize_iq4_nl(src, dst, rows, row_length, NULL)` (its row `_ref` searches fewer scales than the
    quantizer `llama-quantize` calls)."""
    lib = _libggml()
    if lib is None:
        pytest.skip("llama_cpp (llama-cpp-python, with libggml-base.so) is not installed")
    block, size = codecs.BLOCK[name]
    n = 10000 if block == 32 else 1500
    x = _blocks(n, block, SEED + 2)
    finite = np.isfinite(x).all(axis=1) & (np.abs(x).max(axis=1) < 1e30)  # C casts of inf/NaN are undefined
    x = np.ascontiguousarray(x[finite])
    ref = np.zeros((x.shape[0], size), np.uint8)
    if name == "IQ4_NL":
        fn = lib.quantize_iq4_nl
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_size_t
        fn(x.ctypes.data, ref.ctypes.data, x.shape[0], block, None)
    else:
        fn = getattr(lib, f"quantize_row_{name.lower().replace('_k', '_K')}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        fn(x.ctypes.data, ref.ctypes.data, x.size)
    ours = codecs.quantize(x, name)
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {x.shape[0]} blocks differ from libggml, first {bad[:5]}"


def test_q4_k_flat_and_zero_blocks():
    x = np.zeros((3, 256), np.float32)
    x[1] = 0.5  # constant positive: min clamps to 0, a flat sub-block
    x[2, :32] = -2.0
    q = codecs.quantize(x, "Q4_K")
    back = codecs.dequantize(q, "Q4_K", x.shape)
    np.testing.assert_array_equal(back[0], 0)
    np.testing.assert_allclose(back[1:], x[1:], atol=0.05)


def test_bad_shapes_raise():
    with pytest.raises(WeightFormatError, match="multiple of 32"):
        codecs.quantize(np.zeros((2, 33), np.float32), "Q4_0")
    with pytest.raises(WeightFormatError, match="no quantizer"):
        codecs.quantize(np.zeros(256, np.float32), "Q4_1")
    with pytest.raises(WeightFormatError, match="do not hold"):
        codecs.dequantize(np.zeros(17, np.uint8), "Q4_0", (32,))
