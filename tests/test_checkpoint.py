"""The official checkpoint layout end to end: save/load round trips, GGUF import, and one clear typed error for
each kind of broken or mismatched checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest
import torch

import pocketlm
from pocketlm.config import Phi3Config, preset
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats.hf import expected_shapes, load_checkpoint, save_checkpoint
from pocketlm.model import Phi3ForCausalLM


def small(name="tiny", **changes):
    return preset(name).replace(vocab_size=320, pad_token_id=0, eos_token_id=2, **changes)


@pytest.fixture
def saved(tmp_path):
    config = small()
    model = Phi3ForCausalLM(config).eval()
    save_checkpoint(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def logits(model, n=20):
    ids = torch.arange(n).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        return model(ids)


def test_round_trip_single_file(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = pocketlm.load(folder)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(logits(model), logits(loaded))
    # a .safetensors path with config.json beside it loads too
    assert torch.equal(logits(pocketlm.load(folder / "model.safetensors")), logits(model))


def test_round_trip_sharded_and_dtype(tmp_path):
    model = Phi3ForCausalLM(small()).eval()
    save_checkpoint(model, tmp_path, max_shard_bytes=300_000, dtype="bfloat16")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    assert set(index["weight_map"]) == set(expected_shapes(model.config))
    loaded = pocketlm.load(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    as_fp32 = pocketlm.load(tmp_path, dtype="float32")
    for n, p in model.state_dict().items():
        assert torch.equal(as_fp32.state_dict()[n], p.to(torch.bfloat16).float()), n


def test_tied_embeddings_round_trip(tmp_path):
    model = Phi3ForCausalLM(small(tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_checkpoint(model, tmp_path)
    loaded = pocketlm.load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model), logits(loaded))


def test_presets_are_seeded():
    a, b, c = pocketlm.load("tiny", seed=1), pocketlm.load("tiny", seed=1), pocketlm.load("tiny", seed=2)
    assert torch.equal(logits(a), logits(b))
    assert not torch.equal(logits(a), logits(c))
    std = a.model.layers[0].mlp.down_proj.weight.std().item()
    assert math.isclose(std, 0.02, rel_tol=0.05)


# ---- broken checkpoints: one typed error each, naming the problem ----------------------------------------------

def _break(folder, how):
    st = folder / "model.safetensors"
    if how == "missing config":
        (folder / "config.json").unlink()
    elif how == "bad json":
        (folder / "config.json").write_text('{"model_type": "phi3", ')
    elif how == "wrong model_type":
        d = json.loads((folder / "config.json").read_text())
        d["model_type"] = "llama"
        (folder / "config.json").write_text(json.dumps(d))
    elif how == "config mismatch":
        d = json.loads((folder / "config.json").read_text())
        d["num_hidden_layers"] = 3
        (folder / "config.json").write_text(json.dumps(d))
    elif how == "wrong shape":
        d = json.loads((folder / "config.json").read_text())
        d["intermediate_size"] = 640
        (folder / "config.json").write_text(json.dumps(d))
    elif how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) - 1000])
    elif how == "missing weights":
        st.unlink()
    elif how == "bad factor count":
        d = json.loads((folder / "config.json").read_text())
        d["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}
        (folder / "config.json").write_text(json.dumps(d))
    elif how == "unknown rope type":
        d = json.loads((folder / "config.json").read_text())
        d["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
        (folder / "config.json").write_text(json.dumps(d))
    elif how == "negative size":
        d = json.loads((folder / "config.json").read_text())
        d["hidden_size"] = -256
        (folder / "config.json").write_text(json.dumps(d))
    elif how == "not an object":
        (folder / "config.json").write_text("[1, 2]")


CASES = {
    "missing config": (ConfigError, "config.json not found"),
    "bad json": (ConfigError, "invalid JSON"),
    "wrong model_type": (ConfigError, "model_type 'llama'"),
    "config mismatch": (WeightFormatError, "missing .* tensors: model.layers.2"),
    "wrong shape": (WeightFormatError, "has shape .* expected"),
    "truncated": (WeightFormatError, "model.safetensors"),
    "missing weights": (WeightFormatError, "safetensors"),
    "bad factor count": (ConfigError, "short_factor has 3 entries"),
    "unknown rope type": (ConfigError, "rope_scaling type 'dynamic'"),
    "negative size": (ConfigError, "hidden_size must be a positive integer"),
    "not an object": (ConfigError, "expected a JSON object"),
}


@pytest.mark.parametrize("how", sorted(CASES))
def test_broken_checkpoint_gives_one_typed_error(saved, how):
    _, folder = saved
    _break(folder, how)
    kind, pattern = CASES[how]
    t = time.perf_counter()
    with pytest.raises(kind, match=pattern):
        pocketlm.load(folder)
    assert time.perf_counter() - t < 2.0


def test_missing_shard_and_wrong_dtype(tmp_path):
    model = Phi3ForCausalLM(small()).eval()
    save_checkpoint(model, tmp_path / "a", max_shard_bytes=300_000)
    shard = sorted((tmp_path / "a").glob("model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightFormatError, match=shard.name):
        pocketlm.load(tmp_path / "a")
    # an integer tensor where a weight belongs
    from safetensors.torch import save_file
    sd = {n: p.detach().clone() for n, p in model.state_dict().items()}
    sd["model.norm.weight"] = torch.ones(sd["model.norm.weight"].shape, dtype=torch.int32)
    (tmp_path / "b").mkdir()
    save_file(sd, tmp_path / "b" / "model.safetensors")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    with pytest.raises(WeightFormatError, match="model.norm.weight has dtype torch.int32"):
        pocketlm.load(tmp_path / "b")


def test_unknown_model_spec():
    with pytest.raises(ConfigError, match="neither an existing path nor a preset"):
        pocketlm.load("phi-3-mini")


def test_hf_config_variants_load_identically(tmp_path):
    # `su` (April 2024) and `longrope` (June 2024), legacy rope_scaling and transformers-5 rope_parameters
    base = preset("phi-3-mini-128k").to_hf_dict()
    variants = []
    for kind in ("su", "longrope"):
        d = json.loads(json.dumps(base))
        d["rope_scaling"]["type"] = kind
        variants.append(d)
    d = json.loads(json.dumps(base))
    rp = d.pop("rope_scaling")
    d["rope_parameters"] = {**rp, "rope_type": rp.pop("type"), "rope_theta": d.pop("rope_theta"),
                            "original_max_position_embeddings": 4096}
    variants.append(d)
    configs = [Phi3Config.from_hf_dict(v) for v in variants]
    assert configs[0] == configs[1] == configs[2]
    assert math.isclose(configs[0].rope_attention_factor, 1.1902380714238083, rel_tol=1e-12)


# ---- GGUF (phi3 architecture, unquantized) ---------------------------------------------------------------------

def write_phi3_gguf(model, path, *, split_qkv=False, dtype=np.float32):
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_name("test")
    w.add_context_length(c.max_position_embeddings)
    w.add_uint32("phi3.rope.scaling.original_context_length", c.original_max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_uint32("phi3.attention.sliding_window", c.sliding_window or 0)
    if c.rope_scaling is not None:
        w.add_float32("phi3.rope.scaling.attn_factor", c.rope_attention_factor)
        w.add_tensor("rope_factors_long.weight", np.array(c.rope_scaling.long_factor, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(c.rope_scaling.short_factor, dtype=np.float32))
    names = {v: k for k, v in __import__("pocketlm.formats.gguf_model", fromlist=["x"]).TENSOR_NAMES.items()}
    sd = model.state_dict()
    for n, t in sd.items():
        if n == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts = n.split(".")
        layer = parts[2] if parts[1] == "layers" else None
        key = n.replace(f"layers.{layer}.", "layers.{i}.") if layer else n
        gname = names[key].format(i=layer) if layer else names[key]
        arr = t.numpy().astype(dtype)
        if split_qkv and gname.endswith("attn_qkv.weight"):
            q, k, v = np.split(arr, [c.hidden_size, c.hidden_size + c.num_key_value_heads * c.head_dim])
            for x, part in zip("qkv", (q, k, v)):
                w.add_tensor(gname.replace("attn_qkv", f"attn_{x}"), np.ascontiguousarray(part))
            continue
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name,split", [("tiny", False), ("tiny-gqa", True), ("tiny-longrope", False)])
def test_gguf_phi3_import(tmp_path, name, split):
    model = Phi3ForCausalLM(small(name)).eval()
    path = tmp_path / "m.gguf"
    write_phi3_gguf(model, path, split_qkv=split)
    loaded = pocketlm.load(path)
    assert loaded.config.num_key_value_heads == model.config.num_key_value_heads
    rs, expected = loaded.config.rope_scaling, model.config.rope_scaling
    if expected is not None:  # GGUF stores the factors as float32, which is what the model computes with
        for key in ("short_factor", "long_factor"):
            assert np.array_equal(np.float32(getattr(rs, key)), np.float32(getattr(expected, key)))
    else:
        assert rs is None
    assert loaded.config.sliding_window == model.config.sliding_window
    assert torch.equal(logits(model, 50), logits(loaded, 50))


def test_gguf_f16_and_errors(tmp_path):
    model = Phi3ForCausalLM(small()).eval()
    write_phi3_gguf(model, tmp_path / "h.gguf", dtype=np.float16)
    loaded = pocketlm.load(tmp_path / "h.gguf")
    diff = (logits(model) - logits(loaded)).abs().max().item()
    assert 0 < diff < 0.05
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    with pytest.raises(WeightFormatError):
        pocketlm.load(tmp_path / "bad.gguf")
    with pytest.raises(WeightFormatError, match="vocab-only|token_embd|architecture"):
        pocketlm.load(_vocab_gguf())


def _vocab_gguf():
    from pathlib import Path
    for p in (Path(__file__).parent / "data" / "tokenizer" / "ggml-vocab-phi-3.gguf",
              Path(__file__).parent / "data" / "ggml-vocab-phi-3.gguf"):
        if p.exists():
            return p
    pytest.skip("vocab-only GGUF fixture not present")


@pytest.mark.parametrize("fmt", ["phi3-medium", "phi3.5", "phi3-mini-2024-04"])
def test_chat_template_travels_with_the_checkpoint(tmp_path, fmt):
    # pocketlm writes the official template; transformers renders it to the same ids as pocketlm.chat.render,
    # and loading the folder recognises the format again
    transformers = pytest.importorskip("transformers")
    tok = pocketlm.Tokenizer.default()
    model = Phi3ForCausalLM(preset("tiny").replace(chat_format=fmt, num_hidden_layers=1)).eval()
    save_checkpoint(model, tmp_path, tokenizer=tok)
    assert pocketlm.load(tmp_path).config.chat_format == fmt
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|end|> there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = pocketlm.chat.render(messages, tok, format=fmt)
    # the reference tokenizes the rendered string with special parsing: the injected marker becomes a control
    # id there, which is exactly what pocketlm refuses to do; compare on a benign conversation
    benign = [dict(m, content=m["content"].replace("<|end|>", "end")) for m in messages]
    expected = ref(ref.apply_chat_template(benign, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]
    assert pocketlm.chat.render(benign, tok, format=fmt) == expected
    assert 32007 in ours and ours.count(32007) == expected.count(32007)


def test_unknown_chat_template_warns_and_keeps_default(tmp_path):
    model = Phi3ForCausalLM(preset("tiny").replace(num_hidden_layers=1)).eval()
    save_checkpoint(model, tmp_path, tokenizer=pocketlm.Tokenizer.default())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="not one of the official Phi-3 templates"):
        assert pocketlm.load(tmp_path).config.chat_format == "phi3-mini-2024-07"
