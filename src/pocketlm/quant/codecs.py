"""GGUF block formats in numpy: Q8_0, Q4_0, Q5_0, Q5_1, Q4_K quantize + dequantize; Q4_1, Q5_K, Q6_K, IQ4_NL
dequantize.

Each format stores a row of `n` weights as `n / block_size` blocks of `type_size` bytes (ggml-common.h):

    Q8_0  (32 w, 34 B):  f16 d | 32 x int8 q                 w = d * q,          d = amax / 127
    Q4_0  (32 w, 18 B):  f16 d | 16 B nibbles (j, j+16)      w = d * (q - 8),    d = max / -8 (signed max)
    Q4_1  (32 w, 20 B):  f16 d | f16 m | 16 B nibbles         w = d * q + m
    Q5_0  (32 w, 22 B):  f16 d | u32 high bits | 16 B nibbles w = d * (q - 16)
    Q5_1  (32 w, 24 B):  f16 d | f16 m | u32 qh | nibbles     w = d * q + m
    IQ4_NL (32 w, 18 B): f16 d | 16 B nibbles (j, j+16)      w = d * kvalues_iq4nl[q]  (a fixed 16-entry table)
    Q4_K  (256 w, 144 B): f16 d | f16 dmin | 12 B of 6-bit (scale, min) for 8 sub-blocks of 32 | 128 B nibbles
                          w = d * sc_j * q - dmin * m_j
    Q5_K  (256 w, 176 B): as Q4_K, with 32 B of fifth bits (qh) before the nibbles: q = nibble | bit << 4
    Q6_K  (256 w, 210 B): 128 B low nibbles | 64 B high 2 bits | 16 x int8 scales | f16 d;  w = d * sc * (q - 32)

Exactness: every quantizer reproduces, in float32, the operation order of the reference it names, so the bytes
are the reference's bytes (tests/test_quant_codecs.py checks >= 10,000 random blocks, zeros, huge and denormal
values):
- Q8_0 / Q4_0 / Q5_0 / Q5_1: gguf-py `gguf.quants` (which follows ggml-quants.c `quantize_row_q{8,4,5}_{0,1}_ref`).
  Caveat, as in gguf-py: the C reference may be compiled with `x*id + 8.5f` fused into one FMA, which rounds
  once instead of twice; gguf-py and we round twice, so a rare Q4_0 (Q5_0, Q5_1) code can differ from a given
  libggml build (tests/test_quant_kernels_legacy.py compares Q5_0 / Q5_1 with gguf-py).
- Q4_K: llama.cpp `quantize_row_q4_K_ref` + `make_qkx2_quants` (ggml-quants.c, llama.cpp vendored in
  llama-cpp-python 0.3.36), transcribed with the sums accumulated sequentially in float32 as the C loops do
  (numpy's pairwise `sum` would round differently) and `nearest_int` = round half to even. gguf-py has no Q4_K
  quantizer; the test compares with libggml's own `quantize_row_q4_K_ref` via ctypes when llama-cpp-python is
  installed.
- Non-finite intermediate values (a scale whose inverse overflows, e.g. an all-denormal block) give code 0 for
  Q4_0/Q8_0, which is what gguf-py's float->int casts give on x86-64 and what the C reference's casts give there.
- Dequantizers are bit-exact against `gguf.quants.dequantize` (same float32 products, no fused multiply-add).
"""

from __future__ import annotations

import numpy as np

from pocketlm.errors import WeightFormatError

QK = 32  # block size of the _0/_1 formats
QK_K = 256  # super-block size of the k-quants

# name -> (elements per block, bytes per block), ggml.c type_traits
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
         "IQ4_NL": (32, 18),
         "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
QUANTIZERS = ("Q8_0", "Q4_0", "Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K")
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
"""ggml's kvalues_iq4nl (ggml-common.h): the weight code of each IQ4_NL nibble."""


def _blocks(x: np.ndarray, block: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size % block:
        raise WeightFormatError(f"{what}: {x.size} values are not a whole number of {block}-value blocks "
                                f"(shape {x.shape})")
    return x.reshape(-1, block)


def _raw_blocks(data: np.ndarray, type_size: int, what: str) -> np.ndarray:
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size % type_size:
        raise WeightFormatError(f"{what}: {raw.size} bytes are not a whole number of {type_size}-byte blocks")
    return raw.reshape(-1, type_size)


def _f16(a: np.ndarray) -> np.ndarray:
    """float32 -> the 2 bytes of its IEEE half (round to nearest even, overflow -> inf, as GGML_FP32_TO_FP16)."""
    with np.errstate(over="ignore"):
        return a.astype(np.float16).view(np.uint8).reshape(a.shape[0], 2)


def _half(raw: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(-1, 1)


def _roundf_exact(x: np.ndarray) -> np.ndarray:
    """C `roundf` (halves away from zero) as floor(|x|) + floor(2 * frac): exact in float32, where adding 0.5
    first would round 0.49999997 up (gguf-py's `np_roundf` is the same formula)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


def _to_int(x: np.ndarray, dtype: type) -> np.ndarray:
    """float -> integer, non-finite -> 0 (explicit; the reference's casts are undefined there)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), x, 0).astype(dtype)


def _by_chunks(quantize_blocks, b: np.ndarray, chunk: int) -> np.ndarray:
    """`quantize_blocks` over `chunk` blocks (rows of b) at a time, so a search's temporaries stay cache-sized;
    the bytes of all blocks, flat."""
    return np.concatenate([quantize_blocks(b[i:i + chunk]) for i in range(0, b.shape[0], chunk)] or
                          [np.zeros(0, np.uint8)])


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


# ----- Q8_0 ----------------------------------------------------------------------------------------------------

def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 values (count a multiple of 32) -> Q8_0 bytes, shape (n_blocks * 34,)."""
    b = _blocks(x, QK, "Q8_0")
    d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = _to_int(_roundf_exact(b * _inverse(d)), np.int8)
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=1).reshape(-1)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 34, "Q8_0")
    return (b[:, 2:].view(np.int8).astype(np.float32) * _half(b[:, :2])).reshape(-1)


# ----- Q4_0 ----------------------------------------------------------------------------------------------------

def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float32 values (count a multiple of 32) -> Q4_0 bytes, shape (n_blocks * 18,)."""
    b = _blocks(x, QK, "Q4_0")
    imax = np.abs(b).argmax(axis=1)[:, None]  # first index of the largest magnitude, as the C loop's `<`
    signed_max = np.take_along_axis(b, imax, axis=1)
    d = (signed_max / np.float32(-8)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.trunc(b * _inverse(d) + np.float32(8.5))
    q = np.clip(_to_int(q, np.int64), 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))  # byte j holds weights j (low) and j + 16 (high)
    return np.concatenate([_f16(d), packed], axis=1).reshape(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 18, "Q4_0")
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return (_half(b[:, :2]) * q.astype(np.float32)).reshape(-1)


# ----- Q4_1 (dequantize only) / Q5_0 / Q5_1 / IQ4_NL (dequantize only) ------------------------------------------

def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 20, "Q4_1")
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (_half(b[:, :2]) * q + _half(b[:, 2:4])).reshape(-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bit i of it, as the 5th bit of weight i."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def _pack5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32) codes 0..31 -> (qh (n, 4): bit i = 5th bit of weight i, little-endian u32; qs (n, 16) nibbles)."""
    qh = np.packbits(q >> np.uint8(4), axis=1, bitorder="little")
    return qh, (q[:, :16] & np.uint8(0x0F)) | ((q[:, 16:] & np.uint8(0x0F)) << np.uint8(4))


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """float32 values (count a multiple of 32) -> Q5_0 bytes (n_blocks * 22,): ggml's quantize_row_q5_0_ref,
    d = signed max / -16, q = trunc(x/d + 16.5) clipped to 0..31 (as gguf-py, i.e. the same rounding caveat as
    Q4_0)."""
    b = _blocks(x, QK, "Q5_0")
    imax = np.abs(b).argmax(axis=1)[:, None]
    d = (np.take_along_axis(b, imax, axis=1) / np.float32(-16)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.trunc(b * _inverse(d) + np.float32(16.5))
    qh, qs = _pack5(np.clip(_to_int(q, np.int64), 0, 31).astype(np.uint8))
    return np.concatenate([_f16(d), qh, qs], axis=1).reshape(-1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """float32 values (count a multiple of 32) -> Q5_1 bytes (n_blocks * 24,): ggml's quantize_row_q5_1_ref,
    d = (max - min) / 31, m = min, q = trunc((x - min)/d + 0.5) clipped to 0..31."""
    b = _blocks(x, QK, "Q5_1")
    mx, mn = b.max(axis=1, keepdims=True), b.min(axis=1, keepdims=True)
    d = ((mx - mn) / np.float32(31)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.trunc((b - mn) * _inverse(d) + np.float32(0.5))
    qh, qs = _pack5(np.clip(_to_int(q, np.int64), 0, 31).astype(np.uint8))
    return np.concatenate([_f16(d), _f16(mn), qh, qs], axis=1).reshape(-1)


def dequantize_iq4_nl(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 18, "IQ4_NL")
    q = IQ4_NL_VALUES[_nibbles(b[:, 2:])]
    return (_half(b[:, :2]) * q.astype(np.float32)).reshape(-1)


def dequantize_q5_0(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 22, "Q5_0")
    q = (_nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return (_half(b[:, :2]) * q.astype(np.float32)).reshape(-1)


def dequantize_q5_1(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 24, "Q5_1")
    q = (_nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << np.uint8(4))).astype(np.float32)
    return (_half(b[:, :2]) * q + _half(b[:, 2:4])).reshape(-1)


# ----- Q4_K ----------------------------------------------------------------------------------------------------

def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml `nearest_int`: the 12582912.f trick = round half to even (for |x| < 2^22)."""
    with np.errstate(invalid="ignore"):
        return _to_int(np.rint(x), np.int64)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of an (n, G) C-contiguous array, row by row: ((a0 + a1) + a2) + ..., the order of a C
    accumulation loop (numpy reduces a non-inner axis this way; pairwise summation applies to the inner axis)."""
    return np.add.reduce(a, axis=0)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                      nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml-quants.c `make_qkx2_quants` (use_mad = false) for many groups at once.

    x, w: (n, G) float32, one group per column (so each C loop over i is a sum over rows). Returns
    (scale (G,), -min (G,), L (n, G) codes). Sums accumulate over i in order, in float32, as the C loops do.
    """
    f32 = np.float32
    n, G = x.shape
    mn = np.minimum(x.min(axis=0), f32(0))
    mx = x.max(axis=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn  # C returns early: codes 0, scale 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = np.where(flat, f32(1), mx - mn).astype(f32)
        iscale = (f32(nmax) / rng).astype(f32)
        scale = (f32(1) / iscale).astype(f32)
        Lf = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(f32)
        diff = scale * Lf + mn - x
        best = _seqsum(w * (diff * diff))
        for step in range(nstep + 1):
            # `min` is updated whenever a step wins, and later steps use the updated value (as in C)
            rng = np.where(flat, f32(1), mx - mn).astype(f32)
            iscale = ((f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / rng).astype(f32)
            La = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(f32)
            wl = w * La
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * La)
            sum_xl = _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, f32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale * La + this_min - x
            cur = _seqsum(w * (diff * diff))
            better = (D > 0) & (cur < best) & ~flat
            Lf = np.where(better, La, Lf)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, f32(0), scale).astype(f32)
    Lf = np.where(flat, f32(0), Lf)
    return scale, (-mn).astype(f32), Lf.astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(N, 8) 6-bit scales and mins -> (N, 12) bytes, the layout `get_scale_min_k4` reads."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 12) bytes -> (N, 8) scales, (N, 8) mins (ggml `get_scale_min_k4`)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def quantize_q4_k(x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32 values (count a multiple of 256) -> Q4_K bytes, shape (n_blocks * 144,); llama.cpp's reference
    quantizer without an importance matrix (`quantize_row_q4_K_ref`). Works `chunk` super-blocks at a time so the
    ~20 temporaries of the search stay cache-sized."""
    b = _blocks(x, QK_K, "Q4_K")
    return _by_chunks(_quantize_q4_k_blocks, b, chunk)


def _quantize_q4_k_blocks(b: np.ndarray) -> np.ndarray:
    N = b.shape[0]
    d16, dmin16, scales, L = _kx_codes(b, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    L = L.reshape(N, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(N, 128)  # byte l of chunk c: weights 64c+l (low), 64c+32+l
    return np.concatenate([d16, dmin16, scales, qs], axis=1).reshape(-1)


def _kx_codes(b: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The part `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref` share: per 32-value sub-block
    `make_qkx2_quants(32, nmax, ..., rmin, rdelta, nstep)`, the 6-bit scales and mins of an f16 d and dmin, then
    every code again from the rounded scales. b: (N, 256) -> d16 (N, 2), dmin16 (N, 2), packed scales (N, 12),
    codes (N, 8, 32) in 0..nmax."""
    f32 = np.float32
    N = b.shape[0]
    sub = np.ascontiguousarray(b.reshape(N * 8, 32).T)  # (32, groups): one 32-value sub-block per column
    av_x = np.sqrt(_seqsum(sub * sub) / f32(32)).astype(f32)
    weights = (av_x + np.abs(sub)).astype(f32)
    scales, mins, L0 = _make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    L0 = L0.T
    scales, mins = scales.reshape(N, 8), mins.reshape(N, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))  # the C loop starts from 0 and keeps `>` updates
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
        # C: uint8_t ls = nearest_int(...) (wraps modulo 256), then MIN(63, ls)
        ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
        lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
    d16 = _f16((max_scale / f32(63)).astype(f32).reshape(N, 1))
    dmin16 = _f16((max_min / f32(63)).astype(f32).reshape(N, 1))
    d = (_half(d16) * ls.astype(f32)).astype(f32)  # (N, 8)
    dm = (_half(dmin16) * lm.astype(f32)).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = np.clip(_nearest_int((b.reshape(N, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    # `if (!d) continue;` keeps the codes make_qkx2_quants chose for that sub-block
    L = np.where((d == 0)[:, :, None], L0.reshape(N, 8, 32), L).astype(np.uint8)
    return d16, dmin16, _pack_scales_k4(ls, lm), L


def _k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K blocks (N, bytes) -> each sub-block's d * scale and dmin * min, (N, 8, 1) float32."""
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    d = (_half(b[:, 0:2]) * sc.astype(np.float32)).reshape(-1, 8, 1)
    return d, (_half(b[:, 2:4]) * mn.astype(np.float32)).reshape(-1, 8, 1)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 144, "Q4_K")
    N = b.shape[0]
    d, dm = _k4_scales(b)
    qs = b[:, 16:].reshape(N, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(0x0F)).reshape(N, 8, 32).astype(np.float32)
    return (d * q - dm).reshape(-1)


# ----- Q5_K ----------------------------------------------------------------------------------------------------

def quantize_q5_k(x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32 values (count a multiple of 256) -> Q5_K bytes (n_blocks * 176,): llama.cpp's
    `quantize_row_q5_K_ref` (what `llama-quantize` writes without an importance matrix): Q4_K's search with
    `make_qkx2_quants(32, 31, ..., -0.5, 0.1, 15)`, the fifth bits in qh."""
    b = _blocks(x, QK_K, "Q5_K")
    return _by_chunks(_quantize_q5_k_blocks, b, chunk)


def _quantize_q5_k_blocks(b: np.ndarray) -> np.ndarray:
    N = b.shape[0]
    d16, dmin16, scales, L = _kx_codes(b, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    # qh[l] bit j = fifth bit of weight 32j + l; qs as Q4_K's (byte l of chunk c: weights 64c+l, 64c+32+l)
    qh = np.packbits((L >> np.uint8(4)).transpose(0, 2, 1), axis=2, bitorder="little").reshape(N, 32)
    low = (L & np.uint8(0x0F)).reshape(N, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << np.uint8(4))).reshape(N, 128)
    return np.concatenate([d16, dmin16, scales, qh, qs], axis=1).reshape(-1)


def dequantize_q5_k(data: np.ndarray) -> np.ndarray:
    """Q4_K plus a fifth bit: qh[l] bit j is the high bit of weight 32j + l (ggml dequantize_row_q5_K)."""
    b = _raw_blocks(data, 176, "Q5_K")
    N = b.shape[0]
    d, dm = _k4_scales(b)
    hi = (b[:, 16:48].reshape(N, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    qs = b[:, 48:].reshape(N, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = ((qs & np.uint8(0x0F)).reshape(N, 8, 32) | (hi << np.uint8(4))).astype(np.float32)
    return (d * q - dm).reshape(-1)


# ----- Q6_K ----------------------------------------------------------------------------------------------------

GROUP_MAX_EPS = np.float32(1e-15)
"""ggml-quants.c: a group whose largest |value| is below this is all zeros."""


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c `make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)` for many groups at once: x (n, G)
    float32, one group per column. Returns (scale (G,), codes (n, G) in 0..2*nmax-1). Weights are x*x; sums
    accumulate in order, in float32, as the C loops do."""
    f32 = np.float32
    G = x.shape[1]
    mx = x[np.abs(x).argmax(axis=0), np.arange(G)]  # the first value of largest magnitude, with its sign
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx).astype(f32)
    w = (x * x).astype(f32)

    def trial(iscale: np.ndarray):
        lq = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = lq.astype(f32)
        return lq, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L, sumlx, suml2 = trial((f32(-nmax) / mx).astype(f32))
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0)).astype(f32)
        best = (scale * sumlx).astype(f32)
        for step in range(-9, 10):
            if step == 0:
                continue
            lq, sumlx, suml2 = trial((-(f32(nmax) + f32(0.1) * f32(step)) / mx).astype(f32))
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, lq, L)
            scale = np.where(better, sumlx / suml2, scale).astype(f32)
            best = np.where(better, scale * sumlx, best).astype(f32)
    return np.where(zero, f32(0), scale), np.where(zero, 0, L + nmax)


def quantize_q6_k(x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32 values (count a multiple of 256) -> Q6_K bytes (n_blocks * 210,): llama.cpp's
    `quantize_row_q6_K_ref` (what `llama-quantize` writes without an importance matrix): per 16 values
    `make_qx_quants(16, 32, ...)`, int8 scales of an f16 d = max_scale / -128, codes again from the rounded
    scales."""
    b = _blocks(x, QK_K, "Q6_K")
    return _by_chunks(_quantize_q6_k_blocks, b, chunk)


def _quantize_q6_k_blocks(b: np.ndarray) -> np.ndarray:
    f32 = np.float32
    N = b.shape[0]
    sub = np.ascontiguousarray(b.reshape(N * 16, 16).T)  # (16, groups): one 16-value group per column
    scales, L0 = _make_qx_quants(sub, 32)
    scales, L0 = scales.reshape(N, 16), L0.T.reshape(N, 16, 16)
    max_scale = scales[np.arange(N), np.abs(scales).argmax(axis=1)]  # first of largest |scale|, signed
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # the whole block is written as zero bytes
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = (f32(-128) / np.where(zero, f32(1), max_scale)).astype(f32)
        d16 = _f16((f32(1) / iscale).astype(f32).reshape(N, 1))
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)  # (N, 16)
        d = (_half(d16) * sc.astype(f32)).astype(f32)
        L = np.clip(_nearest_int(b.reshape(N, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where((d == 0)[:, :, None], L0, L).astype(np.uint8).reshape(N, 2, 4, 32)  # (half, quarter, l)
    lo = L & np.uint8(0x0F)
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << np.uint8(4)), lo[:, :, 1] | (lo[:, :, 3] << np.uint8(4))],
                        axis=2)  # (N, 2, 64)
    hi = L >> np.uint8(4)
    qh = hi[:, :, 0] | (hi[:, :, 1] << np.uint8(2)) | (hi[:, :, 2] << np.uint8(4)) | (hi[:, :, 3] << np.uint8(6))
    out = np.concatenate([ql.reshape(N, 128), qh.reshape(N, 64), sc.view(np.uint8), d16], axis=1)
    out[zero] = 0
    return out.reshape(-1)


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    b = _raw_blocks(data, 210, "Q6_K")
    N = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    dsc = (_half(d) * np.ascontiguousarray(scales).view(np.int8).astype(np.float32)).reshape(N, 16, 1)
    lo = ql.reshape(N, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    lo = (lo & np.uint8(0x0F)).reshape(N, 8, 32)
    hi = qh.reshape(N, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hi = (hi & np.uint8(0x03)).reshape(N, 8, 32)
    q = ((lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(N, 16, 16).astype(np.float32)
    return (dsc * q).reshape(-1)


# ----- IQ4_NL --------------------------------------------------------------------------------------------------

def _iq4nl_thresholds() -> np.ndarray:
    """For each pair of neighbouring IQ4_NL values (lo, hi), the smallest float32 a in (lo, hi] for which ggml's
    `best_index_int8` picks hi, i.e. fl(a - lo) >= fl(hi - a) (that test is monotone in a, so one threshold per
    pair reproduces it exactly, float rounding included). Found by bisection over the float32 order."""
    f32, i32 = np.float32, np.int32

    def key(f: float) -> int:  # float32 -> an integer with the same order
        i = int(np.array(f, f32).view(i32))
        return i if i >= 0 else -(i & 0x7FFFFFFF)

    def value(k: int) -> np.float32:
        return np.array(k if k >= 0 else (-k) | -0x80000000, i32).view(f32)[()]

    out = []
    v = IQ4_NL_VALUES.astype(f32)
    for lo, hi in zip(v[:-1], v[1:]):
        a, b = key(lo) + 1, key(hi)  # the answer lies in [a, b]; at b (= hi) the test holds
        while a < b:
            m = (a + b) // 2
            x = value(m)
            if x - lo >= hi - x:
                b = m
            else:
                a = m + 1
        out.append(value(a))
    return np.array(out, f32)


_IQ4_NL_THRESHOLDS = _iq4nl_thresholds()


def _best_index_iq4nl(a: np.ndarray) -> np.ndarray:
    """ggml `best_index_int8(16, kvalues_iq4nl, a)`: the index of the nearest table value, with its exact float32
    tie-breaking (`_iq4nl_thresholds`); NaN -> 15, as its binary search gives."""
    idx = np.zeros(a.shape, np.uint8)
    for t in _IQ4_NL_THRESHOLDS:
        idx += a >= t
    return np.where(np.isnan(a), np.uint8(15), idx)


def quantize_iq4_nl(x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """float32 values (count a multiple of 32) -> IQ4_NL bytes (n_blocks * 18,): llama.cpp's `quantize_iq4_nl`
    without an importance matrix (what `llama-quantize` writes; `quantize_row_iq4_nl_impl` with ntry = 7):
    weights x*x, d = max / 127 refined by least squares, then 15 more trial scales (itry - 127) / max; the codes
    are the nearest table values of x / d."""
    b = _blocks(x, QK, "IQ4_NL")
    return _by_chunks(_quantize_iq4_nl_blocks, b, chunk)


def _quantize_iq4_nl_blocks(b: np.ndarray) -> np.ndarray:
    f32 = np.float32
    N = b.shape[0]
    xs = np.ascontiguousarray(b.T)  # (32, N): one block per column
    vals = IQ4_NL_VALUES.astype(f32)
    w = (xs * xs).astype(f32)
    mx = xs[np.abs(xs).argmax(axis=0), np.arange(N)]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx).astype(f32)

    def sums(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = vals[_best_index_iq4nl((inv * xs).astype(f32))]
        return _seqsum(w * q * xs), _seqsum(w * q * q)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (-mx / f32(IQ4_NL_VALUES[0])).astype(f32)
        sumqx, sumq2 = sums((f32(1) / d).astype(f32))
        d = (sumqx / sumq2).astype(f32)
        best = (d * sumqx).astype(f32)
        for itry in range(-7, 8):
            sumqx, sumq2 = sums((f32(itry + int(IQ4_NL_VALUES[0])) / mx).astype(f32))
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(f32)
            best = np.where(better, d * sumqx, best).astype(f32)
        d = np.where(zero, f32(0), d).astype(f32)
        inv = np.where(d != 0, f32(1) / d, f32(0)).astype(f32)
        L = _best_index_iq4nl((inv * xs).astype(f32)).T  # (N, 32)
    qs = L[:, :16] | (L[:, 16:] << np.uint8(4))
    return np.concatenate([_f16(d.reshape(N, 1)), qs], axis=1).reshape(-1)


# ----- dispatch ------------------------------------------------------------------------------------------------

_QUANTIZE = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q5_0": quantize_q5_0, "Q5_1": quantize_q5_1,
             "IQ4_NL": quantize_iq4_nl, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
_DEQUANTIZE = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1, "Q5_0": dequantize_q5_0,
               "Q5_1": dequantize_q5_1, "Q4_K": dequantize_q4_k, "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k,
               "IQ4_NL": dequantize_iq4_nl}
DEQUANTIZERS = tuple(_DEQUANTIZE)


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """Quantize a float array whose last dimension is a multiple of the block size; returns uint8 of shape
    (*x.shape[:-1], bytes_per_row), the GGUF data layout of that tensor."""
    if type_name not in _QUANTIZE:
        raise WeightFormatError(f"no quantizer for {type_name!r}; choose from {list(_QUANTIZE)}")
    block, size = BLOCK[type_name]
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % block:
        raise WeightFormatError(f"{type_name}: the last dimension of shape {x.shape} is not a multiple of {block}")
    with np.errstate(all="ignore"):  # inf/nan inputs follow the reference; no warnings
        return _QUANTIZE[type_name](x).reshape(*x.shape[:-1], x.shape[-1] // block * size)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF bytes of `type_name` -> float32 array of `shape` (PyTorch order)."""
    if type_name not in _DEQUANTIZE:
        raise WeightFormatError(f"no dequantizer for {type_name!r}; supported: {list(_DEQUANTIZE)}")
    block, size = BLOCK[type_name]
    n = int(np.prod(shape))
    if n % block or np.asarray(data).nbytes != n // block * size:
        raise WeightFormatError(f"{type_name}: {np.asarray(data).nbytes} bytes do not hold a tensor of shape "
                                f"{tuple(shape)}")
    with np.errstate(all="ignore"):  # a NaN/inf scale gives NaN/inf weights, as in the reference
        return _DEQUANTIZE[type_name](data).reshape(shape)
