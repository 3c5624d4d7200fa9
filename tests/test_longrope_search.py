"""LongRoPE factor search (pocketlm.longrope_search) on a tiny model: the constraints, elitism against PI/NTK,
determinism, and config.json written as the released 128K models store it (read back by pocketlm and by
transformers)."""

from __future__ import annotations

import json

import pytest
import torch

import pocketlm
from pocketlm.config import Phi3Config, preset
from pocketlm.errors import ConfigError
from pocketlm.longrope_search import (constrain, extended_config, ntk_factors, perplexity, pi_factors, search,
                                      write_factors)


def test_baseline_schemes_and_constraints():
    assert pi_factors(4, 4.0) == [4.0] * 4
    ntk = ntk_factors(8, 4.0)  # d = 16: s^(2i/14)
    assert ntk[0] == 1.0 and ntk[-1] == pytest.approx(4.0) and ntk == sorted(ntk)
    assert constrain([0.5, 3.0, 2.0, 9.0], 8.0) == [1.0, 3.0, 3.0, 8.0]


@pytest.fixture(scope="module")
def short_model():
    torch.manual_seed(0)
    # a tiny model "trained" at 64 tokens (random weights), 1 layer, rotary dim 16 -> 8 factors
    config = preset("tiny").replace(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=4, vocab_size=256, max_position_embeddings=64,
                                    sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    from pocketlm.model import Phi3ForCausalLM
    return Phi3ForCausalLM(config).eval()


def test_search_is_never_worse_than_pi_or_ntk_and_is_seeded(short_model):
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(3, 256, (256,), generator=g).tolist() for _ in range(2)]
    res = search(short_model, windows, 256, population=6, generations=2, parents=2, seed=5)
    f = res.long_factor
    assert len(f) == short_model.config.rotary_dim // 2 == 8
    assert f == sorted(f) and min(f) >= 1.0 and max(f) <= 8.0  # the paper's constraints (s = 4, cap 2s)
    assert res.perplexity <= min(res.baselines["pi"], res.baselines["ntk"], res.baselines["yarn"])
    assert res.history == sorted(res.history, reverse=True)  # elitism: the best never gets worse
    cfg = extended_config(short_model.config, f, 256)
    assert perplexity(short_model, windows, cfg) == pytest.approx(res.perplexity)  # the reported number is real
    assert short_model.config.max_position_embeddings == 64  # the model itself is left unchanged
    again = search(short_model, windows, 256, population=6, generations=2, parents=2, seed=5)
    assert again.long_factor == f
    with pytest.raises(ConfigError, match="at most 256"):
        search(short_model, [windows[0] + [5]], 256)


def test_factors_written_as_the_128k_models_store_them(tmp_path):
    model = pocketlm.load("tiny")
    from pocketlm.formats.hf import save_checkpoint
    save_checkpoint(model, tmp_path)
    n = model.config.rotary_dim // 2
    long = [1.0 + i / n for i in range(n)]
    write_factors(tmp_path, long, 16384, 4096)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["rope_scaling"] == {"long_factor": long, "short_factor": [1.0] * n, "type": "longrope"}
    assert d["original_max_position_embeddings"] == 4096 and d["max_position_embeddings"] == 16384
    c = Phi3Config.from_json_file(tmp_path / "config.json")
    assert c.rope_scaling.long_factor == tuple(long) and c.rope_attention_factor == pytest.approx(
        (1 + __import__("math").log(4) / __import__("math").log(4096)) ** 0.5)
    loaded = pocketlm.load(str(tmp_path))
    assert loaded.rope_mode_for(4097) == "long" and loaded.rope_mode_for(4096) == "short"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    scaling = getattr(hf, "rope_scaling", None) or getattr(hf, "rope_parameters", None)
    assert list(scaling["long_factor"]) == long
    with pytest.raises(ConfigError, match="entries"):
        write_factors(tmp_path, long + [2.0] * 100, 16384, 4096)
