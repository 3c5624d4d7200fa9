"""Phi-3-small through the user-facing commands on the `tiny-small` preset: run, serve (OpenAI API, batched
choices), eval, train (SFT through the packed forward_batched path) and quantize (safetensors; GGUF refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tiktoken")

import pocketlm  # noqa: E402
from pocketlm.cli import main  # noqa: E402
from pocketlm.formats.hf import save_checkpoint  # noqa: E402
from pocketlm.model_small import Phi3SmallForCausalLM  # noqa: E402
from pocketlm.tokenizer_small import Phi3SmallTokenizer  # noqa: E402

DATA = Path(__file__).parent / "data" / "eval"
# long enough (~70 tokens) that the block-sparse layer's pattern matters: tiny-small sees 2 local blocks of 16
MSG = [{"role": "user", "content": "Name a colour, then a fruit, then an animal, please. " * 5}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small") / "tiny-small"
    model = pocketlm.load("tiny-small", seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger random weights than the initializer's, so that greedy replies vary
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    save_checkpoint(model, folder, tokenizer=Phi3SmallTokenizer.default())
    return folder


def test_run_and_quantize(checkpoint, tmp_path, capsys):
    assert main(["run", str(checkpoint), "Hi", "--max-tokens", "3", "--temperature", "0"]) == 0
    assert main(["quantize", str(checkpoint), str(tmp_path / "q"), "--scheme", "q8_0", "--format", "safetensors"]) == 0
    assert (tmp_path / "q" / "cl100k_base.tiktoken").exists()
    assert main(["run", str(tmp_path / "q"), "Hi", "--max-tokens", "3", "--temperature", "0"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(checkpoint), str(tmp_path / "m.gguf"), "--scheme", "q8_0"]) == 2
    assert "llama.cpp has no architecture for it" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_serve_matches_generate(checkpoint):
    openai = pytest.importorskip("openai")
    from pocketlm.engine.generate import generate_full
    from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app
    model, tok = pocketlm.load(checkpoint), Phi3SmallTokenizer.from_pretrained(checkpoint)
    assert isinstance(model, Phi3SmallForCausalLM)
    ref = generate_full(model, tok, MSG, max_tokens=6, temperature=0, chat_format="phi3-small")
    assert len(set(ref.token_ids)) > 1
    app = create_app(model, tok, ServerConfig(model_name="tiny-small", max_slots=4, context_length=256))
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny-small", messages=MSG, max_tokens=6, temperature=0, n=2)
    assert [c.message.content for c in r.choices] == [ref.text, ref.text]  # two rows decoded as one batch
    assert r.usage.prompt_tokens == ref.prompt_tokens > 64


def test_eval_runs(checkpoint, tmp_path):
    assert main(["eval", str(checkpoint), "--tasks", "arc_easy", "--data-dir", str(DATA), "--limit", "2",
                 "--max-tokens", "4", "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    assert any((tmp_path / "eval").iterdir())


def test_sft_trains_and_exports_the_layout(tmp_path):
    from pocketlm.train.config import apply_overrides, recipe
    from pocketlm.train.loop import train
    path = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
             for w in ("yes", "no", "blue", "red")]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = apply_overrides(recipe("tiny-sft"), ["model=tiny-small", f"sources.chat={path}", "phases.0.steps=4",
                                               "save_every=4", "tensorboard=false", "plot=false", "optim.lr=0.003"])
    records = train(cfg, tmp_path / "run", progress=False)
    assert records[-1]["loss"] < records[0]["loss"]
    out = tmp_path / "run" / "model"
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3small"
    model = pocketlm.load(out)
    assert isinstance(model, Phi3SmallForCausalLM)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[100257, 9906]]))[..., :100256]).all()
