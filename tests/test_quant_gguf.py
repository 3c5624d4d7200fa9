"""GGUF writer state machine, round trips (our writer -> our reader and gguf-py's GGUFReader), phi3 export and
import of quantized files, llama-arch import with the q/k permutation undone, and `pocketlm quantize`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pocketlm
import gguf_helpers
from pocketlm.formats.gguf import GGML_TYPES, GGUFFile, GGUFValueType
from pocketlm.quant import codecs
from pocketlm.quant.gguf_export import export_gguf, tokenizer_metadata
from pocketlm.formats.gguf_model import load_gguf
from pocketlm.quant.gguf_writer import GGUFWriter, GGUFWriterError, WriterState
from pocketlm.quant.linear import QuantizedLinear, quantize_model

IDS = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]


# ----- writer state machine ----------------------------------------------------------------------------------

def _writer(tmp_path, n_tensors=2):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_string("general.architecture", "test")
    for i in range(n_tensors):
        w.add_tensor_info(f"t{i}", (2, 32), "F32")
    return w


def _to_data(w):
    w.write_header()
    w.write_kv()
    w.write_tensor_info()


def test_writer_happy_path_and_state(tmp_path):
    w = _writer(tmp_path)
    assert w.state == WriterState.NO_FILE
    w.write_header()
    assert w.state == WriterState.HEADER
    w.write_kv()
    assert w.state == WriterState.KV
    w.write_tensor_info()
    assert w.state == WriterState.TENSOR_INFO
    w.write_tensor_data("t0", np.zeros((2, 32), np.float32))
    assert w.state == WriterState.DATA
    w.write_tensor_data("t1", np.ones((2, 32), np.float32))
    w.close()
    assert w.state == WriterState.CLOSED
    g = GGUFFile(tmp_path / "x.gguf")
    assert g.metadata == {"general.architecture": "test"}
    np.testing.assert_array_equal(g.tensor("t1"), 1)


@pytest.mark.parametrize("case", [
    "kv_before_header", "tensor_info_before_kv", "data_before_tensor_info", "header_twice", "kv_twice",
    "add_kv_after_header", "add_tensor_after_header", "close_early", "close_before_header", "data_out_of_order",
    "data_wrong_size", "data_after_all_written", "duplicate_key", "duplicate_tensor", "bad_type", "bad_block",
])
def test_writer_rejects_illegal_transitions(tmp_path, case):
    w = _writer(tmp_path)
    z = np.zeros((2, 32), np.float32)
    with pytest.raises(GGUFWriterError):
        if case == "kv_before_header":
            w.write_kv()
        elif case == "tensor_info_before_kv":
            w.write_header()
            w.write_tensor_info()
        elif case == "data_before_tensor_info":
            w.write_header()
            w.write_kv()
            w.write_tensor_data("t0", z)
        elif case == "header_twice":
            w.write_header()
            w.write_header()
        elif case == "kv_twice":
            w.write_header()
            w.write_kv()
            w.write_kv()
        elif case == "add_kv_after_header":
            w.write_header()
            w.add_uint32("late", 1)
        elif case == "add_tensor_after_header":
            w.write_header()
            w.add_tensor_info("late", (32,), "F32")
        elif case == "close_early":
            _to_data(w)
            w.write_tensor_data("t0", z)
            w.close()
        elif case == "close_before_header":
            w.close()
        elif case == "data_out_of_order":
            _to_data(w)
            w.write_tensor_data("t1", z)
        elif case == "data_wrong_size":
            _to_data(w)
            w.write_tensor_data("t0", np.zeros(63, np.float32))
        elif case == "data_after_all_written":
            _to_data(w)
            w.write_tensor_data("t0", z)
            w.write_tensor_data("t1", z)
            w.write_tensor_data("t2", z)
        elif case == "duplicate_key":
            w.add_string("general.architecture", "again")
        elif case == "duplicate_tensor":
            w.add_tensor_info("t0", (32,), "F32")
        elif case == "bad_type":
            w.add_tensor_info("q", (32,), "Q9_9")
        elif case == "bad_block":
            w.add_tensor_info("q", (2, 48), "Q4_0")
    w.abort()
    assert not (tmp_path / "x.gguf").exists()  # nothing that looks complete is left behind


# ----- round trip: our writer -> our reader == gguf-py's reader ---------------------------------------------

def test_round_trip_ours_and_gguf_py(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(7)
    path = tmp_path / "rt.gguf"
    w = GGUFWriter(path)
    kv = [("general.architecture", "phi3", GGUFValueType.STRING), ("a.u32", 7, GGUFValueType.UINT32),
          ("a.i32", -3, GGUFValueType.INT32), ("a.f32", 0.25, GGUFValueType.FLOAT32),
          ("a.bool", True, GGUFValueType.BOOL), ("a.u64", 2**40, GGUFValueType.UINT64),
          ("a.str", "héllo\nwörld", GGUFValueType.STRING)]
    for k, v, t in kv:
        w.add(k, v, t)
    w.add_array("a.strs", ["x", "", "ü<|end|>"], GGUFValueType.STRING)
    w.add_array("a.f32s", [1.5, -2.0, 3.25], GGUFValueType.FLOAT32)
    w.add_array("a.i32s", [1, -2, 3], GGUFValueType.INT32)
    data = {}
    for name, t, shape in [("f32", "F32", (3, 64)), ("f16", "F16", (64,)), ("bf16", "BF16", (2, 32)),
                           ("q8", "Q8_0", (4, 64)), ("q4", "Q4_0", (3, 96)), ("q4k", "Q4_K", (2, 512))]:
        x = rng.standard_normal(shape).astype(np.float32)
        if t == "F32":
            b = x
        elif t == "F16":
            b = x.astype(np.float16)
        elif t == "BF16":
            b = torch.from_numpy(x).bfloat16().view(torch.int16).numpy()
        else:
            b = codecs.quantize(x, t)
        w.add_tensor_info(name, shape, t)
        data[name] = b
    w.write(data)

    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    for k, v, _ in kv:
        assert ours.metadata[k] == pytest.approx(v)
        field = ref.fields[k]
        got = field.contents()
        assert got == pytest.approx(v)
    assert ours.metadata["a.strs"] == ref.fields["a.strs"].contents() == ["x", "", "ü<|end|>"]
    np.testing.assert_array_equal(ours.metadata["a.f32s"], ref.fields["a.f32s"].contents())
    ref_tensors = {t.name: t for t in ref.tensors}
    assert list(ours.tensors) == list(ref_tensors) == list(data)
    for name, b in data.items():
        mine = ours.tensor_bytes(name)
        theirs = np.asarray(ref_tensors[name].data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(mine, np.ascontiguousarray(b).view(np.uint8).reshape(-1))
        assert ours.tensors[name].shape == tuple(int(d) for d in reversed(ref_tensors[name].shape))
        assert GGML_TYPES[ours.tensors[name].ggml_type].name == ref_tensors[name].tensor_type.name


# ----- phi3 export / import ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nano():
    return pocketlm.load("nano", seed=3)


def test_export_metadata_matches_llama_cpp_converter(tmp_path):
    model = pocketlm.load("tiny-longrope", seed=1)
    path = tmp_path / "lr.gguf"
    types = export_gguf(model, path, scheme="q8_0", keep_embeddings="f16")
    g = GGUFFile(path)
    c = model.config
    m = g.metadata
    assert g.architecture == "phi3"
    expect = {"phi3.context_length": c.max_position_embeddings, "phi3.embedding_length": 256,
              "phi3.rope.scaling.original_context_length": c.original_max_position_embeddings,
              "phi3.feed_forward_length": 512, "phi3.block_count": 2, "phi3.attention.head_count": 4,
              "phi3.attention.head_count_kv": 4, "phi3.rope.dimension_count": 64,
              "phi3.attention.sliding_window": c.sliding_window, "tokenizer.ggml.model": "llama",
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 32000,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
              "pocketlm.scheme": "q8_0", "general.file_type": 7}
    for k, v in expect.items():
        assert m[k] == v, k
    for k in ("phi3.attention.layer_norm_rms_epsilon", "phi3.rope.freq_base", "phi3.rope.scaling.attn_factor"):
        assert g.field_types[k] == GGUFValueType.FLOAT32
    assert m["phi3.rope.scaling.attn_factor"] == pytest.approx(c.rope_attention_factor, rel=1e-6)
    np.testing.assert_array_equal(g.tensor("rope_factors_long.weight"), np.float32(c.rope_scaling.long_factor))
    assert types["rope_factors_short.weight"] == "F32"
    assert types["blk.0.attn_qkv.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert types["token_embd.weight"] == types["output.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert g.tensors["blk.0.ffn_up.weight"].shape == (1024, 256)  # fused gate+up, gate rows first
    assert "\n" in m["tokenizer.chat_template"] and "\\n" not in m["tokenizer.chat_template"]
    assert len(m["tokenizer.ggml.tokens"]) == len(m["tokenizer.ggml.scores"]) == 32064
    # pocketlm's own GGUF tokenizer reader gives the same ids as the bundled tokenizer
    tok = pocketlm.Tokenizer.from_pretrained(path)
    ref = pocketlm.Tokenizer.default()
    text = "Hello world, how are you? <|end|> 12345 naïve"
    assert tok.encode(text) == ref.encode(text)
    back = load_gguf(path)
    assert back.config.rope_scaling.long_factor == pytest.approx(c.rope_scaling.long_factor)
    assert back.config.rope_attention_factor == pytest.approx(c.rope_attention_factor)


def test_tokenizer_scores_follow_merge_order():
    tok = pocketlm.Tokenizer.default()
    meta = tokenizer_metadata(tok, 32064)
    assert meta["tokens"][32007] == "<|end|>" and meta["types"][32007] == 3
    assert meta["types"][3] == 6 and meta["tokens"][3] == "<0x00>"
    assert meta["tokens"][32063] == "[PAD32063]" and meta["types"][32063] == 5
    # "▁t" is merged before "▁the"
    assert meta["scores"][tok.token_to_id("▁t")] > meta["scores"][tok.token_to_id("▁the")]


@pytest.mark.parametrize("scheme", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k"])
def test_export_import_round_trip(tmp_path, nano, scheme):
    path = tmp_path / f"{scheme}.gguf"
    types = export_gguf(nano, path, scheme=scheme)
    back = load_gguf(path, backend="reference")
    assert back.config.tie_word_embeddings and "output.weight" not in types
    ids = torch.tensor([IDS])
    with torch.no_grad():
        ref = nano(ids)
        got = back(ids)
    if scheme == "f32":
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # the same quantization in memory gives the same logits as the file
    mem = quantize_model(pocketlm.load("nano", seed=3), scheme, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), mem(ids), rtol=1e-5, atol=1e-5)
    tol = {"f32": 0, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2, "q4_0": 0.3, "q4_k": 0.3}[scheme]
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item() + 1e-6
    # re-export of the loaded (quantized) model writes the identical tensor bytes
    again = tmp_path / f"{scheme}-again.gguf"
    export_gguf(back, again, scheme=scheme)  # quantized layers keep their bytes; float ones get the scheme
    g1, g2 = GGUFFile(path), GGUFFile(again)
    for name in g1.tensors:
        np.testing.assert_array_equal(g1.tensor_bytes(name), g2.tensor_bytes(name))


def test_quantized_layers_survive_loading(tmp_path, nano):
    path = tmp_path / "q4.gguf"
    export_gguf(nano, path, scheme="q4_0", keep_embeddings="q8_0")
    m = load_gguf(path, backend="reference")  # exact against the dequantized model (the kernels: below)
    assert isinstance(m.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    assert m.model.layers[0].self_attn.qkv_proj.type_name == "Q4_0"
    assert m.lm_head.type_name == "Q8_0" and m.model.embed_tokens.qweight is m.lm_head.qweight
    f = load_gguf(path, dequantize=True)
    assert isinstance(f.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(m(torch.tensor([IDS])), f(torch.tensor([IDS])), rtol=1e-4, atol=1e-4)
    k = load_gguf(path)  # "auto": the compiled kernels where they build
    if k.lm_head.backend == "kernel":
        # tied: one copy of the bytes, the lm_head's tile layout; the embedding reads its rows from it
        stored = [b.data_ptr() for mod in (k.model.embed_tokens, k.lm_head) for b in mod.buffers(recurse=False)]
        assert len(stored) == 1 and torch.equal(k.model.embed_tokens.qweight, m.lm_head.qweight)
        with torch.no_grad():
            a, b = k(torch.tensor([IDS])), f(torch.tensor([IDS]))
        assert ((a - b).abs().max() / b.abs().max()).item() < 3e-2  # 8-bit activations


# ----- llama architecture: split q/k/v + gate/up, GQA, q/k rows permuted by the converter ------------------

def write_llama_gguf(model, path, type_name="F32"):
    """A llama-arch GGUF of a pocketlm model, laid out as llama.cpp's LlamaModel converter writes it: every matrix
    in `type_name`, vectors in F32."""
    gguf_helpers.write_llama_gguf(model, path, lambda name, arr: type_name if arr.ndim == 2 else "F32")


@pytest.mark.parametrize("type_name", ["F32", "Q4_0"])
def test_llama_import_undoes_the_permutation(tmp_path, type_name):
    model = pocketlm.load("tiny-gqa", seed=5)  # GQA: 4 heads share 2 KV heads
    path = tmp_path / "llama.gguf"
    write_llama_gguf(model, path, type_name)
    back = load_gguf(path, backend="reference")
    assert back.config.num_key_value_heads == 2 and not back.config.tie_word_embeddings
    ids = torch.tensor([IDS])
    with torch.no_grad():
        ref = model(ids)
        got = back(ids)
    if type_name == "F32":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # bytes were moved, never requantized: equal to quantizing the fused tensors directly
        mem = quantize_model(pocketlm.load("tiny-gqa", seed=5), "q4_0", backend="reference")
        with torch.no_grad():
            torch.testing.assert_close(got, mem(ids), rtol=1e-5, atol=1e-5)


# ----- the CLI verb -----------------------------------------------------------------------------------------

def test_quantize_cli(tmp_path, capsys):
    from pocketlm.cli import main
    from pocketlm.quant.qcheckpoint import is_quantized_checkpoint, load_quantized
    out = tmp_path / "n.gguf"
    assert main(["quantize", "nano", str(out), "--scheme", "q4_0", "--keep-embeddings", "q8_0"]) == 0
    assert "Q4_0 x16" in capsys.readouterr().out
    g = GGUFFile(out)
    assert g.metadata["pocketlm.scheme"] == "q4_0" and g.metadata["pocketlm.keep_embeddings"] == "q8_0"
    assert main(["quantize", "nano", str(out), "--scheme", "q8_0"]) == 2  # exists, no --force
    folder = tmp_path / "st"
    assert main(["quantize", str(out), str(folder), "--scheme", "q4_k", "--format", "safetensors"]) == 0
    assert is_quantized_checkpoint(folder)
    m = load_quantized(folder)
    assert m.model.layers[1].mlp.down_proj.type_name == "Q4_K"
    assert m(torch.tensor([IDS])).shape == (1, len(IDS), 32064)
