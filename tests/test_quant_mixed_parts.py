"""Fused projections whose row blocks a GGUF file stores in different types (quant.linear.ConcatQuantizedLinear,
kernels.c KIND_PARTS), as llama.cpp's Q4_K_M of SmolLM2-135M (hidden 576, not a multiple of 256) has them:
attn_q/attn_k Q5_0 but attn_v Q8_0, so qkv_proj cannot be one QuantizedLinear.

A tiny random llama-arch file (GQA) with such groups, mixing the 32-column and the K-quant activation families
within one group (layer 1's q/k/v: Q4_K, Q8_0, Q6_K), is loaded:
- every linear stays quantized with its file bytes, all on the kernels (the C decode step is eligible; `-v`'s
  path report names each part's type on the kernels);
- its logits equal the float (dequantized) weights' within the 8-bit-activation tolerance of the other kernel
  tests, and the reference backend's parts equal the float weights;
- the C decode step (pl_decode_token) equals the prompt path, the batched C step (pl_decode_batch) equals it
  bit for bit, and greedy tokens equal llama.cpp's (llama-cpp-python) on the same file;
- a parts layout C cannot run (a part that is not whole 16-row tiles before another) stays in PyTorch.
The whole file also passes under POCKETLM_KERNEL_ISA=avx2 and =scalar.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import gguf_helpers
from pocketlm.config import preset
from pocketlm.engine import cpu
from pocketlm.errors import GenerationError
from pocketlm.formats import hf
from pocketlm.formats.gguf_model import load_gguf
from pocketlm.quant import kernels
from pocketlm.quant import linear as ql

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")

# per layer: (q, k, v), (gate, up), o, down
LAYER_TYPES = [(("Q5_0", "Q5_0", "Q8_0"), ("Q4_K", "Q6_K"), "Q4_K", "Q6_K"),
               (("Q4_K", "Q8_0", "Q6_K"), ("Q5_1", "Q8_0"), "Q8_0", "Q4_K")]
IDS = [1, 450, 4996, 17354, 1701, 432, 29885, 975, 278, 17366, 11203, 29889]


def _types(name: str, arr: np.ndarray) -> str:
    """The type of each tensor of the mixed file: LAYER_TYPES per layer, Q8_0 embedding and output, F32 vectors."""
    if arr.ndim == 1:
        return "F32"
    if not name.startswith("blk."):
        return "Q8_0"
    layer, part = int(name.split(".")[1]), name.split(".")[2]
    qkv_t, gu_t, o_t, down_t = LAYER_TYPES[layer]
    return {"attn_q": qkv_t[0], "attn_k": qkv_t[1], "attn_v": qkv_t[2], "ffn_gate": gu_t[0], "ffn_up": gu_t[1],
            "attn_output": o_t, "ffn_down": down_t}[part]


def _write(path) -> None:
    """A llama-arch GGUF (split q/k/v and gate/up, as llama.cpp's converter lays them out) of a random tiny-gqa
    model, each tensor quantized to its LAYER_TYPES type (q/k rows are random, so llama.cpp's row permutation
    needs no emulation: pocketlm undoes it on the bytes and both engines then compute the same model)."""
    c = preset("tiny-gqa")
    assert c.num_hidden_layers == len(LAYER_TYPES) and not c.tie_word_embeddings
    model = hf.init_weights(hf.empty_model(c, torch.float32), seed=3)
    gguf_helpers.write_llama_gguf(model, path, _types, context_length=128, permute=False)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    _write(p)
    return p


@pytest.fixture(scope="module")
def model(path):
    return load_gguf(path)


@pytest.fixture(scope="module")
def floats(path):
    return load_gguf(path, dequantize=True)


def test_groups_keep_their_types_on_the_kernels(model):
    for layer, (qkv_t, gu_t, o_t, down_t) in zip(model.model.layers, LAYER_TYPES):
        for lin, types in ((layer.self_attn.qkv_proj, qkv_t), (layer.mlp.gate_up_proj, gu_t)):
            assert isinstance(lin, ql.ConcatQuantizedLinear) and lin.type_names == types
            assert lin.backend == "kernel" and all(p.backend == "kernel" for p in lin.parts)
        assert layer.self_attn.o_proj.type_name == o_t and layer.mlp.down_proj.type_name == down_t
    assert cpu.eligible(model)
    assert isinstance(cpu.accelerate(model), cpu.FastDecoder)
    # linear_paths counts every part under its own type: 2 layers x (3 + 2 parts, o, down) + lm_head
    paths = ql.linear_paths(model)
    assert paths == {"Q4_K": {"kernel": 4}, "Q5_0": {"kernel": 2}, "Q5_1": {"kernel": 1},
                     "Q6_K": {"kernel": 3}, "Q8_0": {"kernel": 5}}
    from pocketlm.cli import _print_paths
    out = io.StringIO()
    _print_paths(model, out)
    assert "reference" not in out.getvalue() and "pytorch" not in out.getvalue()
    assert f"Q8_0 x5 kernels ({kernels.isa()})" in out.getvalue()


def test_parts_hold_the_file_bytes(path, model, floats):
    """No requantization: the parts' bytes are the file's, and dequantized they are the float load's weights."""
    from pocketlm.formats.gguf import GGUFFile
    with GGUFFile(path) as g:
        v_bytes = np.array(g.tensor_bytes("blk.0.attn_v.weight")).reshape(128, -1)
        up_bytes = np.array(g.tensor_bytes("blk.1.ffn_up.weight")).reshape(512, -1)
    assert np.array_equal(model.model.layers[0].self_attn.qkv_proj.parts[2].qweight.numpy(), v_bytes)
    assert np.array_equal(model.model.layers[1].mlp.gate_up_proj.parts[1].qweight.numpy(), up_bytes)
    for layer, ref in zip(model.model.layers, floats.model.layers):
        assert torch.equal(layer.self_attn.qkv_proj.dequantized(), ref.self_attn.qkv_proj.weight)
        assert torch.equal(layer.mlp.gate_up_proj.weight, ref.mlp.gate_up_proj.weight)


def test_reference_backend_equals_float_weights(path, floats):
    ref = load_gguf(path, backend="reference")
    assert isinstance(ref.model.layers[0].self_attn.qkv_proj, ql.ConcatQuantizedLinear)
    assert ref.model.layers[0].self_attn.qkv_proj.backend == "reference" and not cpu.eligible(ref)
    with torch.no_grad():
        torch.testing.assert_close(ref(torch.tensor([IDS])), floats(torch.tensor([IDS])), rtol=1e-4, atol=1e-4)


def test_prompt_path_close_to_float_weights(model, floats):
    """The kernels' 8-bit activations: within 3% of the largest logit (the other kernel tests' tolerance)."""
    with torch.no_grad():
        got, want = model(torch.tensor([IDS])), floats(torch.tensor([IDS]))
    assert (got - want).abs().max() < 3e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("kv", ["int8", "q4_0"])
def test_c_decode_step_equals_prompt_path(model, floats, kv):
    """pl_decode_token through the KIND_PARTS mats equals the PyTorch path (each part's kernels.gemm, then
    concatenated) fed the same tokens one by one with a cache of the same type, up to float summation order;
    against the float weights, as the other kernel tests (8-bit activations)."""
    from tests.kernel_helpers import check_decodes_like_reference
    check_decodes_like_reference(cpu.FastDecoder(model), floats, IDS[:4], steps=8, min_checked=4)  # f16 cache
    fast = cpu.FastDecoder(model, kv)
    cache = fast.make_cache(1, 32)
    model.kv_cache_type = kv
    try:
        ref_cache = model.make_cache(1, 32)
    finally:
        model.kv_cache_type = None
    with torch.no_grad():
        for t, tok in enumerate(IDS):
            step = fast.decode_logits(tok, cache)
            want = model(torch.tensor([[tok]]), ref_cache)[0, 0]
            torch.testing.assert_close(step, want, rtol=0, atol=1e-5)
    assert fast.python_embed_steps == 0 and fast.python_head_steps == 0


def test_batched_c_step_equals_single_sequence(model):
    """pl_decode_batch (batch_matmul over the parts, B = 2) gives each row FastDecoder's logits exactly."""
    from pocketlm.engine.cpu_batch import BatchDecoder
    from pocketlm.serve.batching import SlotKVCache
    bd = BatchDecoder(model)
    cache = SlotKVCache(model.config, 2, 64, torch.float32, "cpu", "f16")
    cache.ensure(len(IDS))
    fast = cpu.FastDecoder(model, "f16")
    rows = [IDS, IDS[::-1]]
    fcaches = [fast.make_cache(1, 64) for _ in rows]
    for t in range(6):
        got = bd.step([r[t] for r in rows], [1, 0], [t, t], cache).clone()  # (2, 1, vocab)
        for i, r in enumerate(rows):
            assert torch.equal(got[i, 0], fast.decode_logits(r[t], fcaches[i])), (t, i)


def test_greedy_tokens_equal_llama_cpp(path, model):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-time reference)")
    from pocketlm.engine.generate import generate_ids
    from pocketlm.engine.sampling import SamplingParams
    mine = list(generate_ids(model, IDS[:5], SamplingParams(temperature=0.0, max_tokens=12)))
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval(IDS[:5])
        theirs = []
        for _ in range(12):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(nxt)
            llm.eval([nxt])
    finally:
        llm.close()
    assert len(mine) == 12 and mine == theirs


def _concat(rows: list[int], types: list[str], cols: int = 64) -> ql.ConcatQuantizedLinear:
    g = torch.Generator().manual_seed(7)
    return ql.ConcatQuantizedLinear([ql.QuantizedLinear(ql.quantize_tensor(torch.randn(r, cols, generator=g), t),
                                                        t, cols) for r, t in zip(rows, types)])


def test_forward_equals_parts_for_any_rows():
    """Parts of any row count compute on the kernels in PyTorch (T > 1): equal to each part's own output."""
    lin = _concat([8, 24, 5], ["Q8_0", "Q5_0", "Q4_0"])
    x = torch.randn(3, 64)
    want = torch.cat([p(x) for p in lin.parts], dim=-1)
    assert lin.out_features == 37 and torch.equal(lin(x), want)
    torch.testing.assert_close(lin(x), x @ lin.dequantized().T, rtol=0, atol=3e-2 * want.abs().max().item())


def test_parts_c_cannot_run_stay_in_pytorch():
    """pl_gemm writes whole 16-row tiles: a part of 8 rows before another is refused by on_kernels and by C."""
    bad, good = _concat([8, 24], ["Q8_0", "Q5_0"]), _concat([16, 8], ["Q8_0", "Q5_0"])
    assert not cpu.on_kernels(bad) and cpu.on_kernels(good)
    keep: list = []
    with pytest.raises(GenerationError, match="16-row tiles"):
        cpu.mat_of(bad, keep)
    mat = cpu.mat_of(good, keep)
    assert mat.kind == 64 and mat.rows == 24 and keep  # the parts array is kept alive by the caller's list


def test_export_writes_mixed_groups_as_float(tmp_path, model):
    """pocketlm's GGUF export (phi3, fused attn_qkv) holds one type per tensor: a mixed group is written as the
    float matrix of its parts' values (as when such groups were loaded as float); the other tensors keep their
    bytes."""
    from pocketlm.formats.gguf import GGUFFile
    from pocketlm.quant.gguf_export import export_gguf
    out = tmp_path / "again.gguf"
    written = export_gguf(model, out)
    assert written["blk.0.attn_qkv.weight"] == "F32" and written["blk.0.attn_output.weight"] == "Q4_K"
    with GGUFFile(out) as g:
        qkv = np.array(g.tensor("blk.0.attn_qkv.weight"), dtype=np.float32)
    assert np.array_equal(qkv, model.model.layers[0].self_attn.qkv_proj.dequantized().numpy())
