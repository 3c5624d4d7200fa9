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
from pocketlm.quant.linear import QuantizedLinear, dequantize_torch, linear_paths, quantize_tensor

from kernel_helpers import (  # the shared harness: tests/kernel_helpers.py
    K_TYPES, check_decodes_like_reference, check_gemm_equals_emulation, check_pack_round_trip,
    check_threads_identical, emulate_q8_k, random_bytes)

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")
TYPES = ("Q4_0", "Q4_1", "Q8_0")


@pytest.mark.parametrize("type_name", K_TYPES)
@pytest.mark.parametrize("rows", [16, 37])
def test_k_pack_unpack_round_trip(type_name, rows):
    check_pack_round_trip(type_name, rows, 512)


def test_q8_k_activations_match_llama_cpp():
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)) * 2
    x[0, :256] = 0.0  # an all-zero super-block: d = 0, codes 0
    x[1, 7] = -50.0  # the largest magnitude always gets code -127: d = max / -127 > 0 here
    x[2, 300], x[2, 301] = 9.0, -9.0  # equal magnitudes: the first one sets the sign (d < 0)
    qa, d, bs = kernels.quantize_activations_k(x)
    q_want, d_want, bs_want = emulate_q8_k(x.numpy())
    assert np.array_equal(qa.numpy().reshape(3, 2, 256), q_want) and np.array_equal(d.numpy(), d_want)
    assert np.array_equal(bs.numpy().reshape(3, 2, 16), bs_want)
    assert qa[1, 7].item() == -127 and d[1, 0].item() > 0
    assert (qa[2, 300].item(), qa[2, 301].item()) == (-127, 127) and d[2, 1].item() < 0


@pytest.mark.parametrize("type_name", K_TYPES)
@pytest.mark.parametrize("T", [1, 3, 9, 70])
def test_k_gemm_equals_integer_emulation(type_name, T):
    check_gemm_equals_emulation(type_name, 40, 512, T)


@pytest.mark.parametrize("type_name", K_TYPES)
def test_k_threads_give_identical_results(type_name):
    check_threads_identical(type_name, 256, 768)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("rows", [16, 37, 96])
def test_pack_unpack_round_trip(type_name, rows):
    check_pack_round_trip(type_name, rows, 128)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("T", [1, 3, 4, 9, 70])
def test_gemm_equals_integer_emulation(type_name, T):
    check_gemm_equals_emulation(type_name, 50, 256, T)


def test_activation_rounding_matches_llama_cpp_x86():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * 26])  # amax 127: codes = x, ties to even
    qa, da, sa_i, _ = kernels.quantize_activations(x)
    assert qa[0, :6].tolist() == [127, 0, 2, 2, 0, -2]
    assert da.item() == 1.0 and sa_i.item() == 129


def test_activation_codes_equal_the_scalar_rule():
    """Every build's codes (the vector paths take 8 lanes at a time) are the plain rule's: per block of 32,
    amax = max |x|, d = amax / 127 (stored as f16), q = round-half-to-even(x * (127 / amax)), the code sum."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 256, generator=g) * torch.logspace(-3, 3, 9)[:, None]
    x[1, :32] = 0.0  # a zero block: d = 0, codes 0
    x[2, 32:64] = -0.0
    x[3, :32] = torch.tensor([127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5] + [3.5] * 22)  # ties
    x[4, 64:96] = torch.linspace(-1e-30, 1e-30, 32)  # subnormal-sized scales
    qa, da, sa_i, _ = kernels.quantize_activations(x)
    xb = x.reshape(9, 8, 32).numpy().astype(np.float32)
    amax = np.abs(xb).max(-1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0).astype(np.float32)
    codes = np.rint((xb * inv[..., None]).astype(np.float32)).astype(np.int32)
    assert np.array_equal(qa.reshape(9, 8, 32).numpy(), codes.astype(np.int8))
    assert np.array_equal(sa_i.numpy(), codes.sum(-1))
    d = (amax / np.float32(127)).astype(np.float32)
    assert np.array_equal(da.numpy(), d.astype(np.float16).astype(np.float32))


def test_threads_give_identical_results():
    check_threads_identical("Q4_0", 512, 512)


@pytest.mark.parametrize("type_name", TYPES + ("Q5_0", "Q5_1", "IQ4_NL") + K_TYPES)
def test_a_row_does_not_depend_on_the_tokens_beside_it(type_name):
    """A token's output row is bit-identical alone and inside a product of T tokens (the vector paths take tokens
    in pairs or groups of 4/8, with a remainder): what makes a batched decode step or a prompt chunk give each
    sequence the numbers of its own single run."""
    rows, cols = 40, 512
    packed = kernels.pack(random_bytes(type_name, rows, cols, seed=5), type_name, rows, cols)
    x = torch.randn(11, cols, generator=torch.Generator().manual_seed(5)) * 3
    together = kernels.gemm(packed, type_name, rows, x)
    for t in range(x.shape[0]):
        assert torch.equal(kernels.gemm(packed, type_name, rows, x[t:t + 1])[0], together[t]), t
    assert torch.equal(kernels.gemm(packed, type_name, rows, x[1:8]), together[1:8])


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
    with pytest.raises(kernels.KernelError, match="Q5_K"):
        kernels.pack(raw, "Q5_K", 16, 64)
    with pytest.raises(kernels.KernelError, match="multiple of 256"):
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
    "tests/test_quant_kernels.py::test_a_row_does_not_depend_on_the_tokens_beside_it",
    "tests/test_quant_kernels.py::test_layer_keeps_one_copy_and_exports_original_bytes",
    "tests/test_quant_kernels.py::test_q8_k_activations_match_llama_cpp",
    "tests/test_quant_kernels.py::test_k_gemm_equals_integer_emulation",
    "tests/test_quant_kernels.py::test_k_threads_give_identical_results",
    "tests/test_quant_kernels.py::test_k_m_model_runs_entirely_on_the_kernels[Q4_K]",
    "tests/test_engine_cpu.py::test_c_decode_step_matches_pytorch_step",
    "tests/test_engine_cpu.py::test_q4_1_model_decodes_like_pytorch",
    "tests/test_engine_cpu.py::test_threads_do_not_change_the_result",
    "tests/test_quant_kernels_legacy.py::test_legacy_gemm_equals_integer_emulation",
    "tests/test_quant_kernels_legacy.py::test_legacy_threads_give_identical_results",
    "tests/test_quant_kernels_legacy.py::test_random_model_in_each_type_runs_on_the_kernels",
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


# ----- a Q4_K_M model (Q4_K, with Q6_K for ffn_down and the output, as llama.cpp's Q4_K_M) ------------------------

def q6_k_bytes(w: torch.Tensor) -> torch.Tensor:
    """A simple Q6_K quantizer (codecs has none): per 16 values an int8 scale of a per-256 f16 d, codes q - 32."""
    R, K = w.shape
    nb = K // 256
    b = w.detach().float().numpy().reshape(R, nb, 16, 16)
    scf = np.abs(b).max(-1) / 31
    d = (scf.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[..., None]
    sc = np.rint(np.divide(scf, df, out=np.zeros_like(scf), where=df > 0)).clip(-128, 127)
    step = (df * sc)[..., None]
    q = (np.rint(np.divide(b, step, out=np.zeros_like(b), where=step != 0)).clip(-32, 31) + 32).astype(np.uint8)
    q = q.reshape(R, nb, 256)
    q4 = q.reshape(R, nb, 2, 2, 64)
    ql = (q4[:, :, :, 0] & 15) | ((q4[:, :, :, 1] & 15) << 4)
    h = (q >> 4).reshape(R, nb, 2, 4, 32)
    qh = h[:, :, :, 0] | (h[:, :, :, 1] << 2) | (h[:, :, :, 2] << 4) | (h[:, :, :, 3] << 6)
    raw = np.concatenate([ql.reshape(R, nb, 128), qh.reshape(R, nb, 64), sc.astype(np.int8).view(np.uint8),
                          d.view(np.uint8).reshape(R, nb, 2)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(raw.reshape(R, nb * 210)))


def q5_k_bytes(w: torch.Tensor, bits: int = 5) -> torch.Tensor:
    """A simple Q5_K quantizer (codecs has none): per 32 values a 6-bit scale and min of per-256 f16 d, dmin.
    bits=4: the same as Q4_K bytes (a fast stand-in for codecs' exact llama.cpp quantizer on big tensors)."""
    R, K = w.shape
    top = (1 << bits) - 1
    nb = K // 256
    b = w.detach().float().numpy().reshape(R, nb, 8, 32)
    lo = np.minimum(b.min(-1), 0)
    scf, mnf = (b.max(-1) - lo) / top, -lo
    d, dmin = (scf.max(-1) / 63).astype(np.float16), (mnf.max(-1) / 63).astype(np.float16)
    df, dmf = d.astype(np.float32)[..., None], dmin.astype(np.float32)[..., None]
    sc = np.rint(np.divide(scf, df, out=np.zeros_like(scf), where=df > 0)).clip(0, 63).astype(np.uint8)
    mn = np.rint(np.divide(mnf, dmf, out=np.zeros_like(mnf), where=dmf > 0)).clip(0, 63).astype(np.uint8)
    step, off = (df * sc)[..., None], (dmf * mn)[..., None]
    q = np.rint(np.divide(b + off, step, out=np.zeros_like(b), where=step > 0)).clip(0, top).astype(np.uint8)
    scales = np.concatenate([sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6), mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6),
                             (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)], axis=-1)
    qh = np.zeros((R, nb, 32), np.uint8)
    for j in range(8):
        qh |= (q[:, :, j] >> 4) << j
    pairs = (q & 15).reshape(R, nb, 4, 2, 32)
    qs = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(R, nb, 128)
    parts = [d.view(np.uint8).reshape(R, nb, 2), dmin.view(np.uint8).reshape(R, nb, 2), scales, qh, qs]
    if bits == 4:
        del parts[3]
    raw = np.concatenate(parts, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(raw.reshape(R, -1)))


def write_k_m(path: Path, main: str = "Q4_K") -> None:
    """The tiny model (random init) as a Q4_K_M / Q5_K_M-style GGUF: `main` everywhere, Q6_K for ffn_down and
    output (llama.cpp's mix, which also puts Q6_K in some attn_v; pocketlm fuses qkv)."""
    import pocketlm
    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.quant.linear import install_embedding, set_module
    model = pocketlm.load("tiny", seed=2)
    encode = {"Q4_K": lambda w: quantize_tensor(w, "Q4_K"), "Q5_K": q5_k_bytes, "Q6_K": q6_k_bytes}
    for layer in model.model.layers:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            w = layer.get_submodule(name).weight.detach()
            t = "Q6_K" if name == "mlp.down_proj" else main
            set_module(layer, name, QuantizedLinear(encode[t](w), t, w.shape[1], backend="reference"))
    head = model.lm_head.weight.detach()
    model.lm_head = QuantizedLinear(q6_k_bytes(head), "Q6_K", head.shape[1], backend="reference")
    emb = model.model.embed_tokens.weight.detach()
    emb_bytes = q5_k_bytes(emb, 4 if main == "Q4_K" else 5)  # codecs' exact Q4_K quantizer: seconds for 8M values
    install_embedding(model, None, main, torch.float32, "reference", tied=False, raw=emb_bytes)
    export_gguf(model, path)


@pytest.fixture(scope="module")
def q4_k_m_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("q4km") / "tiny-q4_k_m.gguf"
    write_k_m(path, "Q4_K")
    return path


@pytest.fixture(scope="module")
def q5_k_m_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("q5km") / "tiny-q5_k_m.gguf"
    write_k_m(path, "Q5_K")
    return path


@pytest.mark.parametrize("type_name,levels", [("Q4_K", 15), ("Q5_K", 31), ("Q6_K", 31)])
def test_k_test_quantizers_match_the_reference_dequantizer(type_name, levels):
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    raw = {"Q4_K": lambda w: q5_k_bytes(w, 4), "Q5_K": q5_k_bytes, "Q6_K": q6_k_bytes}[type_name](w)
    back = codecs.dequantize(raw.numpy(), type_name, (16, 512))
    err, top = np.abs(back - w.numpy()), np.abs(w.numpy()).max()
    assert err.max() < top / levels and err.mean() < top / levels / 4  # within a grid step: the layout is right


@pytest.mark.parametrize("main", ["Q4_K", "Q5_K"])
def test_k_m_model_runs_entirely_on_the_kernels(main, request):
    """Every linear (lm_head included) on the kernels, the C decode step used, and its greedy decode equal to the
    reference path's (dequantize + float matmul) wherever the reference's top-2 margin exceeds the error."""
    from pocketlm.engine import cpu
    from pocketlm.formats.gguf import GGML_TYPES, GGUFFile
    from pocketlm.formats.gguf_model import load_gguf
    path = request.getfixturevalue("q4_k_m_path" if main == "Q4_K" else "q5_k_m_path")
    g = GGUFFile(path)
    types = {name: GGML_TYPES[t.ggml_type].name for name, t in g.tensors.items()}
    assert types["output.weight"] == types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["token_embd.weight"] == types["blk.0.attn_qkv.weight"] == main
    fast_model, ref = load_gguf(path), load_gguf(path, backend="reference")
    linears = [m for m in fast_model.modules() if isinstance(m, QuantizedLinear)]
    assert {m.type_name for m in linears} == {main, "Q6_K"}
    assert all(m.backend == "kernel" for m in linears), [(m.type_name, m.backend) for m in linears]
    assert all(m.backend == "reference" for m in ref.modules() if isinstance(m, QuantizedLinear))
    assert linear_paths(fast_model) == {main: {"kernel": 6}, "Q6_K": {"kernel": 3}}  # 2 layers x 3, 2 down + head
    assert linear_paths(ref) == {main: {"reference": 6}, "Q6_K": {"reference": 3}}
    fast = cpu.accelerate(fast_model)
    assert isinstance(fast, cpu.FastDecoder)
    ref = load_gguf(path, dequantize=True)  # the reference path's arithmetic, its weights dequantized only once
    check_decodes_like_reference(fast, ref, [1, 450, 4996, 17354, 1701, 432, 17204, 975], steps=12, min_checked=6)


def test_truncated_k_quant_file_fails_at_load(q4_k_m_path, tmp_path):
    from pocketlm.errors import WeightFormatError
    from pocketlm.formats.gguf_model import load_gguf
    bad = tmp_path / "cut.gguf"
    data = q4_k_m_path.read_bytes()
    bad.write_bytes(data[:len(data) - 100])  # the last tensor (a K-quant) loses part of its last block
    with pytest.raises(WeightFormatError, match="tensor"):
        load_gguf(bad)
    raw = random_bytes("Q4_K", 16, 512)
    with pytest.raises(WeightFormatError, match=r"Q4_K .*\(16, 512\)"):
        QuantizedLinear(raw[:, :-1], "Q4_K", 512)  # a row one byte short of its last super-block
    with pytest.raises(kernels.KernelError, match="multiple of 256"):
        kernels.pack(random_bytes("Q6_K", 16, 512)[:, :210], "Q6_K", 16, 480)


@pytest.mark.parametrize("type_name", ["Q5_K", "Q6_K"])
def test_k_torch_dequantizers_equal_codecs_and_gguf_py(type_name):
    raw = random_bytes(type_name, 20, 512, seed=4)
    want = codecs.dequantize(raw.numpy(), type_name, (20, 512))
    assert np.array_equal(dequantize_torch(raw, type_name, (20, 512)).numpy(), want)
    gguf = pytest.importorskip("gguf", reason="gguf-py is not installed (test-time reference)")
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(ref.reshape(20, 512), want)


def test_q4_k_m_kernels_agree_with_llama_cpp(q4_k_m_path):
    """llama.cpp runs the same file: logits within the tolerance tests/test_quant_llamacpp.py uses for quantized
    files, and the same greedy continuation. (On this random-init model llama.cpp differs from pocketlm by ~1% of
    the logit range for Q4_0 files as well, with either path: graph-level differences, not the matrix products,
    so a tighter bound here would not test the kernels.)"""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-time reference)")
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.formats.gguf_model import load_gguf
    ids = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]
    llm = llama_cpp.Llama(model_path=str(q4_k_m_path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        greedy_theirs = []
        for _ in range(12):
            greedy_theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy_theirs[-1]])
    finally:
        llm.close()
    kern, ref = load_gguf(q4_k_m_path), load_gguf(q4_k_m_path, backend="reference")
    with torch.inference_mode():
        k = kern(torch.tensor([ids]))[0].numpy()
        r = ref(torch.tensor([ids]))[0].numpy()
    err_k = np.abs(k - theirs).max() / np.abs(theirs).max()
    err_r = np.abs(r - theirs).max() / np.abs(theirs).max()
    assert err_k < 5e-2 and err_k < 2 * err_r, (err_k, err_r)
    assert (k.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    mine = list(generate_ids(kern, ids, SamplingParams(temperature=0.0, max_tokens=12)))
    assert mine == greedy_theirs


def test_random_k_m_model_runs_on_the_kernels(tmp_path):
    """quant.random_model makes K-quant files too (what bench/bench_kquant.py measures): Q4_K with Q6_K for ffn_down
    and output, every linear on the kernels, finite logits."""
    import pocketlm
    from pocketlm.config import preset
    from pocketlm.quant.linear import linear_paths
    from pocketlm.quant.random_model import write_random_gguf
    config = preset("phi-3-mini-4k").replace(num_hidden_layers=1, hidden_size=512, intermediate_size=1024,
                                             num_attention_heads=8, num_key_value_heads=8)
    write_random_gguf(config, tmp_path / "k.gguf", "Q4_K", down_and_output="Q6_K")
    model = pocketlm.load(str(tmp_path / "k.gguf"))
    assert linear_paths(model) == {"Q4_K": {"kernel": 3}, "Q6_K": {"kernel": 2}}
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]]))).all()
