"""The harness the CPU-kernel tests share (tests/test_quant_kernels.py, tests/test_quant_kernels_legacy.py):
valid random GGUF rows of every kernel type, llama.cpp's arithmetic emulated in numpy with exact integer dots
(the oracle each kernel must equal to float rounding), and the checks built on them: pack/unpack round trips,
gemm against the emulation on both kernel paths (`scalar=False/True`), and 1 vs 2 threads giving identical bits.

The emulations decode the bytes independently of the package (no `pocketlm.quant.codecs`):
- 32-value types (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL): activations rounded to q8_0 the x86 way (q8_1's sum for
  Q4_1/Q5_1), `ggml_vec_dot_<type>_q8_0/q8_1`: d_w * d_a * (integer dot) (+ m * s), summed in float64;
- K-quants (Q4_K, Q5_K, Q6_K): `quantize_row_q8_K_ref` activations, `ggml_vec_dot_<type>_q8_K`.
"""

from __future__ import annotations

import numpy as np
import torch

from pocketlm.quant import kernels

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])  # kvalues_iq4nl


def random_bytes(type_name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Valid GGUF rows: random codes (and fifth bits), finite f16 scales, offsets for Q4_1/Q5_1, d and dmin for
    Q4_K/Q5_K."""
    g = torch.Generator().manual_seed(seed)
    if type_name in K_TYPES:
        nb, gb = cols // 256, kernels.GGUF_BLOCK_BYTES[type_name]
        raw = torch.randint(0, 256, (rows, nb, gb), dtype=torch.uint8, generator=g)  # codes, 6-bit / int8 scales
        d = (torch.rand(rows, nb, 2, generator=g) * 0.002).half().view(torch.uint8).reshape(rows, nb, 4)
        if type_name in ("Q4_K", "Q5_K"):
            raw[..., 0:4] = d  # d, dmin
        else:
            raw[..., 208:210] = d[..., :2]
        return raw.reshape(rows, nb * gb)
    nb, gb = cols // 32, kernels.GGUF_BLOCK_BYTES[type_name]
    raw = torch.randint(0, 256, (rows, nb, gb), dtype=torch.uint8, generator=g)
    raw[..., 0:2] = (torch.rand(rows, nb, generator=g) * 0.02).half().view(torch.uint8).reshape(rows, nb, 2)
    if type_name in ("Q4_1", "Q5_1"):
        raw[..., 2:4] = (-torch.rand(rows, nb, generator=g) * 0.1).half().view(torch.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * gb)


def codes(raw: torch.Tensor, type_name: str, rows: int, cols: int) -> np.ndarray:
    """The integer weight codes (rows, nb, 32) that multiply d in a 32-value type."""
    b = raw.numpy().reshape(rows, cols // 32, -1)
    if type_name == "Q8_0":
        return b[..., 2:].copy().view(np.int8).astype(np.int64)
    if type_name in ("Q4_0", "Q4_1", "IQ4_NL"):
        qs = b[..., (4 if type_name == "Q4_1" else 2):].astype(np.int64)
        q = np.concatenate([qs & 15, qs >> 4], -1)
        return IQ4_NL_VALUES[q] if type_name == "IQ4_NL" else q - 8 if type_name == "Q4_0" else q
    o = 2 if type_name == "Q5_0" else 4
    qs = b[..., o + 4:].astype(np.int64)
    qh = b[..., o:o + 4].astype(np.int64)
    u32 = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    q = np.concatenate([qs & 15, qs >> 4], -1) | (((u32[..., None] >> np.arange(32)) & 1) << 4)
    return q - 16 if type_name == "Q5_0" else q


def emulate(raw: torch.Tensor, type_name: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic in numpy (x: (T, cols) activations -> (T, rows) float64); K-quants: `emulate_k`."""
    if type_name in K_TYPES:
        return emulate_k(raw, type_name, rows, cols, x)
    T, nb = x.shape[0], cols // 32
    xb = x.reshape(T, nb, 32).astype(np.float32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, 0).astype(np.float32)
    qa = np.rint(xb * inv).astype(np.int64)  # half to even
    d_exact = amax[..., 0] / np.float32(127.0)
    da = d_exact.astype(np.float16).astype(np.float64)
    sa = (d_exact * qa.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)  # q8_1: unrounded d
    b = raw.numpy().reshape(rows, nb, -1)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    dots = np.einsum("rbk,tbk->trb", codes(raw, type_name, rows, cols), qa).astype(np.float64)  # exact integers
    y = (d[None] * da[:, None, :] * dots).sum(-1)
    if type_name in ("Q4_1", "Q5_1"):
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        y = y + (m[None] * sa[:, None, :]).sum(-1)
    return y


def emulate_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's quantize_row_q8_K_ref in float32: (codes int64 (T, nsb, 256), d float32 (T, nsb), bsums)."""
    T = x.shape[0]
    xb = x.reshape(T, -1, 256).astype(np.float32)
    mx = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)  # signed value of largest magnitude
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-127.0) / mx
        q = np.where(mx != 0, np.minimum(127, np.rint(iscale * xb)), 0).astype(np.int64)
        d = np.where(mx[..., 0] != 0, np.float32(1.0) / iscale[..., 0], 0).astype(np.float32)
    return q, d, q.reshape(T, q.shape[1], 16, 16).sum(-1)


def emulate_k(raw: torch.Tensor, type_name: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """llama.cpp's ggml_vec_dot_q4_K_q8_K / q5_K / q6_K_q8_K: exact int sums per super-block, then float steps."""
    qa, yd, bs = emulate_q8_k(x)
    nb = cols // 256
    b = raw.numpy().reshape(rows, nb, -1)
    if type_name in ("Q4_K", "Q5_K"):  # Q5_K: the same with a fifth bit, qh[l] bit j for weight 32j + l
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        s = b[..., 4:16].astype(np.int64)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., -128:].reshape(rows, nb, 4, 1, 32).astype(np.int64)
        q = np.concatenate([qs & 15, qs >> 4], 3).reshape(rows, nb, 8, 32)
        if type_name == "Q5_K":
            qh = b[..., 16:48].reshape(rows, nb, 1, 32).astype(np.int64)
            q = q | (((qh >> np.arange(8).reshape(1, 1, 8, 1)) & 1) << 4)
        dots = np.einsum("rsjk,tsjk->trsj", q, qa.reshape(*qa.shape[:2], 8, 32))
        sumi = (dots * sc[None]).sum(-1)  # (t, r, s)
        msum = (mn[None] * bs.reshape(*bs.shape[:2], 8, 2).sum(-1)[:, None]).sum(-1)
        dd = (d[None] * yd[:, None]).astype(np.float64)  # float32 products, as llama.cpp
        dm = (-(dmin[None] * yd[:, None])).astype(np.float64)
        return (dd * sumi + dm * msum).sum(-1)
    ql, qh = b[..., :128].reshape(rows, nb, 2, 1, 64), b[..., 128:192].reshape(rows, nb, 2, 1, 32)
    lo = np.concatenate([ql & 15, ql >> 4], 3).reshape(rows, nb, 256).astype(np.int64)
    hi = np.concatenate([(qh >> k) & 3 for k in (0, 2, 4, 6)], 3).reshape(rows, nb, 256).astype(np.int64)
    q = (lo | (hi << 4)) - 32
    sc = b[..., 192:208].copy().view(np.int8).astype(np.int64)
    d = b[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
    dots = np.einsum("rsgk,tsgk->trsg", q.reshape(rows, nb, 16, 16), qa.reshape(*qa.shape[:2], 16, 16))
    sumi = (dots * sc[None]).sum(-1)
    return ((d[None] * yd[:, None]).astype(np.float64) * sumi).sum(-1)


# ----- checks --------------------------------------------------------------------------------------------------

def check_pack_round_trip(type_name: str, rows: int, cols: int) -> torch.Tensor:
    """pack -> unpack and unpack_rows give the file's bytes back; the tiles hold ceil(rows / 16) x blocks per row
    tile blocks. Returns the packed tensor (for checks on its size)."""
    raw = random_bytes(type_name, rows, cols, seed=rows)
    packed = kernels.pack(raw, type_name, rows, cols)
    block = 256 if type_name in K_TYPES else 32
    assert packed.numel() == -(-rows // 16) * (cols // block) * kernels.TILE_BLOCK_BYTES[type_name]
    assert torch.equal(kernels.unpack(packed, type_name, rows, cols), raw)
    idx = torch.tensor([rows - 1, 0, 5 % rows, rows - 1])
    assert torch.equal(kernels.unpack_rows(packed, type_name, rows, cols, idx), raw[idx])
    return packed


def check_gemm_equals_emulation(type_name: str, rows: int, cols: int, T: int) -> None:
    """kernels.gemm on both paths (the ISA's and scalar=True) equals `emulate` to float rounding, with an all-zero
    activation block (super-block for the K-quants) in the first row."""
    raw = random_bytes(type_name, rows, cols, seed=T)
    packed = kernels.pack(raw, type_name, rows, cols)
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T)) * 3
    x[0, :256 if type_name in K_TYPES else 32] = 0.0
    want = emulate(raw, type_name, rows, cols, x.numpy())
    for scalar in (False, True):
        got = kernels.gemm(packed, type_name, rows, x, scalar=scalar).double().numpy()
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def check_threads_identical(type_name: str, rows: int, cols: int) -> None:
    """1 and 2 threads give bit-identical gemm outputs."""
    raw = random_bytes(type_name, rows, cols)
    packed = kernels.pack(raw, type_name, rows, cols)
    x = torch.randn(5, cols)
    old = kernels.get_threads()
    try:
        outs = []
        for n in (1, 2):
            kernels.set_threads(n)
            outs.append(kernels.gemm(packed, type_name, rows, x))
    finally:
        kernels.set_threads(old)
    assert torch.equal(outs[0], outs[1])


def check_decodes_like_reference(fast, ref, ids: list[int], steps: int, min_checked: int) -> None:
    """`fast` (a `engine.cpu.FastDecoder`) against `ref` (the same file loaded with float weights): the prompt
    (several tokens per unpacked block), then one token at a time (the C decode step); its logits within 3% of the
    reference's largest (8-bit activations), its greedy token the reference's wherever the reference's top-2
    margin exceeds twice that error, which must happen at least `min_checked` times."""
    ids_t = torch.tensor([ids])
    cache = fast.make_cache(1, 32)
    checked = 0
    with torch.inference_mode():
        got = fast(ids_t, cache, last_only=True)
        for step in range(steps):
            want = ref(ids_t)[:, -1:]
            err = (got - want).abs().max().item()
            assert err < 3e-2 * want.abs().max().item(), (step, err)
            top2 = want[0, 0].topk(2).values
            nxt = int(got[0, 0].argmax())
            if (top2[0] - top2[1]).item() > 2 * err:
                assert nxt == int(want[0, 0].argmax()), step
                checked += 1
            ids_t = torch.cat([ids_t, torch.tensor([[nxt]])], dim=1)
            got = fast(ids_t[:, -1:], cache, last_only=True)
    assert checked >= min_checked, checked
