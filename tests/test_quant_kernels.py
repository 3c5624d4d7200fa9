"""The compiled CPU kernels (quant/kernels.c): layout, exact integer arithmetic, threads, fallbacks, and the
same arithmetic checks under each instruction-set path forced by $POCKETLM_KERNEL_ISA (AVX512-VNNI where the CPU
has it, AVX2, plain C), each in its own process since a process loads the library once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# ----- forced instruction sets ($POCKETLM_KERNEL_ISA) -------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
FORCED_ISA_CHECKS = [
    "tests/test_quant_kernels.py::test_the_loaded_library_runs_the_requested_isa",
    "tests/test_quant_kernels.py::test_gemm_equals_integer_emulation",
    "tests/test_quant_kernels.py::test_activation_rounding_matches_llama_cpp_x86",
    "tests/test_quant_kernels.py::test_threads_give_identical_results",
    "tests/test_quant_kernels.py::test_layer_keeps_one_copy_and_exports_original_bytes",
    "tests/test_engine_cpu.py::test_c_decode_step_matches_pytorch_step",
    "tests/test_engine_cpu.py::test_q4_1_model_decodes_like_pytorch",
    "tests/test_engine_cpu.py::test_threads_do_not_change_the_result",
]


def test_the_loaded_library_runs_the_requested_isa():
    """Forced: exactly that path. Native: the fastest path this CPU can run (what -march=native should pick)."""
    wanted = kernels.requested_isa()
    if wanted == "native":
        assert kernels.isa() == (kernels.supported_isas() or ["scalar"])[0]
    else:
        assert kernels.isa() == wanted


@pytest.mark.parametrize("isa_name", kernels.supported_isas())
def test_kernel_checks_pass_under_each_forced_isa(isa_name):
    """The integer-emulation, rounding, thread and decode-step checks, rerun with the library built for one path.
    On an AVX512 machine this is what covers the AVX2 and plain-C code; everywhere it covers plain C."""
    env = {**os.environ, kernels.ISA_ENV: isa_name}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "error::RuntimeWarning", *FORCED_ISA_CHECKS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert "skipped" not in done.stdout and " passed" in done.stdout, tail


def test_kernel_isa_values_are_checked(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "avx9000")
    with pytest.raises(kernels.KernelError, match="avx9000.*native, avx512-vnni, avx2, scalar"):
        kernels.requested_isa()
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_error", None)
    with pytest.raises(kernels.KernelError, match="POCKETLM_KERNEL_ISA='avx9000'"):
        kernels.available()  # a misspelt forced path is an error, never a quiet fallback
    with pytest.raises(kernels.KernelError, match="'sse9'"):
        kernels.isa_flags("sse9")
    monkeypatch.setenv(kernels.ISA_ENV, " AVX2 ")
    assert kernels.requested_isa() == "avx2"
    monkeypatch.delenv(kernels.ISA_ENV)
    assert kernels.requested_isa() == "native" and kernels.flags() == kernels.FLAGS


def test_each_isa_has_its_own_flags_and_library(monkeypatch):
    monkeypatch.setattr(kernels, "is_x86", lambda: True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse2", "avx", "avx2", "fma", "f16c", "avx512f",
                                                       "avx512bw", "avx512_vnni"})
    paths = {name: kernels.library_path(name) for name in kernels.ISAS}
    assert len(set(paths.values())) == len(kernels.ISAS)
    scalar, avx2, vnni = kernels.flags("scalar"), kernels.flags("avx2"), kernels.flags("avx512-vnni")
    assert "-march=x86-64" in scalar and not any(f.startswith(("-mavx", "-mfma", "-mf16c")) for f in scalar)
    assert {"-mavx2", "-mfma", "-mf16c"} <= set(avx2) and not any(f.startswith("-mavx512") for f in avx2)
    assert {"-mavx512f", "-mavx512bw", "-mavx512vnni"} <= set(vnni)
    assert "-march=native" not in scalar + avx2 + vnni and "-march=native" in kernels.flags("native")
    monkeypatch.setenv(kernels.ISA_ENV, "scalar")
    assert kernels.library_path() == paths["scalar"]


def test_an_isa_the_cpu_lacks_is_refused(monkeypatch):
    """Building AVX2 code for a CPU without it would end in SIGILL at the first call: refuse by name instead."""
    monkeypatch.setattr(kernels, "is_x86", lambda: True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"sse2", "avx", "fma"})
    with pytest.raises(kernels.KernelError, match="lacks avx2 f16c"):
        kernels.isa_flags("avx2")
    assert kernels.supported_isas() == ["scalar"]
    monkeypatch.setattr(kernels, "is_x86", lambda: False)  # e.g. aarch64: plain C with the default target
    with pytest.raises(kernels.KernelError, match="needs an x86-64 CPU"):
        kernels.isa_flags("avx512-vnni")
    assert kernels.isa_flags("scalar") == [] and kernels.supported_isas() == ["scalar"]
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_error", None)
    with pytest.raises(kernels.KernelError, match="needs an x86-64 CPU"):
        kernels.available()


def test_a_build_that_selects_another_path_is_refused(monkeypatch, tmp_path):
    """If the flags of a forced path did not select it (a compiler that ignores one), loading says so."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path))
    monkeypatch.setitem(kernels.ISA_X86_FLAGS, "avx2", ["-march=x86-64"])  # the scalar build under avx2's name
    monkeypatch.setattr(kernels, "is_x86", lambda: True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    with pytest.raises(kernels.KernelError, match="POCKETLM_KERNEL_ISA=avx2 but .* runs the scalar path"):
        kernels.available()
