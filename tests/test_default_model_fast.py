"""`pocketlm run` with no MODEL runs the embedded default model on the CPU kernels (Q8_0 quantized while loading)
and gives the same greedy reply as the float32 model; --dtype alone still gives the float model; `serve` loads it
by the same rule."""

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
