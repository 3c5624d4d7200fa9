"""The tiny phi-3.5-MoE preset through `pocketlm info`, `run`, `serve` (OpenAI client) and `eval`."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import torch

import pocketlm
from pocketlm import Tokenizer
from pocketlm.cli import main
from pocketlm.engine.generate import generate_full
from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

DATA = Path(__file__).parent / "data" / "eval"
MSG = [{"role": "user", "content": "Name a colour."}]


def test_info_reports_total_and_active_parameters(capsys):
    assert main(["info", "phi-3.5-moe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "PhimoeForCausalLM"
    assert info["parameters"] == 41_873_153_344 and info["active_parameters"] == 6_640_999_744
    assert info["weights_bytes"]["bfloat16"] == 2 * 41_873_153_344
    assert info["active_weights_bytes"]["bfloat16"] == 2 * 6_640_999_744
    assert "magnitude short 1.243163 / long 1.243163" in info["rope"]
    assert main(["info", "phi-3.5-moe"]) == 0
    text = capsys.readouterr().out
    assert "41.87B" in text and "6.64B" in text and "16 per layer, 2 active" in text


def test_run_serve_eval_tiny_moe(tmp_path, capsys):
    assert main(["run", "tiny-moe", "Hello there", "--max-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = pocketlm.load("tiny-moe"), Tokenizer.default()
        ref = generate_full(model, tok, MSG, max_tokens=12, temperature=0)
        app = create_app(model, tok, ServerConfig(model_name="tiny-moe", max_slots=4, context_length=256))
        with BackgroundServer(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.chat.completions.create(model="tiny-moe", messages=MSG, max_tokens=12, temperature=0)
            assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == ref.completion_tokens
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "eval"
    assert main(["eval", "tiny-moe", "--tasks", "boolq", "--data-dir", str(DATA), "--limit", "2",
                 "--max-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    assert any(out.iterdir())
