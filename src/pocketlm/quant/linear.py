"""Quantized linear and embedding layers that replace `nn.Linear` / `nn.Embedding` inside `Phi3ForCausalLM`.

A quantized layer keeps the weight exactly as GGUF stores it (`qweight`: uint8, one row of blocks per output
feature, the bytes `codecs.quantize` produced or a GGUF file held), so export writes those bytes unchanged and
the scheme is always the tensor's recorded ggml type, never guessed. Two ways to compute `x @ W.T`:

- "reference": dequantize the whole weight (torch ops mirroring `codecs`), then `F.linear` in the activation
  dtype. Exact up to the matmul's own rounding; every type.
- "int4": PyTorch's CPU int4 op (`aten._weight_int4pack_mm_for_cpu` on `_convert_weight_to_int4pack_for_cpu`
  codes), for Q4_0, Q4_1 and Q4_K (4-bit codes with one scale and one offset per 32 weights). The op computes
  w = (q - 8) * scale + zero per group of 32: Q4_0 is scale = d, zero = 0 (exact); Q4_1 is zero = 8d + m;
  Q4_K is scale = d * sc, zero = 8 * scale - dmin * m (equal to the reference up to float32 rounding).
  Activations may be float32 (exact, slow) or bfloat16 (fast; the op then also rounds scales to bf16: ~0.3%
  relative error).
- Q8_0 has one scale per 32 weights; `aten._weight_int8pack_mm` takes one scale per output row, so it cannot
  run Q8_0 exactly and is not used here (the later speed work may requantize per row, as a separate scheme).

- "kernel": pocketlm's compiled CPU kernels (`quant/kernels.c`) for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and the
  K-quants Q4_K, Q5_K and Q6_K (Q4_K_M files mix Q4_K and Q6_K): activations are quantized to 8 bits the way
  llama.cpp's x86 code does for that type (q8_0/q8_1 in blocks of 32; q8_K in blocks of 256 for the K-quants)
  and multiplied with integer dot products (AVX512-VNNI, AVX2 or plain C). The weight is kept only in the
  kernels' 16-row tile layout (lossless); `qweight` unpacks the GGUF bytes on demand (export), so memory holds one copy.

"auto" takes "kernel" for the kernels' types on the CPU when the kernels build here; otherwise it packs for
"int4" where the op exists and accepts the shape, and uses it for bfloat16 activations only: with float32
activations the op is ~25-50x slower than dequantize + matmul (ANCHORS.md, CPU), so "auto" then takes the
reference path. backend="int4" forces the op for both dtypes (the exactness tests use it).

Deviation: `QuantizedLinear.weight` is a 0-element tensor of the compute dtype on the layer's device, only so
that code reading `lm_head.weight.dtype/device` (e.g. `Phi3ForCausalLM.make_cache`) keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError, WeightFormatError
from pocketlm.quant import codecs, kernels

# `pocketlm quantize --scheme` -> ggml type of the 2-D weights (norms and rope factors always stay F32); q4_k_m is
# llama.cpp's Q4_K_M mix, Q4_K with some tensors in Q5_K / Q6_K (`tensor_type`)
SCHEMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1",
           "q4_0": "Q4_0", "iq4_nl": "IQ4_NL", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K", "q4_k_m": "Q4_K"}
# llama.cpp's type for a K-quant tensor whose rows are not a multiple of 256 (end of `llama_tensor_get_type`);
# used by q5_k, q6_k and q4_k_m (q4_k keeps its own Q8_0 fallback)
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
KEEP_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BACKENDS = ("auto", "reference", "int4", "kernel")
INT4_GROUP = 32
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
TORCH_DEQUANT = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL")
"""Dequantized by torch ops (so GGUF import keeps them quantized); other block types go through numpy."""


class QuantError(PocketLMError, ValueError):
    """A quantization request is invalid (unknown scheme, a shape the format cannot hold)."""


# ----- torch dequantizers (same float32 products as codecs, on whole tensors) -----------------------------------

def _half(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (..., 1) float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) packed bytes -> (..., 32) codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q4_k_parts(raw: torch.Tensor, size: int = 144) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K bytes (N, nb*144) -> codes (N, K) uint8, scales (N, K/32), offsets (N, K/32): w = scale*q - offset.
    Q5_K (size 176): the same with the fifth bits (32 B after the scales) added to the codes."""
    N = raw.shape[0]
    b = raw.reshape(N, -1, size)
    s = b[..., 4:16].to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    d = _half(b[..., 0:2]) * sc.float()  # (N, nb, 8)
    dm = _half(b[..., 2:4]) * mn.float()
    qs = b[..., size - 128:].reshape(N, -1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=3)  # chunk c: weights 64c..64c+31 low, +32.. high
    if size == 176:  # qh[l] bit j: the high bit of weight 32j + l
        qh = b[..., 16:48].reshape(N, -1, 1, 32)
        q = q.reshape(N, -1, 8, 32) | (torch.cat([(qh >> j) & 1 for j in range(8)], dim=2) << 4)
    return q.reshape(N, -1), d.reshape(N, -1), dm.reshape(N, -1)


def dequantize_torch(raw: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF bytes (rows, row_bytes) uint8 -> float32 (rows, cols); Q8_0/Q4_0/Q4_K in torch, others via codecs."""
    N, K = shape
    if type_name == "Q8_0":
        b = raw.reshape(N, K // 32, 34)
        return (b[..., 2:].contiguous().view(torch.int8).float() * _half(b[..., :2])).reshape(N, K)
    if type_name == "Q4_0":
        b = raw.reshape(N, K // 32, 18)
        q = _nibbles32(b[..., 2:]).to(torch.int8) - 8
        return (_half(b[..., :2]) * q.float()).reshape(N, K)
    if type_name == "Q4_1":
        b = raw.reshape(N, K // 32, 20)
        return (_half(b[..., :2]) * _nibbles32(b[..., 4:]).float() + _half(b[..., 2:4])).reshape(N, K)
    if type_name in ("Q5_0", "Q5_1"):  # f16 d | (f16 m) | u32 fifth bits | nibbles
        o = 2 if type_name == "Q5_0" else 4
        b = raw.reshape(N, K // 32, o + 20)
        qh = b[..., o:o + 4].to(torch.int64)
        bits = (qh[..., 0:1] | qh[..., 1:2] << 8 | qh[..., 2:3] << 16 | qh[..., 3:4] << 24) >> torch.arange(32)
        q = (_nibbles32(b[..., o + 4:]).to(torch.int64) | (bits & 1) << 4).float()
        if type_name == "Q5_0":
            return (_half(b[..., :2]) * (q - 16)).reshape(N, K)
        return (_half(b[..., :2]) * q + _half(b[..., 2:4])).reshape(N, K)
    if type_name == "IQ4_NL":
        b = raw.reshape(N, K // 32, 18)
        values = torch.tensor(codecs.IQ4_NL_VALUES.tolist(), dtype=torch.float32)
        return (_half(b[..., :2]) * values[_nibbles32(b[..., 2:]).long()]).reshape(N, K)
    if type_name in ("Q4_K", "Q5_K"):
        q, d, dm = _q4_k_parts(raw, 144 if type_name == "Q4_K" else 176)
        q = q.reshape(N, -1, 32).float()
        return (d[..., None] * q - dm[..., None]).reshape(N, K)
    if type_name == "Q6_K":  # 128 B low nibbles | 64 B high 2 bits | 16 int8 scales | f16 d; w = d*sc*(q-32)
        b = raw.reshape(N, K // 256, 210)
        ql, qh = b[..., :128].reshape(N, -1, 2, 1, 64), b[..., 128:192].reshape(N, -1, 2, 1, 32)
        lo = torch.cat([ql & 0x0F, ql >> 4], dim=3).reshape(N, -1, 16, 16)
        hi = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3).reshape(N, -1, 16, 16)
        q = (lo | (hi << 4)).float() - 32
        dsc = _half(b[..., 208:210]) * b[..., 192:208].contiguous().view(torch.int8).float()  # (N, nb, 16)
        return (dsc[..., None] * q).reshape(N, K)
    return torch.from_numpy(codecs.dequantize(raw.numpy(), type_name, (N, K)))


def _int4_operands(raw: torch.Tensor, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, K) int32 in [0, 15] and scale/zero (K/32, N, 2) float32 for the int4 op: w = (q-8)*scale + zero."""
    N, K = shape
    if type_name == "Q4_0":
        b = raw.reshape(N, K // 32, 18)
        q = _nibbles32(b[..., 2:]).reshape(N, K)
        scale = _half(b[..., :2]).reshape(N, K // 32)
        zero = torch.zeros_like(scale)
    elif type_name == "Q4_1":
        b = raw.reshape(N, K // 32, 20)
        q = _nibbles32(b[..., 4:]).reshape(N, K)
        scale = _half(b[..., :2]).reshape(N, K // 32)
        zero = 8 * scale + _half(b[..., 2:4]).reshape(N, K // 32)
    elif type_name == "Q4_K":
        q, scale, offset = _q4_k_parts(raw)
        zero = 8 * scale - offset
    else:
        raise QuantError(f"the int4 backend runs {INT4_TYPES}, not {type_name}")
    return q.to(torch.int32), torch.stack([scale.T, zero.T], dim=-1).contiguous()


PACK_SLICE_BYTES = 1 << 22
"""GGUF bytes repacked per step by `pack_in_slices` (the packer's whole-tensor temporaries stay this small)."""


def pack_in_slices(raw: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """`kernels.pack` a slice of rows at a time into one preallocated buffer: the same bytes (the tile layout is
    tile-major, (tiles, blocks, tile_block_bytes), so slices of whole 16-row tiles are consecutive runs of it), but
    the packer's temporaries cover one slice, not the whole matrix (a 32064-row Q4_K head needs hundreds of MB)."""
    if raw.shape != (rows, raw.shape[1]) or cols % kernels.BLOCK_COLS.get(type_name, 1):
        return kernels.pack(raw, type_name, rows, cols)  # its typed error
    step = max(1, PACK_SLICE_BYTES // max(raw.shape[1], 1) // kernels.TILE) * kernels.TILE
    if rows <= step:
        return kernels.pack(raw, type_name, rows, cols)
    nb = cols // kernels.BLOCK_COLS[type_name]
    tile_bytes = nb * kernels.TILE_BLOCK_BYTES[type_name]
    out = torch.empty(-(-rows // kernels.TILE) * tile_bytes, dtype=torch.uint8)
    for r in range(0, rows, step):
        part = kernels.pack(raw[r:r + step], type_name, min(step, rows - r), cols)
        start = r // kernels.TILE * tile_bytes
        out[start:start + part.numel()] = part
    return out


def _int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


# ----- layers --------------------------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """`y = x @ W.T (+ b)` with W stored in a GGUF block format; the bias, when there is one (Phi-3-small's
    projections), stays a float parameter named `bias` as in the checkpoint.

    Args:
        qweight: uint8 (out_features, row_bytes), the GGUF bytes of W (rows = output features).
        type_name: ggml type of the bytes ("Q8_0", "Q4_0", "Q4_K", ... any codecs.DEQUANTIZERS type).
        in_features: columns of W.
        dtype: compute/output dtype for the reference path (the model's dtype).
        backend: "auto", "reference" or "int4".
        bias: optional (out_features,) float tensor.
    """

    def __init__(self, qweight: torch.Tensor, type_name: str, in_features: int, *, dtype: torch.dtype = torch.float32,
                 backend: str = "auto", bias: torch.Tensor | None = None):
        super().__init__()
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().to(dtype)))
        if backend not in BACKENDS:
            raise QuantError(f"backend {backend!r} is not one of {BACKENDS}")
        if type_name not in codecs.BLOCK:
            raise QuantError(f"ggml type {type_name!r} is not a block format pocketlm reads; "
                             f"supported: {sorted(codecs.BLOCK)}")
        block, size = codecs.BLOCK[type_name]
        out_features = qweight.shape[0]
        if qweight.dtype != torch.uint8 or qweight.ndim != 2 or in_features % block or \
                qweight.shape[1] != in_features // block * size:
            raise WeightFormatError(f"{type_name} weight of {tuple(qweight.shape)} {qweight.dtype} bytes does not "
                                    f"hold a ({out_features}, {in_features}) matrix")
        self.in_features, self.out_features = in_features, out_features
        self.type_name = type_name
        self.dtype = dtype
        self.backend = "reference"
        self.requested = backend
        if backend in ("auto", "kernel") and type_name in kernels.KINDS and qweight.device.type == "cpu" and \
                kernels.available():
            self.register_buffer("packed", pack_in_slices(qweight, type_name, out_features, in_features),
                                 persistent=False)
            self.backend = "kernel"
            return
        if backend == "kernel":
            raise QuantError(f"the CPU kernels run {sorted(kernels.KINDS)} on the CPU; {type_name} on "
                             f"{qweight.device.type}: {kernels.unavailable_reason() or 'type not supported'}")
        self.register_buffer("qweight", qweight.contiguous())
        if backend in ("auto", "int4") and type_name in INT4_TYPES:
            ok = self._try_int4()
            if backend == "int4" and not ok:
                raise QuantError(f"the int4 op is not available or refuses shape ({out_features}, {in_features})")
        elif backend == "int4":
            raise QuantError(f"the int4 backend runs {INT4_TYPES}, not {type_name}")

    def _try_int4(self) -> bool:
        if not _int4_available() or self.qweight.device.type != "cpu":
            return False
        try:
            q, sz = _int4_operands(self.qweight, self.type_name, (self.out_features, self.in_features))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            probe = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, self.in_features), packed,
                                                                 INT4_GROUP, sz)
            assert probe.shape == (1, self.out_features)
        except (RuntimeError, AssertionError):
            return False
        self.register_buffer("int4_packed", packed, persistent=False)
        self.register_buffer("int4_scale_zeros", sz, persistent=False)
        self._sz_cast: dict[torch.dtype, torch.Tensor] = {}
        self.backend = "int4"
        return True

    def __getattr__(self, name: str):
        if name == "qweight" and "packed" in self._buffers:  # the GGUF bytes, unpacked from the tile layout
            return kernels.unpack(self._buffers["packed"], self.type_name, self.out_features, self.in_features)
        return super().__getattr__(name)

    @property
    def weight(self) -> torch.Tensor:
        buf = self._buffers.get("packed", self._buffers.get("qweight"))
        return torch.empty(0, dtype=self.dtype, device=buf.device)

    def dequantized(self) -> torch.Tensor:
        """W as float32 (out_features, in_features)."""
        return dequantize_torch(self.qweight, self.type_name, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "kernel":
            y = kernels.gemm(self.packed, self.type_name, self.out_features, x.reshape(-1, self.in_features))
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.backend == "int4" and (x.dtype == torch.bfloat16 or
                                       (x.dtype == torch.float32 and self.requested == "int4")):
            sz = self._sz_cast.get(x.dtype)
            if sz is None:
                sz = self._sz_cast[x.dtype] = self.int4_scale_zeros.to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.int4_packed,
                                                           INT4_GROUP, sz)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized().to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, type={self.type_name}, backend={self.backend}"


class ConcatQuantizedLinear(nn.Module):
    """A fused projection whose row blocks are stored in different GGUF types: `y = x @ [W_0; W_1; ...].T`, each
    W_i a `QuantizedLinear` (`parts[i]`) holding its own bytes unchanged (no requantization).

    llama.cpp's Q4_K_M / Q5_K_M of a model whose rows are not a multiple of 256 (SmolLM2-135M: hidden 576) fall
    back per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0), so a layer's attn_q/attn_k may be Q5_0 and its attn_v Q8_0,
    and ffn_gate / ffn_up may differ: such groups become this module instead of one QuantizedLinear of the fused
    `qkv_proj` / `gate_up_proj`. forward runs every part on its own path (the kernels, int4 or reference, as a
    QuantizedLinear of that type would) and concatenates the outputs along the features. The C decode step
    (engine/cpu.py) runs it as one pl_mat of kind KIND_PARTS when every part is on the kernels.

    `backend` is "kernel" when every part runs on the kernels, else the first part's other backend ("reference"
    or "int4"); the parts are submodules, so `linear_paths` counts each under its own type. `weight` is the whole
    matrix dequantized to the compute dtype (what a float nn.Linear of the same values would hold: export and
    quantized safetensors write it as a float matrix, as they did when such groups were loaded as float).
    """

    def __init__(self, parts: list[QuantizedLinear]):
        super().__init__()
        if not parts or len({p.in_features for p in parts}) != 1 or any(p.bias is not None for p in parts):
            raise QuantError(f"concatenated parts need one column count and no bias; got "
                             f"{[(p.out_features, p.in_features, p.bias is not None) for p in parts]}")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.dtype = parts[0].dtype
        self.type_names = tuple(p.type_name for p in parts)
        self.type_name = "+".join(self.type_names)
        paths = [p.backend for p in parts]
        self.backend = "kernel" if all(b == "kernel" for b in paths) else next(b for b in paths if b != "kernel")
        self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized().to(self.dtype)

    def dequantized(self) -> torch.Tensor:
        """W as float32 (out_features, in_features): the parts' rows in order."""
        return torch.cat([p.dequantized() for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)  # (..., out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, types={self.type_name}, backend={self.backend}"


class QuantizedEmbedding(nn.Module):
    """Row lookup in a GGUF-quantized embedding table: only the looked-up rows are dequantized.

    `source` may be a QuantizedLinear (tied embeddings: the lm_head's bytes serve both)."""

    def __init__(self, qweight: torch.Tensor, type_name: str, embedding_dim: int, *, dtype: torch.dtype):
        super().__init__()
        block, size = codecs.BLOCK[type_name]
        if qweight.dtype != torch.uint8 or qweight.ndim != 2 or qweight.shape[1] != embedding_dim // block * size:
            raise WeightFormatError(f"{type_name} embedding bytes {tuple(qweight.shape)} do not hold rows of "
                                    f"{embedding_dim} values")
        self.type_name, self.embedding_dim, self.dtype = type_name, embedding_dim, dtype
        self.num_embeddings = qweight.shape[0]
        self.register_buffer("qweight", qweight.contiguous())

    def tie_to(self, lm_head: "QuantizedLinear") -> None:
        """Read rows from the tied lm_head's bytes (its tile layout when it runs on the kernels): one copy."""
        if lm_head.backend == "kernel":
            del self._buffers["qweight"]
            self.source = [lm_head]  # a list, so the module is not registered twice in the tree
        else:
            self.qweight = lm_head.qweight

    def __getattr__(self, name: str):
        if name == "qweight" and "source" in self.__dict__:
            return self.__dict__["source"][0].qweight
        return super().__getattr__(name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if "source" in self.__dict__:
            src = self.__dict__["source"][0]
            rows = kernels.unpack_rows(src.packed, src.type_name, src.out_features, src.in_features, ids)
        else:
            rows = self.qweight[ids.reshape(-1)]
        w = dequantize_torch(rows, self.type_name, (rows.shape[0], self.embedding_dim))
        return w.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}"


# ----- whole models --------------------------------------------------------------------------------------------

def tensor_type(scheme: str, name: str, shape: tuple[int, ...], keep_embeddings: str | None = None, *,
                num_layers: int | None = None, tied: bool = False) -> str:
    """The ggml type a checkpoint tensor gets under a scheme (the one rule export and `quantize_model` share).

    1-D tensors (norms) stay F32. `keep_embeddings` (f32/f16/bf16/q8_0) sets the embedding and lm_head type.
    q4_k_m picks per tensor (`q4_k_m_type`; it needs `num_layers`, and `tied` when the embedding is also the
    output). A block type whose block does not divide the row length falls back, as llama.cpp does per tensor:
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 under q5_k/q6_k/q4_k_m; the q4_k scheme and the other block types
    -> Q8_0; then F16. The file records the real type of every tensor.
    """
    check_scheme(scheme)
    if keep_embeddings is not None and keep_embeddings not in KEEP_TYPES:
        raise QuantError(f"--keep-embeddings {keep_embeddings!r} is not one of {sorted(KEEP_TYPES)}")
    if len(shape) < 2 or name.endswith("block_sparse_moe.gate.weight"):
        return "F32"  # norms, and the MoE router (llama.cpp keeps ffn_gate_inp F32: routing is near-tie sensitive)
    t = SCHEMES[scheme] if scheme != "q4_k_m" else q4_k_m_type(name, num_layers, tied)
    if keep_embeddings is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = KEEP_TYPES[keep_embeddings]
    fallback = K_FALLBACK.get(t, "Q8_0") if scheme in ("q5_k", "q6_k", "q4_k_m") else "Q8_0"
    for candidate in (t, fallback, "F16"):
        if candidate in FLOAT_TYPES or shape[-1] % codecs.BLOCK[candidate][0] == 0:
            return candidate
    raise AssertionError("F16 always fits")


def check_scheme(scheme: str) -> None:
    """Raise QuantError naming the valid schemes when `scheme` is not one of SCHEMES."""
    if scheme not in SCHEMES:
        raise QuantError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and the last eighth of the layers, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, num_layers: int | None, tied: bool) -> str:
    """The type llama.cpp's Q4_K_M gives a checkpoint tensor (`llama_tensor_get_type` in src/llama-quant.cpp,
    dense models and MoE with other than 8 experts, not Falcon, no importance matrix; before the row-length
    fallback):
    - the output (`lm_head`, or the embedding when tied): Q6_K;
    - the fused attention `qkv_proj` (GGUF `attn_qkv`): Q5_K;
    - `v_proj` (`attn_v`), `mlp.down_proj` and the MoE experts' `w2` (`ffn_down`, `ffn_down_exps`): Q6_K in the
      layers where `use_more_bits(layer, num_layers)`, else Q4_K;
    - every other weight matrix, the untied embedding included: Q4_K.
    """
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        return "Q6_K"
    if name.endswith("self_attn.qkv_proj.weight"):
        return "Q5_K"
    parts = name.split(".")
    if name.endswith(("self_attn.v_proj.weight", "mlp.down_proj.weight")) or \
            (parts[3:5] == ["block_sparse_moe", "experts"] and parts[-2] == "w2"):
        if num_layers is None or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            raise QuantError(f"q4_k_m: the type of {name!r} depends on its layer; pass num_layers")
        return "Q6_K" if use_more_bits(int(parts[2]), num_layers) else "Q4_K"
    return "Q4_K"


QUANT_CHUNK = 1 << 22
"""Values quantized per step: rows are converted to float32 this many at a time, so quantizing a bf16 tensor never
holds a float32 copy of all of it (blocks never span rows, so the bytes are the same as in one pass)."""


def quantize_tensor(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """(rows, cols) float weight -> uint8 GGUF bytes (rows, row_bytes) of `type_name` (Q8_0/Q4_0/Q4_K)."""
    w = w.detach()
    if w.ndim != 2 or type_name not in codecs.BLOCK:
        return torch.from_numpy(codecs.quantize(w.float().cpu().numpy(), type_name))
    rows, cols = w.shape
    block, size = codecs.BLOCK[type_name]
    step = max(1, QUANT_CHUNK // max(cols, 1))
    if rows <= step or cols % block:  # one pass (codecs raises the typed error for a bad row length)
        return torch.from_numpy(codecs.quantize(w.float().cpu().numpy(), type_name))
    out = torch.empty(rows, cols // block * size, dtype=torch.uint8)
    for r in range(0, rows, step):
        out[r:r + step] = torch.from_numpy(codecs.quantize(w[r:r + step].float().cpu().numpy(), type_name))
    return out


def quantize_model(model: nn.Module, scheme: str, *, keep_embeddings: str | None = None,
                   backend: str = "auto") -> nn.Module:
    """Quantize a `Phi3ForCausalLM` in place: every decoder linear, lm_head and the embedding get
    `tensor_type(scheme, name, shape, keep_embeddings)`; float types just change the parameter's dtype."""
    dtype = model.model.embed_tokens.weight.dtype
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight is not model.model.embed_tokens.weight:
            t = tensor_type(scheme, name + ".weight", tuple(module.weight.shape), keep_embeddings,
                            num_layers=model.config.num_hidden_layers, tied=tied)
            set_module(model, name, converted_linear(module.weight, t, dtype, backend, bias=module.bias))
    emb = model.model.embed_tokens.weight
    t = tensor_type(scheme, "model.embed_tokens.weight", tuple(emb.shape), keep_embeddings,
                    num_layers=model.config.num_hidden_layers, tied=tied)
    install_embedding(model, emb, t, dtype, backend, tied=tied)
    return model


def converted_linear(w: torch.Tensor, t: str, dtype: torch.dtype, backend: str,
                     bias: torch.Tensor | None = None) -> nn.Module:
    """A linear of ggml type `t` holding `w` (rows = outputs) and the float `bias` if any: nn.Linear for float
    types, else QuantizedLinear."""
    if t in FLOAT_TYPES:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w.detach().to(FLOAT_TYPES[t]).to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.detach().to(dtype))
        return lin
    return QuantizedLinear(quantize_tensor(w, t), t, w.shape[1], dtype=dtype, backend=backend, bias=bias)


def install_embedding(model: nn.Module, emb: torch.Tensor, t: str, dtype: torch.dtype, backend: str, *,
                      tied: bool, raw: torch.Tensor | None = None) -> None:
    """Set the embedding (and, when tied, lm_head) of `model` to type `t` (float or block type)."""
    if t in FLOAT_TYPES:
        values = emb.detach().to(FLOAT_TYPES[t]).to(dtype) if raw is None else raw.to(dtype)
        e = nn.Embedding(values.shape[0], values.shape[1], dtype=dtype, device=values.device)
        with torch.no_grad():
            e.weight.copy_(values)
        model.model.embed_tokens = e
        if tied:
            model.lm_head.weight = e.weight
        return
    q = quantize_tensor(emb, t) if raw is None else raw
    dim = model.config.hidden_size
    model.model.embed_tokens = QuantizedEmbedding(q, t, dim, dtype=dtype)
    if tied:
        model.lm_head = QuantizedLinear(q, t, dim, dtype=dtype, backend=backend)
        model.model.embed_tokens.tie_to(model.lm_head)  # one copy of the bytes


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def linear_paths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Weight type -> {compute path: number of linears} over every linear of `model` (lm_head included): "kernel"
    (the compiled kernels), "int4" (PyTorch's int4 op), "reference" (dequantize + matmul per call) for block
    types, "pytorch" for float weights. What a verbose report shows, so that a slow path is never silent."""
    out: dict[str, dict[str, int]] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            t, path = module.type_name, module.backend
        elif isinstance(module, nn.Linear):
            t, path = {v: k for k, v in FLOAT_TYPES.items()}.get(module.weight.dtype, str(module.weight.dtype)), "pytorch"
        else:
            continue
        out.setdefault(t, {})
        out[t][path] = out[t].get(path, 0) + 1
    return {t: dict(sorted(p.items())) for t, p in sorted(out.items())}


def model_tensor_types(model: nn.Module) -> dict[str, str]:
    """Checkpoint name -> ggml type of every weight of a (possibly quantized) model."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            out[name + ".weight"] = module.type_name
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            out[name + ".weight"] = {v: k for k, v in FLOAT_TYPES.items()}[module.weight.dtype]
    return out
