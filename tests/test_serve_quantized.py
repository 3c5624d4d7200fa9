"""The server serves a quantized model (GGUF Q4_0 with f16 embeddings) exactly as pocketlm.generate runs it."""

from __future__ import annotations

import pytest

import pocketlm

openai = pytest.importorskip("openai")


def test_quantized_gguf_model_is_served(tmp_path):
    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.formats.gguf_model import load_gguf_tokenizer
    from pocketlm.quant.linear import QuantizedLinear
    from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app

    path = tmp_path / "q.gguf"
    export_gguf(pocketlm.load("tiny"), path, tokenizer=pocketlm.Tokenizer.default(), scheme="q4_0",
                keep_embeddings="f16")
    model, tok = pocketlm.load(path), load_gguf_tokenizer(path)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    messages = [{"role": "user", "content": "Hello there"}]
    expected = pocketlm.generate(model, tok, messages, max_tokens=6, temperature=0)
    with BackgroundServer(create_app(model, tok, ServerConfig(model_name="q"))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model="q", messages=messages, max_tokens=6, temperature=0)
        streamed = client.chat.completions.create(model="q", messages=messages, max_tokens=6, temperature=0,
                                                  stream=True)
        chunks = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert reply.choices[0].message.content == expected == chunks
    assert reply.usage.completion_tokens == 6
