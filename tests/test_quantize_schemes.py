"""`pocketlm quantize --scheme` for q5_0, q5_1, iq4_nl, q5_k, q6_k and q4_k_m (llama.cpp's Q4_K_M mix): the GGUF
loads in pocketlm on the CPU kernels and in llama.cpp (llama-cpp-python, the test-time reference), and the two
agree (logits and greedy tokens); q4_k_m writes llama.cpp's tensor types; a bad scheme is a typed error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pocketlm
from pocketlm.cli import main
from pocketlm.formats.gguf import GGML_TYPES, GGUFFile
from pocketlm.formats.gguf_model import load_gguf
from pocketlm.quant import kernels
from pocketlm.quant.linear import QuantError, QuantizedLinear, tensor_type, use_more_bits

N_NEW = 12
NEW_SCHEMES = ["q5_0", "q5_1", "iq4_nl", "q5_k", "q6_k", "q4_k_m"]
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def nano_ids():
    return pocketlm.Tokenizer.default().encode(TEXT, add_bos=True)


def _quantize(tmp_path, scheme: str):
    """`pocketlm quantize nano OUT --scheme SCHEME` (the 32064 x 256 embedding as Q8_0 except for q4_k_m, whose
    rule gives the tied embedding Q6_K: keeps the test's numpy quantization to seconds)."""
    out = tmp_path / f"nano-{scheme}.gguf"
    keep = [] if scheme == "q4_k_m" else ["--keep-embeddings", "q8_0"]
    assert main(["quantize", "nano", str(out), "--scheme", scheme, *keep]) == 0
    return out


def _types(path) -> dict[str, str]:
    with GGUFFile(path) as g:
        return {name: GGML_TYPES[t.ggml_type].name for name, t in g.tensors.items()}


def test_use_more_bits_is_llama_cpp_rule():
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2 (integer division)
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30,
                                                              31]
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]


def test_q4_k_m_rule_per_tensor():
    def t(name, shape=(256, 512), tied=False):
        return tensor_type("q4_k_m", name, shape, num_layers=32, tied=tied)
    assert t("lm_head.weight") == "Q6_K"
    assert t("model.embed_tokens.weight") == "Q4_K"
    assert t("model.embed_tokens.weight", tied=True) == "Q6_K"
    assert t("model.layers.5.self_attn.qkv_proj.weight") == "Q5_K"
    assert t("model.layers.5.self_attn.o_proj.weight") == "Q4_K"
    assert t("model.layers.5.mlp.gate_up_proj.weight") == "Q4_K"
    assert t("model.layers.5.mlp.down_proj.weight") == "Q4_K"
    assert t("model.layers.6.mlp.down_proj.weight") == "Q6_K"
    assert t("model.layers.6.self_attn.v_proj.weight") == "Q6_K"
    assert t("model.layers.6.block_sparse_moe.experts.3.w2.weight") == "Q6_K"
    assert t("model.layers.6.block_sparse_moe.experts.3.w1.weight") == "Q4_K"
    # rows not a multiple of 256: llama.cpp's fallbacks Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
    assert t("model.layers.5.self_attn.o_proj.weight", (576, 576)) == "Q5_0"
    assert t("model.layers.5.self_attn.qkv_proj.weight", (1728, 576)) == "Q5_1"
    assert t("lm_head.weight", (100, 576)) == "Q8_0"
    assert tensor_type("q6_k", "model.layers.0.mlp.down_proj.weight", (256, 576)) == "Q8_0"
    assert tensor_type("q5_k", "model.layers.0.mlp.down_proj.weight", (256, 576)) == "Q5_1"
    with pytest.raises(QuantError, match="num_layers"):
        tensor_type("q4_k_m", "model.layers.0.mlp.down_proj.weight", (256, 512))


def test_bad_scheme_is_a_typed_error_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(QuantError, match="'q4_k_x' is not one of .*q4_k_m"):
        tensor_type("q4_k_x", "model.layers.0.mlp.down_proj.weight", (256, 512))
    assert main(["quantize", "nano", str(tmp_path / "x.gguf"), "--scheme", "Q4_K_M"]) == 2
    err = capsys.readouterr().err
    assert "'Q4_K_M' is not one of" in err and all(s in err for s in NEW_SCHEMES)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("scheme", NEW_SCHEMES)
def test_scheme_runs_on_kernels_and_in_llama_cpp(tmp_path, nano_ids, scheme):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-time reference)")
    path = _quantize(tmp_path, scheme)
    types = _types(path)
    if scheme == "q4_k_m":  # nano: 4 layers, tied embeddings; use_more_bits(i, 4) is layers 2 and 3
        want = {"token_embd.weight": "Q6_K"}
        for i in range(4):
            want.update({f"blk.{i}.attn_qkv.weight": "Q5_K", f"blk.{i}.attn_output.weight": "Q4_K",
                         f"blk.{i}.ffn_up.weight": "Q4_K", f"blk.{i}.ffn_down.weight": "Q6_K" if i >= 2 else "Q4_K"})
        assert {k: v for k, v in types.items() if "norm" not in k} == want
    else:
        weight_type = {"q5_0": "Q5_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL", "q5_k": "Q5_K", "q6_k": "Q6_K"}[scheme]
        assert {v for k, v in types.items() if k.startswith("blk.") and "norm" not in k} == {weight_type}
    ours = load_gguf(path)  # backend "auto": the CPU kernels where they run the type
    if kernels.available():
        linears = [m for m in ours.modules() if isinstance(m, QuantizedLinear)]
        assert linears and all(m.backend == "kernel" for m in linears), {m.type_name: m.backend for m in linears}
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=1, verbose=False)
    try:
        llm.eval(list(nano_ids))
        ref = np.array(llm.scores[:len(nano_ids)])
        with torch.no_grad():
            got = ours(torch.tensor([nano_ids]))[0].float().numpy()
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{scheme}: max |dlogit| / max |logit| = {rel:.2e}")
        assert rel < 5e-2  # both round activations to 8 bits (llama.cpp's q8_0 / q8_K), in different orders
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        from pocketlm.engine.generate import generate_ids
        from pocketlm.engine.sampling import SamplingParams
        mine = list(generate_ids(ours, list(nano_ids), SamplingParams(temperature=0.0, max_tokens=N_NEW)))
        theirs = []
        for _ in range(N_NEW):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(nxt)
            llm.eval([nxt])
        assert mine == theirs
    finally:
        llm.close()
