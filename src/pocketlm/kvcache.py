"""Quantized KV caches: keys and values stored in 8 or 4 bits with per-block scales, and the memory plan.

Cache types (`--kv-cache TYPE` on run, chat and serve; the names are llama.cpp's `--cache-type-k/v` and
Ollama's `OLLAMA_KV_CACHE_TYPE`):

    f32    4 bytes/value
    f16    2 bytes/value                                       (the C engine's default, as llama.cpp)
    int8   1 byte/value + one f32 scale per (head, position)   (the C engine's first 8-bit layout: amax/127,
                                                                  rounded half to even)
    q8_0   blocks of 32 values along head_dim: f16 d | 32 x int8 q,      x = d * q,        d = amax / 127
    q4_0   blocks of 32 values along head_dim: f16 d | 16 B of nibbles,  x = d * (q - 8),  d = max / -8

q8_0 and q4_0 are ggml's Q8_0 / Q4_0 blocks, value for value (the quantizers follow
`pocketlm.quant.codecs.quantize_q8_0/_q4_0`, i.e. ggml-quants.c `quantize_row_q{8,4}_0_ref`: the scale is
computed in f32 and stored as f16, codes from the f32 inverse, C `roundf` for q8_0, trunc(x/d + 8.5) clamped to
[0, 15] for q4_0; a q4_0 byte j holds values j (low nibble) and j + 16 (high)). They are kept as two arrays
(codes and f16 scales) instead of interleaved 34/18-byte blocks, so that positions can be sliced like a tensor.

`QuantizedKV` is such a pair of arrays with the logical shape (..., head_dim): indexing and assignment on any
leading axes (never the last) go to both, assigning floats quantizes them, `dequantize()` gives floats back.
That lets the caches that slice `k`/`v` by position (the core `KVCache`, the serving `SlotKVCache`, the prefix
cache's blocks, the C engine's `FastKVCache`) hold quantized values without knowing it; `dense(x)` is the one
call where a float tensor is needed.

Attention sees dequantized keys/values: the decode step of the C engine (kernels.c, kv_type 3/4) computes the
q.k products and the weighted sum of values block by block from the codes; the PyTorch paths dequantize the
visible prefix per layer (transient, O(cached positions x head_dim) floats).
"""

from __future__ import annotations

import torch

from pocketlm.errors import ConfigError

KV_CACHE_TYPES = ("f32", "f16", "int8", "q8_0", "q4_0")
FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16}
BLOCK_TYPES = ("q8_0", "q4_0")
QK = 32  # values per q8_0 / q4_0 block


def check_kv_type(kv_type: str) -> str:
    if kv_type not in KV_CACHE_TYPES:
        raise ConfigError(f"KV cache type {kv_type!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    return kv_type


def check_head_dim(kv_type: str, head_dim: int) -> None:
    if kv_type in BLOCK_TYPES and head_dim % QK:
        raise ConfigError(f"KV cache type {kv_type} needs head_dim to be a multiple of {QK}, got {head_dim}")


def bytes_per_value(kv_type: str, head_dim: int) -> float:
    """Average bytes per cached value (scales included)."""
    check_kv_type(kv_type)
    return {"f32": 4.0, "f16": 2.0, "int8": 1.0 + 4.0 / head_dim, "q8_0": 1.0 + 2.0 / QK,
            "q4_0": 0.5 + 2.0 / QK}[kv_type]


def kv_cache_bytes(config, n_tokens: int, kv_type: str = "f16", batch_size: int = 1) -> int:
    """Exact bytes of the keys + values (+ scales) of `n_tokens` positions of every layer."""
    check_kv_type(kv_type)
    hd = config.head_dim
    rows = 2 * config.num_hidden_layers * config.num_key_value_heads * n_tokens * batch_size  # head rows, k and v
    per_row = {"f32": 4 * hd, "f16": 2 * hd, "int8": hd + 4, "q8_0": hd + 2 * (hd // QK),
               "q4_0": hd // 2 + 2 * (hd // QK)}[kv_type]
    return rows * per_row


# ---- the quantizers (torch, bit-exact with pocketlm.quant.codecs) ---------------------------------------------

def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf (halves away from zero), exact in float32: floor(|x|) + floor(2 * frac)."""
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros((), dtype=d.dtype, device=d.device), 1.0 / d)


def quantize(x: torch.Tensor, kv_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hd) -> (codes, scales): q8_0 (..., hd) int8 + (..., hd/32) f16; q4_0 (..., hd/2) uint8 +
    (..., hd/32) f16; int8 (..., hd) int8 + (...,) f32."""
    x = x.float()
    hd = x.shape[-1]
    if kv_type == "int8":  # kernels.c store_kv: amax/127, x / scale rounded half to even
        s = x.abs().amax(-1) / 127.0  # (...,)
        q = torch.where(s[..., None] > 0, torch.round(x / s[..., None].clamp_min(1e-30)), 0.0)
        return q.to(torch.int8), s
    b = x.reshape(*x.shape[:-1], hd // QK, QK)  # (..., nb, 32)
    if kv_type == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127.0  # (..., nb, 1) f32
        q = _roundf(b * _inverse(d))
        q = torch.where(q.isfinite(), q, 0.0).to(torch.int8)
        return q.reshape(x.shape), d[..., 0].to(torch.float16)
    if kv_type == "q4_0":
        imax = b.abs().argmax(-1, keepdim=True)  # first index of the largest magnitude (ties: first, as C `<`)
        d = torch.gather(b, -1, imax) / -8.0  # (..., nb, 1)
        q = torch.trunc(b * _inverse(d) + 8.5)
        q = torch.where(q.isfinite(), q, 0.0).clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)  # byte j: value j (low), value j + 16 (high)
        return packed.reshape(*x.shape[:-1], hd // 2), d[..., 0].to(torch.float16)
    raise ConfigError(f"KV cache type {kv_type!r} is not a quantized type ({', '.join(BLOCK_TYPES)}, int8)")


def dequantize(codes: torch.Tensor, scales: torch.Tensor, kv_type: str, dtype=torch.float32) -> torch.Tensor:
    """The inverse of `quantize` (up to rounding): (..., hd) floats."""
    if kv_type == "int8":
        return (codes.float() * scales[..., None]).to(dtype)
    nb = scales.shape[-1]
    if kv_type == "q8_0":
        q = codes.reshape(*codes.shape[:-1], nb, QK).float()
    else:
        packed = codes.reshape(*codes.shape[:-1], nb, QK // 2)
        q = torch.cat((packed & 15, packed >> 4), dim=-1).float() - 8.0  # (..., nb, 32)
    x = q * scales.float()[..., None]
    return x.reshape(*codes.shape[:-1], nb * QK).to(dtype)


class QuantizedKV:
    """Keys or values stored quantized along head_dim: logical shape (..., head_dim) (see the module docstring).

    Index only the leading axes (positions, heads, layers, rows); the last axis is the quantization block's."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, kv_type: str, head_dim: int):
        self.codes, self.scales, self.kv_type, self.head_dim = codes, scales, kv_type, head_dim

    @classmethod
    def empty(cls, shape: tuple, kv_type: str, device=None, *, zero: bool = True) -> "QuantizedKV":
        """A store of logical shape `shape` (..., head_dim); zeros (calloc: pages resident once written)."""
        check_kv_type(kv_type)
        hd = shape[-1]
        check_head_dim(kv_type, hd)
        make = torch.zeros if zero else torch.empty
        lead = tuple(shape[:-1])
        if kv_type == "int8":
            return cls(make(shape, dtype=torch.int8, device=device), make(lead, device=device), kv_type, hd)
        width = hd if kv_type == "q8_0" else hd // 2
        codes = make(lead + (width,), dtype=torch.int8 if kv_type == "q8_0" else torch.uint8, device=device)
        return cls(codes, make(lead + (hd // QK,), dtype=torch.float16, device=device), kv_type, hd)

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape[:-1]) + (self.head_dim,)

    def _index(self, idx):
        if not isinstance(idx, tuple):
            idx = (idx,)
        assert len(idx) < self.codes.dim() and Ellipsis not in idx, "index the leading axes only"
        return idx

    def __getitem__(self, idx) -> "QuantizedKV":
        idx = self._index(idx)
        return QuantizedKV(self.codes[idx], self.scales[idx], self.kv_type, self.head_dim)

    def __setitem__(self, idx, value) -> None:
        idx = self._index(idx)
        if isinstance(value, QuantizedKV):
            assert value.kv_type == self.kv_type, (value.kv_type, self.kv_type)
            codes, scales = value.codes, value.scales
        else:
            codes, scales = quantize(value, self.kv_type)
        self.codes[idx] = codes
        self.scales[idx] = scales

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.kv_type, dtype)

    def clone(self) -> "QuantizedKV":
        return QuantizedKV(self.codes.clone(), self.scales.clone(), self.kv_type, self.head_dim)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def dense(x, dtype=None) -> torch.Tensor:
    """A float tensor for `x` (a tensor, returned as it is when dtype is None, or a QuantizedKV, dequantized)."""
    if isinstance(x, QuantizedKV):
        return x.dequantize(dtype or torch.float32)
    return x if dtype is None else x.to(dtype)


def kv_store(shape: tuple, kv_type: str | None, dtype: torch.dtype, device=None):
    """Zeros of logical shape `shape` for cache type `kv_type` (None: a float tensor of `dtype`)."""
    if kv_type is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if kv_type in FLOAT_TYPES:
        return torch.zeros(shape, dtype=FLOAT_TYPES[kv_type], device=device)
    return QuantizedKV.empty(shape, kv_type, device)


def store_bytes(x) -> int:
    return x.nbytes() if isinstance(x, QuantizedKV) else x.numel() * x.element_size()


__all__ = ["KV_CACHE_TYPES", "BLOCK_TYPES", "QK", "QuantizedKV", "bytes_per_value", "check_kv_type",
           "check_head_dim", "dense", "dequantize", "kv_cache_bytes", "kv_store", "quantize", "store_bytes"]


def memory_plan(config, n_ctx: int, weights_bytes: int, weights_label: str) -> dict:
    """Weights + KV cache at `n_ctx` positions (batch 1) for every cache type: {"ctx", "weights_bytes",
    "weights", "kv_cache_bytes": {type: bytes}, "total_bytes": {type: bytes}}. Types a head_dim cannot hold
    (q8_0/q4_0 need a multiple of 32) are left out. Runtime overhead (activations, scratch, the Python process:
    ~100-300 MB) is not included."""
    if n_ctx < 1:
        raise ConfigError(f"context length {n_ctx} must be >= 1")
    kv = {t: kv_cache_bytes(config, n_ctx, t) for t in KV_CACHE_TYPES
          if t not in BLOCK_TYPES or config.head_dim % QK == 0}
    return {"ctx": n_ctx, "weights": weights_label, "weights_bytes": weights_bytes, "kv_cache_bytes": kv,
            "total_bytes": {t: weights_bytes + b for t, b in kv.items()}}
