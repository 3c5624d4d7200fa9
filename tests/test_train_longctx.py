"""`pocketlm train longctx` (pocketlm.train.longctx) on a tiny model: the command end to end writes a folder that
pocketlm and transformers load with the same logits, PI/NTK factors are the hand-computed values, fine-tuning
changes the weights and lowers the long-length loss on its training rows, and sequences up to the original length
run with the short factors (the long factors play no part there)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import pocketlm
from pocketlm.cli import main
from pocketlm.config import RopeScaling, preset
from pocketlm.errors import ConfigError
from pocketlm.train.longctx import method_factors

ORIGINAL, SCALE = 32, 2  # trained at 32 tokens, extended to 64


def test_pi_and_ntk_factors_are_the_closed_forms():
    assert method_factors("pi", 4, 4.0) == [4.0, 4.0, 4.0, 4.0]
    # NTK-aware, d = 8: lambda_i = 4^(2i/6) = 1, 4^(1/3), 4^(2/3), 4  (theta x 4^(8/6) on the base frequencies)
    ntk = method_factors("ntk", 4, 4.0)
    assert ntk == pytest.approx([1.0, 1.5874010519681994, 2.5198420997897464, 4.0], abs=1e-12)
    # equivalently: 1 / (lambda_i theta^(2i/d)) == 1 / ((theta s^(d/(d-2)))^(2i/d))
    theta, d = 10000.0, 8
    for i, f in enumerate(ntk):
        assert 1 / (f * theta ** (2 * i / d)) == pytest.approx(1 / ((theta * 4.0 ** (d / (d - 2))) ** (2 * i / d)))
    with pytest.raises(ConfigError, match="longrope"):
        method_factors("longrope", 4, 4.0)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A tiny random model "trained at 32 tokens", byte-level demo text as shards, and the finished command."""
    from pocketlm.data.shards import write_shards
    from pocketlm.data.synthetic import generate
    from pocketlm.formats import hf
    root = tmp_path_factory.mktemp("longctx")
    config = preset("tiny").replace(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=4, vocab_size=260, max_position_embeddings=ORIGINAL,
                                    original_max_position_embeddings=ORIGINAL, sliding_window=None, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    model = hf.init_weights(hf.empty_model(config, torch.float32), seed=0)
    hf.save_checkpoint(model, root / "short")
    docs, _ = generate(12, seed=3)
    write_shards(root / "text", ([b + 3 for b in d.text.encode("utf-8")] for d in docs), dtype="uint16", eos_id=2)
    argv = ["train", "longctx", "--model", str(root / "short"), "--data", str(root / "text"), "--scale", str(SCALE),
            "--method", "pi", "--tokens", str(64 * 2 * 12), "--batch-size", "2", "--lr", "3e-3", "--num-threads", "1",
            "--no-progress"]
    assert main(argv + ["--run-dir", str(root / "run")]) == 0
    return root, argv


def test_command_writes_a_loadable_extended_folder(short_run, capsys):
    root, argv = short_run
    out = root / "run" / "model"
    d = json.loads((out / "config.json").read_text())
    n = 16 // 2  # tiny's rotary dim 16
    assert d["rope_scaling"]["type"] == "longrope"
    assert d["rope_scaling"]["long_factor"] == [float(SCALE)] * n and d["rope_scaling"]["short_factor"] == [1.0] * n
    assert d["original_max_position_embeddings"] == ORIGINAL and d["max_position_embeddings"] == ORIGINAL * SCALE
    info = json.loads((root / "run" / "factors.json").read_text())
    assert info["method"] == "pi" and info["target"] == 64 and info["heldout_tokens"] == 2 * 64
    model = pocketlm.load(str(out), dtype=torch.float32).eval()
    assert model.rope_mode_for(64) == "long" and model.rope_mode_for(32) == "short"
    # a rerun of the finished command does nothing; another method in the same run directory is refused
    before = (out / "model.safetensors").read_bytes()
    assert main(argv + ["--run-dir", str(root / "run")]) == 0
    assert (out / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main([a if a != "pi" else "ntk" for a in argv] + ["--run-dir", str(root / "run")]) != 0
    assert "prepared for method pi" in capsys.readouterr().err

    transformers = pytest.importorskip("transformers")
    hf_model = transformers.Phi3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    for T in (ORIGINAL, 2 * ORIGINAL):  # the short factors at 32 tokens, the long ones at 64
        x = torch.randint(3, 259, (1, T), generator=g)
        with torch.no_grad():
            ours, theirs = model(x), hf_model(x).logits
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def _loss(model, rows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(rows[:, :-1]).float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()


def test_fine_tuning_changes_weights_and_lowers_long_loss(short_run):
    root, _ = short_run
    start = pocketlm.load(str(root / "run" / "start"), dtype=torch.float32).eval()
    tuned = pocketlm.load(str(root / "run" / "model"), dtype=torch.float32).eval()
    assert start.config.rope_scaling == tuned.config.rope_scaling  # the factors are the searched/chosen ones
    sa, ta = start.state_dict(), tuned.state_dict()
    assert any(not torch.equal(sa[k], ta[k]) for k in sa)
    from pocketlm.data.shards import ShardSet
    ids = ShardSet(root / "run" / "data" / "train").read(0, 4 * 64 + 1)
    rows = torch.from_numpy(np.stack([ids[i * 64:i * 64 + 65] for i in range(4)]))  # (4, 65): 64-token rows
    assert _loss(tuned, rows) < _loss(start, rows) - 0.3


def test_short_lengths_use_the_short_factors(short_run):
    root, _ = short_run
    tuned = pocketlm.load(str(root / "run" / "model"), dtype=torch.float32).eval()
    rs = tuned.config.rope_scaling
    # the same weights with the long factors replaced by the short ones: identical up to the original length
    from pocketlm.model import Phi3ForCausalLM
    alt_cfg = tuned.config.replace(rope_scaling=RopeScaling(short_factor=rs.short_factor,
                                                            long_factor=rs.short_factor))
    alt = Phi3ForCausalLM(alt_cfg).eval()
    alt.load_state_dict(tuned.state_dict())
    x = torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tuned(x[:, :ORIGINAL]), alt(x[:, :ORIGINAL]), atol=0, rtol=0)
        assert not torch.allclose(tuned(x), alt(x), atol=1e-3)  # past it, the long factors are in use
    # the short-factor frequencies are the original ones: inv_freq_short = 1 / theta^(2i/d)
    d = tuned.config.rotary_dim
    expect = torch.tensor([1 / tuned.config.rope_theta ** (2 * i / d) for i in range(d // 2)])
    torch.testing.assert_close(tuned.rotary_emb.inv_freq_short, expect)
    assert tuned.config.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(SCALE) / math.log(ORIGINAL)))


def test_longrope_method_writes_searched_factors(short_run):
    from pocketlm.longrope_search import constrain, pi_factors
    from pocketlm.train.longctx import prepare
    root, _ = short_run
    info = prepare(root / "short", root / "run-lr", root / "text", scale=SCALE, method="longrope", population=3,
                   generations=1, search_windows=1)
    f = info["long_factor"]
    assert f == constrain(f, 2.0 * SCALE) and len(f) == 8  # the paper's search space: >= 1, non-decreasing
    assert info["search_perplexity"] <= min(info["baselines"]["pi"], info["baselines"]["ntk"])
    d = json.loads((root / "run-lr" / "start" / "config.json").read_text())
    assert d["rope_scaling"]["long_factor"] == f and d["rope_scaling"]["short_factor"] == [1.0] * 8
    assert f != pi_factors(8, SCALE) or info["baselines"]["pi"] == info["search_perplexity"]


def test_interrupted_run_resumes_to_the_same_weights(short_run, capsys):
    root, argv = short_run
    run = str(root / "run-resume")
    assert main(argv + ["--run-dir", run, "--save-every", "4", "--max-steps", "5"]) == 0
    assert not (root / "run-resume" / "model").exists()  # stopped at step 5 of 12, checkpoint at step 4
    capsys.readouterr()
    assert main(argv + ["--run-dir", run, "--save-every", "4"]) == 0  # --resume auto (the default)
    assert "resuming from step 4" in capsys.readouterr().err
    a = pocketlm.load(run + "/model", dtype=torch.float32).state_dict()
    b = pocketlm.load(str(root / "run" / "model"), dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
