"""The `pocketlm` command: every verb end to end on tiny models, and bad input -> exit 2 with one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import pocketlm
from pocketlm import cli


def run_cli(*args, stdin=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pocketlm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_command_table_in_sync():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == set(cli.COMMANDS)
    for fn in cli.COMMANDS.values():
        assert fn.__doc__, f"{fn.__name__} needs a docstring: it is the --help text"


def test_info_preset_reports_3_82b(capsys):
    assert cli.main(["info", "phi-3-mini-4k"]) == 0
    out = capsys.readouterr().out
    assert "3.82B" in out and "2048 visible keys" in out and "384 KiB/token" in out
    assert cli.main(["info", "phi-3-medium-128k", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_heads"] == 10 and info["context_length"] == 131072
    assert info["rope"].startswith("LongRoPE") and "1.190238" in info["rope"]
    assert cli.main(["info", "--presets"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    from pocketlm.config import PRESETS
    from pocketlm.vision import VISION_PRESETS
    assert listed == set(PRESETS) | set(VISION_PRESETS)  # every preset `load` accepts, the family's members too


def test_convert_and_info_on_folder(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert cli.main(["convert", "tiny", str(out), "--dtype", "bfloat16", "--max-shard-size", "8MB"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names and "config.json" in names
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_dtypes"] == ["bfloat16"] and len(info["files"]) > 1
    a, b = pocketlm.load("tiny", dtype="bfloat16"), pocketlm.load(out)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # refuses to overwrite a non-empty folder
    assert cli.main(["convert", "tiny", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_run_prints_reply_and_stats():
    r = run_cli("run", "tiny", "Hello there", "--max-tokens", "8", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "eval rate:" in r.stderr and "prompt eval rate:" in r.stderr
    assert "eval count:           8 token(s)" in r.stderr or "finish reason:        stop" in r.stderr
    # greedy is deterministic
    r2 = run_cli("run", "tiny", "Hello there", "--max-tokens", "8")
    assert r2.stdout == r.stdout


def test_run_takes_options_between_model_and_prompt(capsys):
    # `run MODEL --image x.png "prompt"` is how people write it: plain argparse took MODEL as the PROMPT there
    assert cli.main(["run", "tiny", "Hello there", "--max-tokens", "5"]) == 0
    last = capsys.readouterr().out
    assert cli.main(["run", "tiny", "--max-tokens", "5", "Hello there"]) == 0
    assert capsys.readouterr().out == last and last.strip()
    with pytest.raises(SystemExit):
        cli.main(["run", "tiny", "--max-tokens", "5", "Hello", "extra"])


def test_chat_multi_turn():
    r = run_cli("chat", "tiny", "--max-tokens", "4", stdin="Hi\nHi again\n/reset\nHi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr
    prompts = [int(x) for x in re.findall(r"prompt (\d+) tokens at", r.stderr)]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0] + 4  # the second turn carries the first exchange
    assert prompts[2] == prompts[0]  # after /reset the conversation starts over


@pytest.mark.parametrize("args,message", [
    (["run", "no-such-model", "hi"], "neither an existing path nor a preset"),
    (["run", "tiny", "hi", "--temperature", "-1"], "temperature"),
    (["run", "tiny", "hi", "--top-p", "0"], "top_p"),
    (["run", "tiny", "hi", "--max-tokens", "0"], "max_tokens"),
    (["info", "Phi-3-mini-4k"], "neither an existing path nor a preset"),
    (["convert", "tiny", "{tmp}/out", "--max-shard-size", "lots"], "not a size"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])  # a fresh folder: never an existing one
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_gguf_model_runs_and_converts(tmp_path, capsys):
    from test_checkpoint import write_phi3_gguf  # the phi3 GGUF writer used by the format tests
    write_phi3_gguf(pocketlm.load("tiny"), tmp_path / "m.gguf")
    assert cli.main(["info", str(tmp_path / "m.gguf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["file_dtypes"] == ["F32"]
    assert cli.main(["run", str(tmp_path / "m.gguf"), "Hi", "--max-tokens", "4"]) == 0
    from_gguf = capsys.readouterr().out
    assert cli.main(["run", "tiny", "Hi", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == from_gguf  # same weights, same greedy reply
    assert cli.main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 0
    a, b = pocketlm.load("tiny"), pocketlm.load(tmp_path / "out")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_run_verbose_names_the_compute_path_of_each_weight_type(capsys):
    """`run -v` says where each weight type runs, so a slow path is never silent."""
    from pocketlm.api import default_model_path
    from pocketlm.quant import kernels
    gguf = default_model_path() / "model.q4_0.gguf"
    assert cli.main(["run", str(gguf), "Hi", "-v", "--max-tokens", "2"]) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("weights:")]
    assert len(line) == 1
    if kernels.available():
        assert re.search(rf"Q4_0 x\d+ kernels \({kernels.isa()}\)", line[0]), line[0]
    assert "reference" not in line[0]
