"""The compiled CPU kernels (quant/kernels.c): layout, exact integer arithmetic, threads, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketlm.quant import codecs, kernels
from pocketlm.quant.linear import QuantizedLinear, dequantize_torch, quantize_tensor

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")
TYPES = ("Q4_0", "Q4_1", "Q8_0")


def random_bytes(type_name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Valid GGUF rows: random codes, finite f16 scales (and offsets for Q4_1)."""
    g = torch.Generator().manual_seed(seed)
    nb, gb = cols // 32, kernels.GGUF_BLOCK_BYTES[type_name]
    raw = torch.randint(0, 256, (rows, nb, gb), dtype=torch.uint8, generator=g)
    raw[..., 0:2] = (torch.rand(rows, nb, generator=g) * 0.02).half().view(torch.uint8).reshape(rows, nb, 2)
    if type_name == "Q4_1":
        raw[..., 2:4] = (-torch.rand(rows, nb, generator=g) * 0.1).half().view(torch.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * gb)


def emulate(raw: torch.Tensor, type_name: str, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """llama.cpp's arithmetic in numpy: q8 activations (x86 rounding), exact integer block dots, float64 sums."""
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
    if type_name == "Q8_0":
        q = b[..., 2:].copy().view(np.int8).astype(np.int64)
    else:
        qs = b[..., (2 if type_name == "Q4_0" else 4):]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)
        if type_name == "Q4_0":
            q = q - 8
    dots = np.einsum("rbk,tbk->trb", q, qa).astype(np.float64)  # exact integers
    y = (d[None] * da[:, None, :] * dots).sum(-1)
    if type_name == "Q4_1":
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        y = y + (m[None] * sa[:, None, :]).sum(-1)
    return y


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows", [16, 37, 96])
def test_pack_unpack_round_trip(type_name, rows):
    raw = random_bytes(type_name, rows, 128, seed=rows)
    packed = kernels.pack(raw, type_name, rows, 128)
    assert packed.numel() == -(-rows // 16) * 4 * kernels.TILE_BLOCK_BYTES[type_name]
    assert torch.equal(kernels.unpack(packed, type_name, rows, 128), raw)
    idx = torch.tensor([rows - 1, 0, 5 % rows, rows - 1])
    assert torch.equal(kernels.unpack_rows(packed, type_name, rows, 128, idx), raw[idx])


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("T", [1, 3, 4, 9, 70])
def test_gemm_equals_integer_emulation(type_name, T):
    rows, cols = 50, 256
    raw = random_bytes(type_name, rows, cols, seed=T)
    packed = kernels.pack(raw, type_name, rows, cols)
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T)) * 3
    x[0, :32] = 0.0  # an all-zero activation block
    want = emulate(raw, type_name, rows, cols, x.numpy())
    for scalar in (False, True):
        got = kernels.gemm(packed, type_name, rows, x, scalar=scalar).double().numpy()
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_activation_rounding_matches_llama_cpp_x86():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * 26])  # amax 127: codes = x, ties to even
    qa, da, sa_i, _ = kernels.quantize_activations(x)
    assert qa[0, :6].tolist() == [127, 0, 2, 2, 0, -2]
    assert da.item() == 1.0 and sa_i.item() == 129


def test_threads_give_identical_results():
    raw = random_bytes("Q4_0", 512, 512)
    packed = kernels.pack(raw, "Q4_0", 512, 512)
    x = torch.randn(5, 512)
    old = kernels.get_threads()
    try:
        kernels.set_threads(1)
        one = kernels.gemm(packed, "Q4_0", 512, x)
        kernels.set_threads(2)
        two = kernels.gemm(packed, "Q4_0", 512, x)
    finally:
        kernels.set_threads(old)
    assert torch.equal(one, two)


def test_default_threads_respects_environment(monkeypatch):
    monkeypatch.setenv("POCKETLM_NUM_THREADS", "3")
    assert kernels.default_threads() == 3
    monkeypatch.setenv("POCKETLM_NUM_THREADS", "many")
    with pytest.raises(kernels.KernelError, match="many"):
        kernels.default_threads()
    monkeypatch.delenv("POCKETLM_NUM_THREADS")
    assert 1 <= kernels.default_threads() <= len(__import__("os").sched_getaffinity(0))


def test_bad_inputs_are_refused():
    raw = random_bytes("Q4_0", 16, 64)
    with pytest.raises(kernels.KernelError, match="Q4_K"):
        kernels.pack(raw, "Q4_K", 16, 64)
    with pytest.raises(kernels.KernelError, match=r"\(16, 96\)"):
        kernels.pack(raw, "Q4_0", 16, 96)
    packed = kernels.pack(raw, "Q4_0", 16, 64)
    with pytest.raises(kernels.KernelError, match="multiple of 32"):
        kernels.gemm(packed, "Q4_0", 16, torch.randn(1, 60))
    with pytest.raises(kernels.KernelError, match="out of range"):
        kernels.unpack_rows(packed, "Q4_0", 16, 64, torch.tensor([16]))


def test_layer_keeps_one_copy_and_exports_original_bytes():
    w = torch.randn(40, 96) * 0.1
    q = quantize_tensor(w, "Q4_0")
    lin = QuantizedLinear(q, "Q4_0", 96)
    assert lin.backend == "kernel" and "qweight" not in dict(lin.named_buffers())
    assert torch.equal(lin.qweight, q)
    x = torch.randn(2, 3, 96)
    y = lin(x)
    ref = x @ dequantize_torch(q, "Q4_0", (40, 96)).T
    assert y.shape == (2, 3, 40) and ((y - ref).abs().max() / ref.abs().max()).item() < 2e-2
    torch.testing.assert_close(lin.dequantized(), torch.from_numpy(codecs.dequantize(q.numpy(), "Q4_0", (40, 96))))


def test_no_compiler_falls_back_to_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="reference path"):
        assert not kernels.available()
    lin = QuantizedLinear(quantize_tensor(torch.randn(16, 64), "Q4_0"), "Q4_0", 64)
    assert lin.backend in ("reference", "int4")
