"""Declared model sizes are checked against the files before anything is built (issue 23, "Model files").

A 2.4 KB GGUF with `phi3.block_count = 10**12`, or a config.json with `num_hidden_layers: 10**12`, used to
allocate until MemoryError; `embedding_length = 2**40` gave an untyped RuntimeError. Every malicious file here
must give the one typed error (WeightFormatError for weight files, ConfigError for config.json) naming the bad
key and value, within 1 s and with under 50 MB of resident-memory growth. The real presets must still pass.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import flip_bytes, run_mutation_fuzz

import pocketlm
from pocketlm.config import PRESETS, Phi3Config, preset
from pocketlm.errors import ConfigError, WeightFormatError
from pocketlm.formats.gguf import GGML_TYPE_IDS, GGML_TYPES, GGUFValueType as V
from pocketlm.formats.gguf_model import gguf_config
from pocketlm.formats.hf import empty_model, expected_shapes, init_weights, save_checkpoint
from pocketlm.formats.safetensors_io import CheckpointReader
from pocketlm.formats.gguf_model import load_gguf
from pocketlm.quant.gguf_writer import GGUFWriter

MAX_SECONDS = 1.0
MAX_RSS_GROWTH = 50 * 2**20


# ----- measuring: typed error, time, resident memory ---------------------------------------------------------------

class _Overtime(Exception):
    pass


def _rss() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _on_alarm(signum, frame):
    raise _Overtime()


def assert_fast_typed_error(fn, kind: type[Exception], *patterns: str) -> str:
    """Run fn under a 1 s alarm while a thread samples RSS: it must raise `kind`, with every pattern in the
    message, in < 1 s, with < 50 MB of RSS growth. Returns the message."""
    start = _rss()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        fn()
    except _Overtime:
        pytest.fail(f"still running after {MAX_SECONDS} s (RSS +{(peak[0] - start) / 2**20:.0f} MB)")
    except kind as e:
        error = e
    except BaseException as e:  # noqa: BLE001 - the untyped error is the bug under test
        pytest.fail(f"expected {kind.__name__}, got {type(e).__name__}: {e}")
    else:
        pytest.fail(f"expected {kind.__name__}, nothing was raised")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss())
    message = str(error)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    assert elapsed < MAX_SECONDS, elapsed
    assert peak[0] - start < MAX_RSS_GROWTH, f"RSS grew by {(peak[0] - start) / 2**20:.1f} MB"
    return message


# ----- a tiny phi3 / llama GGUF ------------------------------------------------------------------------------------

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV, CTX = 32, 16, 32, 2, 2, 2, 64


def tiny_tensors(arch: str, *, rope_factors: int | None = None) -> dict[str, np.ndarray]:
    """The tensors of a 2-layer model (hidden 16, 2 heads of 8), as llama.cpp's converters name them."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    hd = HIDDEN // HEADS
    t = {"token_embd.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = np.ones(HIDDEN, np.float32)
        if arch == "phi3":
            t[b + "attn_qkv.weight"] = w((HEADS + 2 * KV) * hd, HIDDEN)
        else:
            t[b + "attn_q.weight"], t[b + "attn_k.weight"] = w(HEADS * hd, HIDDEN), w(KV * hd, HIDDEN)
            t[b + "attn_v.weight"] = w(KV * hd, HIDDEN)
        t[b + "attn_output.weight"] = w(HIDDEN, HIDDEN)
        t[b + "ffn_norm.weight"] = np.ones(HIDDEN, np.float32)
        if arch == "phi3":
            t[b + "ffn_up.weight"] = w(2 * FFN, HIDDEN)
        else:
            t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"] = w(FFN, HIDDEN), w(FFN, HIDDEN)
        t[b + "ffn_down.weight"] = w(HIDDEN, FFN)
    t["output_norm.weight"] = np.ones(HIDDEN, np.float32)
    t["output.weight"] = w(VOCAB, HIDDEN)
    if rope_factors is not None:
        t["rope_factors_long.weight"] = np.linspace(1, 4, rope_factors, dtype=np.float32)
        t["rope_factors_short.weight"] = np.ones(rope_factors, np.float32)
    return t


def tiny_gguf(path: Path, arch: str = "phi3", *, meta: dict | None = None, drop: tuple[str, ...] = (),
              tensors: dict[str, np.ndarray] | None = None, rope_factors: int | None = None) -> Path:
    """Write a tiny model GGUF. meta: key ("{a}." = the architecture prefix) -> (value, GGUFValueType), or None
    to leave the key out; tensors: replace or add tensors; drop: tensor names to leave out."""
    base = {"{a}.context_length": (CTX, V.UINT32), "{a}.embedding_length": (HIDDEN, V.UINT32),
            "{a}.feed_forward_length": (FFN, V.UINT32), "{a}.block_count": (LAYERS, V.UINT32),
            "{a}.attention.head_count": (HEADS, V.UINT32), "{a}.attention.head_count_kv": (KV, V.UINT32),
            "{a}.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
            "{a}.rope.dimension_count": (HIDDEN // HEADS, V.UINT32), "{a}.rope.freq_base": (10000.0, V.FLOAT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32)}
    base.update(meta or {})
    w = GGUFWriter(path)
    w.add_string("general.architecture", arch)
    for key, spec in base.items():
        if spec is None:
            continue
        value, vtype = spec
        if vtype == V.ARRAY:
            w.add_array(key.format(a=arch), value[0], value[1])
        else:
            w.add(key.format(a=arch), value, vtype)
    t = {k: v for k, v in {**tiny_tensors(arch, rope_factors=rope_factors), **(tensors or {})}.items()
         if k not in drop}
    for name, arr in t.items():
        w.add_tensor_info(name, arr.shape, "F32")
    w.write(t)
    return path


# the three ways a GGUF reaches the loader: the model loader, `pocketlm info` (config only), `pocketlm.load`
GGUF_LOADERS = {"load_gguf": load_gguf, "gguf_config": gguf_config, "pocketlm.load": pocketlm.load}


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_tiny_gguf_loads(tmp_path, arch):
    path = tiny_gguf(tmp_path / "ok.gguf", arch)
    model = load_gguf(path)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.intermediate_size) == (LAYERS, HIDDEN, VOCAB, FFN)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)


BIG = 10**12
# name -> (tiny_gguf keyword arguments, substrings the message must hold)
GGUF_CASES = {
    "block_count 10**12": (dict(meta={"{a}.block_count": (BIG, V.UINT64)}), ["block_count = 1000000000000"]),
    "block_count 2**64-1": (dict(meta={"{a}.block_count": (2**64 - 1, V.UINT64)}), ["block_count = 1844674"]),
    "block_count 4000": (dict(meta={"{a}.block_count": (4000, V.UINT32)}),
                         ["block_count = 4000, but the file holds tensors for 2 layers (indices 0-1)"]),
    "block_count 3": (dict(meta={"{a}.block_count": (3, V.UINT32)}), ["block_count = 3", "2 layers"]),
    "block_count 1": (dict(meta={"{a}.block_count": (1, V.UINT32)}), ["block_count = 1", "2 layers"]),
    "block_count 0": (dict(meta={"{a}.block_count": (0, V.UINT32)}), ["block_count = 0"]),
    "block_count negative": (dict(meta={"{a}.block_count": (-2, V.INT32)}), ["block_count = -2"]),
    "block_count float": (dict(meta={"{a}.block_count": (2.0, V.FLOAT32)}), ["block_count", "float32"]),
    "block_count string": (dict(meta={"{a}.block_count": ("2", V.STRING)}), ["block_count", "string"]),
    "block_count missing": (dict(meta={"{a}.block_count": None}), ["block_count", "missing"]),
    "embedding_length 2**40": (dict(meta={"{a}.embedding_length": (2**40, V.UINT64)}),
                               ["embedding_length = 1099511627776"]),
    "embedding_length mismatch": (dict(meta={"{a}.embedding_length": (32, V.UINT32)}),
                                  ["embedding_length = 32", "token_embd.weight has shape (32, 16)"]),
    "embedding_length negative": (dict(meta={"{a}.embedding_length": (-16, V.INT64)}), ["embedding_length = -16"]),
    "feed_forward_length mismatch": (dict(meta={"{a}.feed_forward_length": (48, V.UINT32)}),
                                     ["ffn_down.weight has shape (16, 32), expected (16, 48)"]),
    "feed_forward_length 2**40": (dict(meta={"{a}.feed_forward_length": (2**40, V.UINT64)}),
                                  ["feed_forward_length = 1099511627776"]),
    "head_count 0": (dict(meta={"{a}.attention.head_count": (0, V.UINT32)}), ["head_count = 0"]),
    "head_count negative": (dict(meta={"{a}.attention.head_count": (-4, V.INT32)}), ["head_count = -4"]),
    "head_count not dividing": (dict(meta={"{a}.attention.head_count": (3, V.UINT32)}),
                                ["embedding_length = 16 is not divisible by", "head_count = 3"]),
    "head_count too many": (dict(meta={"{a}.attention.head_count": (2**31, V.UINT32)}), ["head_count = 2147483648"]),
    "head_count_kv 0": (dict(meta={"{a}.attention.head_count_kv": (0, V.UINT32)}), ["head_count_kv = 0"]),
    "head_count_kv not dividing": (dict(meta={"{a}.attention.head_count_kv": (3, V.UINT32)}),
                                   ["head_count = 2 is not a multiple of", "head_count_kv = 3"]),
    "head_count_kv vs tensors": (dict(meta={"{a}.attention.head_count_kv": (1, V.UINT32)}), ["expected"]),
    "context_length 2**40": (dict(meta={"{a}.context_length": (2**40, V.UINT64)}), ["context_length = 1099511627776"]),
    "context_length 0": (dict(meta={"{a}.context_length": (0, V.UINT32)}), ["context_length = 0"]),
    "key_length": (dict(meta={"{a}.attention.key_length": (4, V.UINT32)}), ["key_length = 4"]),
    "rope dims odd": (dict(meta={"{a}.rope.dimension_count": (3, V.UINT32)}), ["rope.dimension_count = 3"]),
    "rope dims past head": (dict(meta={"{a}.rope.dimension_count": (2**40, V.UINT64)}), ["rope.dimension_count"]),
    "vocab_size key mismatch": (dict(meta={"{a}.vocab_size": (40, V.UINT32)}),
                                ["vocab_size = 40", "token_embd.weight has 32 rows"]),
    "more tokens than rows": (dict(meta={"tokenizer.ggml.tokens": ((["x"] * 40, V.STRING), V.ARRAY)}),
                              ["tokenizer.ggml.tokens has 40 entries", "only 32 rows"]),
    "missing layer tensor": (dict(drop=("blk.1.ffn_down.weight",)), ["blk.1.ffn_down.weight is missing"]),
    "missing whole layer": (dict(drop=tuple(n for n in tiny_tensors("llama") if n.startswith("blk.1."))
                                 + ("blk.1.attn_qkv.weight",)),
                            ["block_count = 2, but the file holds tensors for 1 layers (indices 0)"]),
    "layer past block_count": (dict(tensors={"blk.7.attn_norm.weight": np.ones(16, np.float32)}),
                               ["block_count = 2", "indices 0-1, 7"]),
    "layer name not a number": (dict(tensors={"blk.x.attn_norm.weight": np.ones(16, np.float32)}),
                                ["'blk.x.attn_norm.weight' does not name a layer"]),
    "token_embd missing": (dict(drop=("token_embd.weight",)), ["token_embd.weight", "missing"]),
    "token_embd 1-D": (dict(tensors={"token_embd.weight": np.ones(16, np.float32)}),
                       ["token_embd.weight has shape (16,)"]),
    "token_embd 3-D": (dict(tensors={"token_embd.weight": np.ones((2, 32, 16), np.float32)}),
                       ["token_embd.weight has shape (2, 32, 16)"]),
    "output rows": (dict(tensors={"output.weight": np.ones((40, 16), np.float32)}),
                    ["output.weight has shape (40, 16), expected (32, 16)"]),
    "norm shape": (dict(tensors={"blk.0.attn_norm.weight": np.ones((16, 2), np.float32)}),
                   ["blk.0.attn_norm.weight has shape (16, 2), expected (16,)"]),
}
PHI3_ONLY = {
    "rope factors huge": (dict(rope_factors=1 << 15), ["rope_factors_long.weight has shape (32768,), expected (4,)"]),
    "rope factor alone": (dict(tensors={"rope_factors_long.weight": np.ones(4, np.float32)}),
                          ["rope_factors_short.weight is missing"]),
    "rope factors zero": (dict(tensors={"rope_factors_long.weight": np.zeros(4, np.float32),
                                        "rope_factors_short.weight": np.ones(4, np.float32)}),
                          ["long_factor must hold positive finite numbers"]),
}


@pytest.mark.parametrize("loader", sorted(GGUF_LOADERS))
@pytest.mark.parametrize("arch,case", [(a, c) for a in ("phi3", "llama") for c in GGUF_CASES]
                         + [("phi3", c) for c in PHI3_ONLY])
def test_malicious_gguf_is_one_fast_weight_format_error(tmp_path, arch, case, loader):
    kwargs, patterns = {**GGUF_CASES, **PHI3_ONLY}[case]
    path = tiny_gguf(tmp_path / "bad.gguf", arch, **kwargs)
    assert path.stat().st_size < 512 * 1024
    patterns = [p.replace("{a}", arch) for p in patterns]
    assert_fast_typed_error(lambda: GGUF_LOADERS[loader](path), WeightFormatError, *patterns)


def test_gguf_error_names_the_architecture_key(tmp_path):
    path = tiny_gguf(tmp_path / "b.gguf", "phi3", meta={"{a}.block_count": (BIG, V.UINT64)})
    message = assert_fast_typed_error(lambda: load_gguf(path), WeightFormatError)
    assert "phi3.block_count = 1000000000000 is outside [1, 4096]" in message and str(path) in message


# ----- GGUF header counts against the file size --------------------------------------------------------------------

def _u64(x):
    return struct.pack("<Q", x)


def _gstr(s: str) -> bytes:
    return _u64(len(s.encode())) + s.encode()


@pytest.mark.parametrize("what,body", [
    ("tensor count", b"GGUF" + struct.pack("<I", 3) + _u64(2**40) + _u64(0)),
    ("kv count", b"GGUF" + struct.pack("<I", 3) + _u64(0) + _u64(2**40)),
    ("string length", b"GGUF" + struct.pack("<I", 3) + _u64(0) + _u64(1) + _u64(2**40) + b"k" * 32),
    ("array length", b"GGUF" + struct.pack("<I", 3) + _u64(0) + _u64(1) + _gstr("a") + struct.pack("<II", 9, 8)
     + _u64(2**40) + b"\0" * 32),
    ("tensor dims", b"GGUF" + struct.pack("<I", 3) + _u64(1) + _u64(0) + _gstr("t") + struct.pack("<I", 2)
     + _u64(2**40) + _u64(2**40) + struct.pack("<I", 0) + _u64(0) + b"\0" * 64),
])
def test_gguf_header_counts_must_fit_the_file(tmp_path, what, body):
    path = tmp_path / "h.gguf"
    path.write_bytes(body)
    assert_fast_typed_error(lambda: gguf_config(path), WeightFormatError)


# ----- HF folder: config.json bounds and the cross-check against the safetensors headers ----------------------------

TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=CTX,
            original_max_position_embeddings=CTX, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            torch_dtype="float32")


@pytest.fixture(scope="module")
def tiny_model():
    return init_weights(empty_model(Phi3Config(**TINY), torch.float32), seed=0)


@pytest.fixture
def folder(tmp_path, tiny_model):
    return save_checkpoint(tiny_model, tmp_path / "ckpt")


def edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def test_tiny_checkpoint_loads(folder):
    model = pocketlm.load(folder)
    assert model.config.num_hidden_layers == LAYERS and model.config.hidden_size == HIDDEN


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings")
CONFIG_CASES = {
    "num_hidden_layers 10**12": ({"num_hidden_layers": BIG}, ["num_hidden_layers = 1000000000000 exceeds"]),
    "hidden_size 2**40": ({"hidden_size": 2**40}, ["hidden_size = 1099511627776 exceeds"]),
    "vocab_size 2**40": ({"vocab_size": 2**40}, ["vocab_size = 1099511627776 exceeds"]),
    "intermediate_size 10**15": ({"intermediate_size": 10**15}, ["intermediate_size = 1000000000000000 exceeds"]),
    "max_position_embeddings 2**62": ({"max_position_embeddings": 2**62}, ["max_position_embeddings = "]),
    "heads 2**40": ({"num_attention_heads": 2**40}, ["num_attention_heads = 1099511627776 exceeds"]),
    "kv heads 0": ({"num_key_value_heads": 0}, ["num_key_value_heads must be a positive integer, got 0"]),
    "kv heads not dividing": ({"num_key_value_heads": 3}, ["not a multiple of num_key_value_heads 3"]),
    "heads not dividing": ({"num_attention_heads": 3, "num_key_value_heads": 3}, ["not divisible"]),
    "too many parameters": ({"hidden_size": 1 << 16, "num_attention_heads": 128, "num_key_value_heads": 128,
                             "intermediate_size": 1 << 20, "num_hidden_layers": 4096},
                            ["parameters, more than the limit"]),
    "sliding_window huge": ({"sliding_window": 2**70}, ["sliding_window must be a positive integer"]),
    "sliding_window float": ({"sliding_window": 20.5}, ["sliding_window must be int"]),
    "rope_theta string": ({"rope_theta": "10000"}, ["rope_theta must be a number"]),
    "rope_theta huge int": ({"rope_theta": 10**400}, ["rope_theta"]),
    "partial_rotary inf": ({"partial_rotary_factor": 1e308 * 10}, ["partial_rotary_factor"]),
    "partial_rotary nan": ({"partial_rotary_factor": float("nan")}, ["partial_rotary_factor"]),
    "eos string": ({"eos_token_id": "2"}, ["eos_token_id"]),
    "eos negative in list": ({"eos_token_id": [2, -1]}, ["eos_token_id"]),
    "original float": ({"original_max_position_embeddings": 64.5}, ["original_max_position_embeddings must be int"]),
    "rope factors wrong count": ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3,
                                                   "long_factor": [1.0] * 3}}, ["short_factor has 3 entries"]),
    "rope factors huge list": ({"rope_scaling": {"type": "longrope", "short_factor": [1] * 40000,
                                                 "long_factor": [1] * 4}}, ["short_factor has 40000 entries"]),
    "initializer_range nan": ({"initializer_range": float("nan")}, ["initializer_range"]),
}
for _key in SIZE_FIELDS:
    CONFIG_CASES[f"{_key} negative"] = ({_key: -8}, [f"{_key} must be a positive integer, got -8"])
    CONFIG_CASES[f"{_key} float"] = ({_key: 16.0}, [f"{_key} must be int, got 16.0"])
    CONFIG_CASES[f"{_key} string"] = ({_key: "16"}, [f"{_key} must be int, got '16'"])
    CONFIG_CASES[f"{_key} bool"] = ({_key: True}, [f"{_key} must be int, got True"])


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malicious_config_json_is_one_fast_config_error(folder, case):
    changes, patterns = CONFIG_CASES[case]
    edit_config(folder, **changes)
    message = assert_fast_typed_error(lambda: pocketlm.load(folder), ConfigError, *patterns)
    assert "config.json" in message


@pytest.mark.parametrize("text,pattern", [
    ('{"model_type": "phi3", "num_hidden_layers": ' + "9" * 5000 + "}", "invalid JSON"),
    ('{"model_type": "phi3", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("{" + " " * (2 << 20) + "}", "more than the limit"),
])
def test_hostile_config_json_text(folder, text, pattern):
    from pocketlm.config import MAX_CONFIG_JSON_BYTES
    assert MAX_CONFIG_JSON_BYTES < 2 << 20
    (folder / "config.json").write_text(text)
    assert_fast_typed_error(lambda: pocketlm.load(folder), ConfigError, pattern)


def test_null_kv_heads_means_multi_head_attention(folder):
    """transformers reads `num_key_value_heads: null` as num_attention_heads; 0 is an error, not a default."""
    edit_config(folder, num_key_value_heads=None)
    assert pocketlm.load(folder).config.num_key_value_heads == HEADS


MISMATCH_CASES = {
    "more layers than files": ({"num_hidden_layers": 3},
                               ["num_hidden_layers = 3, but the files hold layers 0-1", "missing 6 tensors",
                                "model.layers.2."]),
    "4000 layers": ({"num_hidden_layers": 4000}, ["num_hidden_layers = 4000, but the files hold layers 0-1",
                                                  "parameters, the files hold"]),
    "fewer layers than files": ({"num_hidden_layers": 1}, ["num_hidden_layers = 1, but the files hold layers 0-1",
                                                           "unexpected 6 tensors"]),
    "hidden_size": ({"hidden_size": 32}, ["hidden_size = 32", "model.embed_tokens.weight has shape (32, 16)"]),
    "vocab_size": ({"vocab_size": 64}, ["vocab_size = 64", "model.embed_tokens.weight has shape (32, 16)"]),
    "intermediate_size": ({"intermediate_size": 64}, ["the config implies", "parameters, the files hold",
                                                      "mlp.down_proj.weight has shape (16, 32), expected (16, 64)"]),
    "kv heads": ({"num_key_value_heads": 1}, ["qkv_proj.weight has shape (48, 16), expected (32, 16)"]),
}


@pytest.mark.parametrize("case", sorted(MISMATCH_CASES))
def test_config_not_matching_the_files_is_one_fast_weight_format_error(folder, case):
    changes, patterns = MISMATCH_CASES[case]
    edit_config(folder, **changes)
    assert_fast_typed_error(lambda: pocketlm.load(folder), WeightFormatError, "does not match config.json",
                            *patterns)


def test_missing_layer_tensors(tmp_path, tiny_model):
    from pocketlm.formats.safetensors_io import write_checkpoint
    folder = save_checkpoint(tiny_model, tmp_path / "a")
    params = dict(tiny_model.named_parameters())
    keep = [n for n in expected_shapes(tiny_model.config) if n != "model.layers.1.mlp.down_proj.weight"]
    write_checkpoint(folder, ((n, params[n].detach()) for n in keep))
    assert_fast_typed_error(lambda: pocketlm.load(folder), WeightFormatError,
                            "missing 1 tensors: model.layers.1.mlp.down_proj.weight")
    layer0 = [n for n in keep if not n.startswith("model.layers.1.")]
    write_checkpoint(folder, ((n, params[n].detach()) for n in layer0))
    assert_fast_typed_error(lambda: pocketlm.load(folder), WeightFormatError,
                            "num_hidden_layers = 2, but the files hold layers 0;")


def test_config_dict_fuzz_only_config_error():
    """Random size fields set to hostile values: Phi3Config.from_hf_dict raises only ConfigError, quickly."""
    rng = random.Random(23)
    base = Phi3Config(**TINY).to_hf_dict()
    fields = list(SIZE_FIELDS) + ["rope_theta", "rms_norm_eps", "sliding_window", "partial_rotary_factor",
                                  "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
                                  "tie_word_embeddings", "rope_scaling", "torch_dtype"]
    hostile = [0, -1, 1, 3, 2**31, 2**63, BIG, 10**400, 0.5, -0.0, float("inf"), float("nan"), 1e308, "", "16",
               None, True, [], [1, 2], {}, {"type": "longrope"}, {"type": "su", "short_factor": [1] * 4,
                                                                  "long_factor": ["x"] * 4}]
    outcomes = {"ok": 0, "ConfigError": 0}
    t0 = time.perf_counter()
    for _ in range(3000):
        d = dict(base)
        for key in rng.sample(fields, rng.randint(1, 3)):
            d[key] = rng.choice(hostile)
        try:
            Phi3Config.from_hf_dict(d)
            outcomes["ok"] += 1
        except ConfigError:
            outcomes["ConfigError"] += 1
    assert time.perf_counter() - t0 < 10
    assert outcomes["ConfigError"] > 2000 and outcomes["ok"] > 0, outcomes


# ----- mutation fuzz of the whole GGUF model loader (tests/fuzzing.py) ----------------------------------------------

EXTREMES = [(0, 4), (0xFFFFFFFF, 4), (0, 8), (2**63 - 1, 8), (2**64 - 1, 8), (0x7FFFFFFF, 4), (1, 8), (2**40, 8)]


def test_mutation_fuzz_of_the_model_loader(tmp_path):
    """Byte-level mutations of a tiny phi3 / llama GGUF (metadata values hit most often: the header is small),
    loaded all the way to a model: only WeightFormatError, every case under 1 s."""
    seeds = [tiny_gguf(tmp_path / f"{a}.gguf", a).read_bytes() for a in ("phi3", "llama")]
    load_gguf(tmp_path / "phi3.gguf")  # the first model built in a process pays torch's lazy imports (> 1 s)

    def mutate(rng):
        data = rng.choice(seeds)
        header = data[:data.index(b"token_embd.weight") + 64]  # metadata and the first tensor infos
        return flip_bytes(header, rng, EXTREMES) + data[len(header):]

    case, outcomes = run_mutation_fuzz("gguf model", tmp_path / "fuzz.gguf", mutate,
                                       lambda path, data: load_gguf(path), WeightFormatError, default_seconds=6)
    assert case > 100 and outcomes["WeightFormatError"] > 0


# ----- the real presets still pass (sparse files: headers with the real shapes, no real data) -----------------------

REAL_PRESETS = [n for n in PRESETS if preset(n).num_parameters() > 1e9]
# the ones with llama.cpp's `phi3` GGUF layout (phi-3.5-MoE is `phimoe`: tests/test_moe_gguf.py; phi-3-small has
# no llama.cpp architecture)
PHI3_GGUF_PRESETS = [n for n in REAL_PRESETS if preset(n).model_type == "phi3" and not preset(n).is_moe]


def test_real_presets_are_listed():
    assert {"phi-3-mini-4k", "phi-3-mini-128k", "phi-3-medium-4k", "phi-3-medium-128k", "phi-3.5-mini"} <= \
        set(REAL_PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_passes_config_validation(tmp_path, name):
    c = preset(name)
    c.save_json(tmp_path / "config.json")
    back = Phi3Config.from_json_file(tmp_path / "config.json")
    assert back.replace(chat_format=c.chat_format, name=c.name) == c


def sparse_gguf(path: Path, c: Phi3Config, block_count: int | None = None) -> Path:
    """A phi3 GGUF with the preset's real metadata and tensor shapes (Q4_0 weights, F32 norms): the header and
    the rope factors are written, the rest of the data section is a hole (no disk, no memory). block_count:
    declare this many layers instead of the config's."""
    from pocketlm.formats.gguf_model import TENSOR_NAMES
    gnames = {v: k for k, v in TENSOR_NAMES.items()}
    kvs = [("general.architecture", V.STRING, "phi3"), ("phi3.context_length", V.UINT32, c.max_position_embeddings),
           ("phi3.rope.scaling.original_context_length", V.UINT32, c.original_max_position_embeddings),
           ("phi3.embedding_length", V.UINT32, c.hidden_size), ("phi3.feed_forward_length", V.UINT32,
                                                                c.intermediate_size),
           ("phi3.block_count", V.UINT32, block_count or c.num_hidden_layers), ("phi3.attention.head_count", V.UINT32,
                                                                 c.num_attention_heads),
           ("phi3.attention.head_count_kv", V.UINT32, c.num_key_value_heads),
           ("phi3.attention.layer_norm_rms_epsilon", V.FLOAT32, c.rms_norm_eps),
           ("phi3.rope.dimension_count", V.UINT32, c.rotary_dim), ("phi3.rope.freq_base", V.FLOAT32, c.rope_theta),
           ("phi3.attention.sliding_window", V.UINT32, c.sliding_window or 0)]
    tensors: list[tuple[str, tuple, str, bytes | None]] = []
    if c.rope_scaling is not None:
        for key in ("long", "short"):
            arr = np.asarray(getattr(c.rope_scaling, f"{key}_factor"), np.float32)
            tensors.append((f"rope_factors_{key}.weight", arr.shape, "F32", arr.tobytes()))
    for ckpt, shape in expected_shapes(c).items():
        parts = ckpt.split(".")
        key = ".".join(parts[:2] + ["{i}"] + parts[3:]) if parts[1] == "layers" else ckpt
        name = gnames[key].format(i=parts[2]) if parts[1] == "layers" else gnames[key]
        tensors.append((name, shape, "F32" if len(shape) == 1 else "Q4_0", None))
    head = bytearray(b"GGUF" + struct.pack("<I", 3) + _u64(len(tensors)) + _u64(len(kvs)))
    for key, vtype, value in kvs:
        head += _gstr(key) + struct.pack("<I", vtype)
        head += _gstr(value) if vtype == V.STRING else struct.pack("<I" if vtype == V.UINT32 else "<f", value)
    offset = 0
    placed = []
    for name, shape, tname, data in tensors:
        gt = GGML_TYPES[GGML_TYPE_IDS[tname]]
        n_bytes = math.prod(shape) // gt.block_size * gt.type_size
        head += _gstr(name) + struct.pack("<I", len(shape)) + b"".join(_u64(d) for d in reversed(shape))
        head += struct.pack("<I", GGML_TYPE_IDS[tname]) + _u64(offset)
        placed.append((offset, data))
        offset += -(-n_bytes // 32) * 32
    head += b"\0" * (-len(head) % 32)
    with open(path, "wb") as f:
        f.write(head)
        for at, data in placed:
            if data is not None:
                f.seek(len(head) + at)
                f.write(data)
        f.truncate(len(head) + offset)
    return path


@pytest.mark.parametrize("name", PHI3_GGUF_PRESETS)
def test_real_preset_gguf_layout_passes(tmp_path, name):
    c = preset(name)
    path = sparse_gguf(tmp_path / f"{name}.gguf", c)
    t0 = time.perf_counter()
    got, info = gguf_config(path)
    assert time.perf_counter() - t0 < 1.0
    for key in SIZE_FIELDS + ("sliding_window", "tie_word_embeddings"):
        assert getattr(got, key) == getattr(c, key), key
    assert got.num_parameters() == c.num_parameters()
    if c.rope_scaling is not None:
        assert got.rope_scaling.long_factor == pytest.approx(c.rope_scaling.long_factor, rel=1e-6)
    # one layer more declared than the file holds: refused
    off = sparse_gguf(tmp_path / "off.gguf", c, block_count=c.num_hidden_layers + 1)
    assert_fast_typed_error(lambda: gguf_config(off), WeightFormatError,
                            f"phi3.block_count = {c.num_hidden_layers + 1}, but the file holds tensors for "
                            f"{c.num_hidden_layers} layers")


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A bf16 model.safetensors whose header declares `shapes`; the data section is a hole."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_real_preset_checkpoint_headers_pass(tmp_path, name):
    from pocketlm.formats.hf import check_files_match
    c = preset(name)
    c.save_json(tmp_path / "config.json")
    config = Phi3Config.from_json_file(tmp_path / "config.json")
    sparse_safetensors(tmp_path / "model.safetensors", expected_shapes(c))
    with CheckpointReader(tmp_path) as reader:
        assert set(check_files_match(config, reader, tmp_path)) == set(reader.keys())
        more = config.replace(num_hidden_layers=c.num_hidden_layers + 8)
        message = assert_fast_typed_error(lambda: check_files_match(more, reader, tmp_path), WeightFormatError,
                                          f"num_hidden_layers = {c.num_hidden_layers + 8}, but the files hold "
                                          f"layers 0-{c.num_hidden_layers - 1}")
        assert "parameters, the files hold" in message
