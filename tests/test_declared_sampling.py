"""A model file's own repetition penalty (GGUF general.sampling.penalty_repeat, generation_config.json's
repetition_penalty): read on load, written back on export, applied by generate, run, chat, serve and eval where the
caller names none, and never over what the caller (or a store Modelfile) sets."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

import pocketlm
from pocketlm import Tokenizer, cli
from pocketlm.engine.sampling import (GGUF_PENALTY_LAST_N, GGUF_PENALTY_REPEAT, declared_repetition_penalty,
                                      model_repetition_penalty)
from pocketlm.errors import WeightFormatError
from pocketlm.formats.gguf import GGUFFile
from pocketlm.quant.gguf_export import export_gguf

PROMPT = [{"role": "user", "content": "Say something."}]


@pytest.mark.parametrize("value, last_n, expected", [
    (1.2, -1, 1.2), (0.9, -1, 0.9),
    (1.2, 64, None),  # llama.cpp's window of 64 tokens: not pocketlm's penalty, so not applied at all
    (1.2, 0, None),  # penalties off
    (1.0, -1, None), (0.0, -1, None), (-1.1, -1, None), (math.nan, -1, None), (math.inf, -1, None),
    ("1.2", -1, None), (True, -1, None), (None, -1, None),
])
def test_which_declared_values_are_applied(value, last_n, expected):
    assert declared_repetition_penalty(value, last_n) == expected


def _tiny(penalty=None):
    model = pocketlm.load("tiny")
    model.declared_repetition_penalty = penalty
    return model


def test_gguf_round_trip_and_generation_default(tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(_tiny(1.5), path, scheme="q8_0")
    with GGUFFile(path) as g:
        assert g.metadata[GGUF_PENALTY_REPEAT] == pytest.approx(1.5)
        assert g.metadata[GGUF_PENALTY_LAST_N] == -1  # pocketlm's penalty covers the whole context
    export_gguf(_tiny(1.2), tmp_path / "p12.gguf", scheme="q8_0")
    assert pocketlm.load(tmp_path / "p12.gguf").declared_repetition_penalty == 1.2  # not 1.2000000476837158
    model = pocketlm.load(path)
    assert model_repetition_penalty(model) == pytest.approx(1.5)
    tok = Tokenizer.default()
    default = pocketlm.generate(model, tok, PROMPT, max_tokens=24, temperature=0)
    assert default == pocketlm.generate(model, tok, PROMPT, max_tokens=24, temperature=0,
                                        repetition_penalty=model.declared_repetition_penalty)
    off = pocketlm.generate(model, tok, PROMPT, max_tokens=24, temperature=0, repetition_penalty=1.0)
    assert off != default  # random tiny weights loop greedily; the penalty changes the reply
    again = tmp_path / "again.gguf"
    export_gguf(model, again)  # a re-export (convert, quantize) keeps the declaration
    assert model_repetition_penalty(pocketlm.load(again)) == pytest.approx(1.5)
    export_gguf(_tiny(), tmp_path / "none.gguf", scheme="q8_0")
    with GGUFFile(tmp_path / "none.gguf") as g:
        assert GGUF_PENALTY_REPEAT not in g.metadata
    assert model_repetition_penalty(pocketlm.load(tmp_path / "none.gguf")) == 1.0


def test_checkpoint_folder_round_trip(tmp_path):
    from pocketlm.formats.hf import save_checkpoint
    from pocketlm.quant.linear import quantize_model
    from pocketlm.quant.qcheckpoint import save_quantized
    save_checkpoint(_tiny(1.3), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["repetition_penalty"] == 1.3
    assert pocketlm.load(tmp_path / "hf").declared_repetition_penalty == 1.3
    assert pocketlm.load(tmp_path / "hf", quantize="q8_0").declared_repetition_penalty == 1.3
    save_quantized(quantize_model(_tiny(1.3), "q8_0"), tmp_path / "q", scheme="q8_0")
    assert pocketlm.load(tmp_path / "q").declared_repetition_penalty == 1.3
    save_checkpoint(_tiny(), tmp_path / "plain")
    assert "repetition_penalty" not in json.loads((tmp_path / "plain" / "generation_config.json").read_text())
    (tmp_path / "plain" / "generation_config.json").write_text("{not json")
    with pytest.raises(WeightFormatError, match="generation_config.json"):
        pocketlm.load(tmp_path / "plain")


def test_run_applies_and_reports_the_declared_penalty(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    export_gguf(_tiny(1.5), path, scheme="q8_0")
    args = ["run", str(path), "Say something.", "--max-tokens", "24", "-v"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "repetition penalty:   1.5 (the model file's default" in out.err
    assert cli.main(args + ["--repetition-penalty", "1.5"]) == 0
    explicit = capsys.readouterr()
    assert explicit.out == out.out and "the model file's default" not in explicit.err
    assert cli.main(args + ["--repetition-penalty", "1"]) == 0
    assert capsys.readouterr().out != out.out


def test_chat_repl_shows_the_declared_penalty(tmp_path):
    import argparse
    import io

    from pocketlm.chat_repl import ChatREPL
    args = argparse.Namespace(system=None, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None,
                              seed=None, max_tokens=8, stop=[], num_ctx=None, model="m", chat_format=None)
    repl = ChatREPL(_tiny(1.25), Tokenizer.default(), args, stdin=io.StringIO(""), stdout=io.StringIO(),
                    stderr=io.StringIO())
    assert repl.params["repeat_penalty"] == 1.25
    args.repetition_penalty = 1.0
    assert ChatREPL(_tiny(1.25), Tokenizer.default(), args, stdin=io.StringIO(""), stdout=io.StringIO(),
                    stderr=io.StringIO()).params["repeat_penalty"] == 1.0


def test_serve_fills_requests_that_name_no_penalty_below_a_modelfile():
    from pocketlm.serve.app import BackgroundServer, ServerConfig, create_app
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = _tiny(1.5), Tokenizer.default()
        app = create_app(model, tok, ServerConfig(model_name="tiny", max_slots=2, context_length=256))
        body = {"model": "tiny", "messages": PROMPT, "max_tokens": 24, "temperature": 0}
        with BackgroundServer(app) as srv:
            default = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
            explicit = httpx.post(srv.url + "/v1/chat/completions", json=body | {"repetition_penalty": 1.5},
                                  timeout=60).json()
            off = httpx.post(srv.url + "/v1/chat/completions", json=body | {"repetition_penalty": 1.0},
                             timeout=60).json()
            show = httpx.post(srv.url + "/api/show", json={"model": "tiny"}, timeout=60).json()
        text = [r["choices"][0]["message"]["content"] for r in (default, explicit, off)]
        assert text[0] == text[1] == pocketlm.generate(model, tok, PROMPT, max_tokens=24, temperature=0)
        assert text[2] != text[0]
        assert "repeat_penalty" in show["parameters"] and "1.5" in show["parameters"]
        mf = {"parameters": {"repeat_penalty": 1.1, "num_predict": 3}}
        config = ServerConfig(model_name="tiny", max_slots=1, context_length=256, modelfile=mf)
        with BackgroundServer(create_app(model, tok, config)):
            pass
        assert config.modelfile["parameters"] == {"repeat_penalty": 1.1, "num_predict": 3}  # the Modelfile wins
        assert mf == {"parameters": {"repeat_penalty": 1.1, "num_predict": 3}}  # the caller's dict is unchanged
    finally:
        torch.set_num_threads(threads)


def test_eval_backend_decodes_with_the_declared_penalty_and_records_it():
    from pocketlm.eval import simple_qa
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.eval.runner import evaluate
    model, tok = _tiny(1.5), Tokenizer.default()
    backend = PocketLMBackend(model, tok)
    assert backend.repetition_penalty == 1.5
    msgs = [PROMPT]
    assert backend.generate(msgs, max_tokens=24) == [pocketlm.generate(model, tok, PROMPT, max_tokens=24,
                                                                       temperature=0)]
    out = evaluate(backend, [simple_qa.TASK], limit=2, progress=False)
    assert out["config"]["repetition_penalty"] == 1.5
    backend.repetition_penalty = 1.0  # raw greedy, as a bench reports beside it
    assert backend.generate(msgs, max_tokens=24) == [pocketlm.generate(model, tok, PROMPT, max_tokens=24,
                                                                       temperature=0, repetition_penalty=1.0)]
    assert "repetition_penalty" not in evaluate(PocketLMBackend(_tiny(), tok), [simple_qa.TASK], limit=2,
                                                progress=False)["config"]


def test_the_penalty_never_holds_back_the_stop_token():
    # a chat prompt holds its end-of-turn id once per turn: penalized, it loses to the next-best token and the
    # reply runs on (the distilled default at 1.2 ran "Hello, who are you?" to the token limit)
    from pocketlm.engine.generate import _pick
    from pocketlm.engine.sampling import SamplingParams, penalized_ids
    end, other = 5, 9
    logits = torch.zeros(16)
    logits[end], logits[other] = 2.0, 1.8
    params = SamplingParams(temperature=0, repetition_penalty=1.2)
    sequence = [1, 3, end, 4, 7]  # the prompt's first turn ended with `end`
    assert _pick(logits, params, None, sequence, 16, stops=frozenset({end})) == end
    assert _pick(logits, params, None, sequence, 16) == other  # HF's rule: every id of the sequence
    assert penalized_ids(sequence, frozenset({end})) == [1, 3, 4, 7] and penalized_ids(sequence, ()) == sequence
