"""README.md is executable documentation: every cheap command in it runs, as a new user would run it, and works.

`test_readme_commands_work_for_a_new_user` runs each command of README.md's bash and python blocks (or the small
variant its `readme-test:` comment names; see bench/readme_nightly.py for the syntax), in README order, in a
fresh folder laid out like a fresh clone, with a fresh HOME and caches, `pocketlm` and `python` from the
project's virtualenv. A command fails the test on a non-zero exit or a Python traceback in its output. The
expensive commands are marked in the README and run by bench/readme_nightly.py instead.

The other tests pin the fixes behind the README's promises: the example pipeline config on a corpus without the
optional stages' inputs, `--pack-data` into a new folder, convert of quantized and F16 GGUF files, the preset
warning, `--data` and the tiny recipe's own data, the `--max-minutes` step budget, the default model's one name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _nightly():
    spec = importlib.util.spec_from_file_location("readme_nightly", REPO / "bench" / "readme_nightly.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_nightly"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


nightly = _nightly()


def _kernel_cache() -> str:
    from pocketlm.quant import kernels
    return str(kernels.cache_dir())


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{what}\nexit {result.returncode}\n{output[-3000:]}"
    assert "Traceback (most recent call last)" not in output, f"{what}\nprinted a traceback:\n{output[-3000:]}"


# ---- the README itself -------------------------------------------------------------------------------------------

def test_readme_has_no_paths_of_one_machine():
    text = README.read_text(encoding="utf-8")
    found = sorted(set(re.findall(r"(?<![\w.])/(?:work|root|home|tmp|Users|mnt)/[^\s`)\"']*", text)))
    assert not found, f"README.md names paths that exist only on one machine: {found}"
    assert str(REPO) not in text


def test_readme_says_how_to_run_commands_and_how_long_the_suite_takes():
    text = README.read_text(encoding="utf-8")
    assert "source .venv/bin/activate" in text and ".venv/bin/pocketlm" in text
    assert re.search(r"test suite \(about [\d-]+ minutes", text)
    commands = nightly.extract(text)
    bare = [c for c in commands if c.lang == "bash" and re.match(r"(pocketlm|python) ", c.text)]
    first_bare = min(c.line for c in bare)
    activate = next(c for c in commands if c.text.startswith("source .venv/bin/activate"))
    assert activate.line < first_bare, "the README must activate the venv before its first bare pocketlm/python"


def test_every_skip_says_why_and_expensive_ones_go_to_the_nightly_script():
    commands = nightly.extract(README.read_text(encoding="utf-8"))
    assert len(commands) >= 20
    for c in commands:
        if c.skip is not None:
            assert len(c.skip) > 10, f"line {c.line}: a skip needs a reason"
    script = nightly.nightly_script(commands)
    for c in commands:
        if c.expensive:
            assert c.text in script
    # the nightly script's dry run lists it without running anything
    out = subprocess.run([sys.executable, str(REPO / "bench" / "readme_nightly.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "pocketlm recipe nano --corpus data/corpus" in out.stdout


def test_extract_reads_directives_continuations_and_block_comments():
    text = ("<!-- readme-test: run as: echo small -->\n```bash\necho big\n```\n\n"
            "```bash\n# a comment\necho a \\\n  b   # readme-test: skip (expensive: long)\n"
            "echo c  # readme-test: run as: echo d\n```\n```python\nprint(1)\n```\n```\nnot run\n```\n")
    cs = nightly.extract(text)
    assert [(c.text, c.lang, c.skip, c.variant) for c in cs] == [
        ("echo big", "bash", None, "echo small"), ("echo a  b", "bash", "expensive: long", None),
        ("echo c", "bash", None, "echo d"), ("print(1)\n", "python", None, None)]
    assert [c.test_command for c in cs] == ["echo small", None, "echo d", "print(1)\n"]
    with pytest.raises(ValueError, match="readme-test directive"):
        nightly.extract("```bash\necho x  # readme-test: maybe\n```\n")


def test_readme_commands_work_for_a_new_user(tmp_path):
    """Every command the README shows (or its marked small variant), in order, in a fresh clone-like folder."""
    folder = nightly.make_clone(tmp_path / "clone")
    env = nightly.fresh_env(folder, kernel_cache=_kernel_cache())
    ran = 0
    for c in nightly.extract(README.read_text(encoding="utf-8")):
        cmd = c.test_command
        if cmd is None:
            continue
        what = f"README.md line {c.line}: {cmd.splitlines()[0] if c.lang == 'bash' else 'python block'}"
        if c.lang == "python":
            program = folder / f"readme-line-{c.line}.py"
            program.write_text(cmd, encoding="utf-8")
            result = _run([str(folder / ".venv" / "bin" / "python"), program.name], folder, env)
        else:
            result = _run(["bash", "-c", cmd], folder, env)
        _check(result, what)
        ran += 1
    assert ran >= 15
    # what the commands promised is there
    assert (folder / "out.gguf").read_bytes()[:4] == b"GGUF"
    assert json.loads((folder / "default-f32" / "config.json").read_text())["torch_dtype"] == "float32"
    assert (folder / "runs" / "tiny" / "model" / "config.json").is_file()


# ---- item by item ---------------------------------------------------------------------------------------------------

WORDS = ("the git commit command records changes to the repository and sqlite is a small database engine that "
         "stores data in one file while the shell runs programs for users of the system").split()


def _write_corpus(root: Path, names: list[str], docs: int = 12) -> None:
    rng = random.Random(0)
    (root / "data" / "corpus").mkdir(parents=True, exist_ok=True)
    for name in names:
        with open(root / "data" / "corpus" / f"{name}.jsonl", "w") as f:
            for i in range(docs):
                paras = [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
                                  for _ in range(5)) for _ in range(4)]
                f.write(json.dumps({"id": f"{name}/{i}", "text": "\n\n".join(paras)}) + "\n")


def test_example_pipeline_config_runs_on_the_corpus_and_skips_optional_stages(tmp_path, capsys):
    """Item 1: the shipped config, on what build-corpus.sh writes (data/corpus/NAME.jsonl under the repository
    root), with no edu head and no benchmark files: the optional stages are skipped with a message saying so,
    before any work, and the run finishes from any current folder."""
    from pocketlm.data.pipeline import PipelineConfig, run

    example = json.loads((REPO / "src/pocketlm/data/assets/pipeline-example.json").read_text())
    assert example["edu"].get("optional") is True and example["decontam"].get("optional") is True
    names = [s["name"] for s in example["sources"] if s["kind"] != "synthetic"]
    assert all(s["path"] == f"data/corpus/{s['name']}.jsonl" for s in example["sources"] if "path" in s)
    # the same file at the same depth below a root that holds a small corpus
    cfg_path = tmp_path / "src/pocketlm/data/assets/pipeline-example.json"
    cfg_path.parent.mkdir(parents=True)
    small = dict(example)
    small["sources"] = [dict(s, count=30) if s["kind"] == "synthetic" else s for s in example["sources"]]
    cfg_path.write_text(json.dumps(small))
    _write_corpus(tmp_path, names)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)
        cfg = PipelineConfig.from_file(cfg_path)
        cfg.progress = False
        cfg.workers = 1
        rep = run(cfg)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "stage edu skipped (optional)" in err and "pocketlm data train-edu" in err
    assert "stage decontam skipped (optional)" in err
    assert "edu" not in rep["stages"] and "decontam" not in rep["stages"]
    mixture = json.loads((tmp_path / "data/pipeline-out/tokens/mixture.json").read_text())
    assert set(mixture) == {"phase1", "phase2"} and mixture["phase2"]["synthetic"]["tokens"] > 0


def test_a_required_stage_with_missing_inputs_still_stops_before_any_work(tmp_path):
    from pocketlm.data.pipeline import PipelineConfig, run
    from pocketlm.data.records import DataPipelineError
    _write_corpus(tmp_path, ["a"], docs=3)
    cfg = PipelineConfig.from_dict({"out": "out", "sources": [{"name": "a", "path": "data/corpus/a.jsonl",
                                                               "kind": "web"}],
                                    "edu": {"head": "no-head"}, "mixture": {"phase1": {"a": {}}}}, base=tmp_path)
    with pytest.raises(DataPipelineError, match="edu"):
        run(cfg)
    assert not (tmp_path / "out" / "parts").exists()


def test_pack_data_into_a_new_folder_is_checked_before_any_work(tmp_path, monkeypatch):
    """Item 3: --pack-data's folder is created before the minutes of data work (was FileNotFoundError after)."""
    from pocketlm.errors import ConfigError
    from pocketlm.recipe import commands
    target = tmp_path / "recipe-data" / "sub" / "micro.tar.gz"
    commands._check_writable_file(str(target), "--pack-data")
    assert target.parent.is_dir()
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        commands._check_writable_file(str(tmp_path / "adir"), "--pack-data")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create its folder"):
        commands._check_writable_file(str(blocker / "x.tar.gz"), "--pack-data")


def test_pack_data_writes_into_a_missing_folder(tmp_path, monkeypatch):
    from pocketlm.recipe import runner
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "read_marker", lambda o, s: {"step": s})
    (out / "data").mkdir(parents=True)
    (out / "data" / "x.txt").write_text("x")
    info = runner.pack_data(out, tmp_path / "new" / "folder" / "d.tar.gz")
    assert Path(info["archive"]).is_file()


def test_nano_smoke_reads_files_build_corpus_writes():
    """Item 5: the test recipe reads corpus files that scripts/build-corpus.sh writes (was docs.jsonl)."""
    from pocketlm.data.corpus import ALL_SOURCES
    from pocketlm.recipe.recipes import get_recipe
    r = get_recipe("nano-smoke")
    assert {n for n, _ in r.corpus_sources} <= set(ALL_SOURCES) and r.corpus_docs is not None


def test_python_api_loads_the_embedded_default_model():
    """Item 4: pocketlm.load() with no argument is the embedded model; default_model_path is exported."""
    import pocketlm
    assert "default_model_path" in pocketlm.__all__
    from pocketlm.api import gguf_folder_file
    folder = pocketlm.default_model_path()
    assert (folder / "config.json").is_file() or gguf_folder_file(folder) is not None
    model = pocketlm.load()
    assert model.config.name == "default-model" and next(model.parameters()).dtype.is_floating_point


def test_the_default_model_has_one_name(monkeypatch, capsys):
    """Item 12: chat, serve and eval name the embedded model `default-model` (was nano / default-model /
    pocketlm:nano)."""
    import argparse

    from pocketlm import cli
    from pocketlm.api import DEFAULT_MODEL_NAME, default_model_path
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.serve.commands import _model_name
    assert DEFAULT_MODEL_NAME == "default-model"
    args = argparse.Namespace(model=None, dtype=None)
    cli._use_default_model(args)
    assert args.store_name == DEFAULT_MODEL_NAME  # the chat banner's name
    assert _model_name(str(default_model_path())) == DEFAULT_MODEL_NAME
    import pocketlm
    model = pocketlm.load()
    assert PocketLMBackend(model, pocketlm.Tokenizer.from_pretrained(default_model_path())).name == \
        f"pocketlm:{DEFAULT_MODEL_NAME}"


def _gguf(tmp_path: Path, scheme: str) -> Path:
    from pocketlm.cli import main
    out = tmp_path / f"m.{scheme}.gguf"
    assert main(["quantize", "tiny", str(out), "--scheme", scheme]) == 0
    return out


def test_convert_dequantizes_a_quantized_gguf_and_writes_nothing_on_error(tmp_path, capsys):
    """Item 7: a quantized GGUF (the default model's own) converts (was KeyError and a half-written folder);
    .safetensors are written with the umask's permissions (was 0600)."""
    from pocketlm.cli import main
    from pocketlm.formats.safetensors_io import CheckpointReader
    import pocketlm
    src = pocketlm.default_model_path() / "model.q4_0.gguf"
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(["convert", str(src), str(out)]) == 0
    finally:
        os.umask(old)
    assert "dequantized to float32" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    with CheckpointReader(out / "model.safetensors") as r:
        assert "model.embed_tokens.weight" in r.keys()
    assert main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # a file that is not a model: a typed error, and no output folder
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    assert main(["convert", str(bad), str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_convert_keeps_an_f16_gguf_in_float16(tmp_path):
    """Item 7: `--dtype` defaults to the checkpoint's: an F16 GGUF gives float16 (was float32)."""
    from pocketlm.api import gguf_checkpoint_dtype
    from pocketlm.cli import main
    f16 = _gguf(tmp_path, "f16")
    assert gguf_checkpoint_dtype(f16) == ("float16", False)
    assert main(["convert", str(f16), str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float16"


def test_a_preset_warns_once_that_its_weights_are_random(capsys):
    """Item 10: `pocketlm run tiny` and `convert PRESET` say the weights are random (were silent)."""
    from pocketlm import api
    from pocketlm.cli import main
    api._WARNED_PRESETS.discard("tiny")
    assert main(["run", "tiny", "Hello", "--max-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("RANDOM weights") == 1
    api.warn_random_weights("tiny")
    assert "RANDOM" not in capsys.readouterr().err


def test_tiny_recipe_needs_no_data_and_data_reads_a_pipeline_output(tmp_path, capsys):
    """Item 2: tiny-pretrain runs with nothing prepared; --data maps a `data run` output to the two phases."""
    from pocketlm.data.shards import write_shards
    from pocketlm.errors import ConfigError
    from pocketlm.train import commands
    from pocketlm.train.config import recipe
    cfg = commands.with_demo_data(recipe("tiny-pretrain"), "tiny-pretrain", str(tmp_path / "run"), [])
    assert "demo data" in capsys.readouterr().err
    for path in cfg.sources.values():
        assert (Path(path) / "index.json").is_file()
    # a pipeline output folder
    data = tmp_path / "pipe"
    mixture = {}
    for phase, srcs in (("phase1", {"web": 1.0}), ("phase2", {"web": 1.0, "synthetic": 2.0})):
        for src, w in srcs.items():
            write_shards(data / "tokens" / phase / src, [list(range(3, 400))] * 4, dtype="uint16", eos_id=2)
            mixture.setdefault(phase, {})[src] = {"path": f"{phase}/{src}", "weight": w, "tokens": 1600}
    (data / "tokens" / "mixture.json").write_text(json.dumps(mixture))
    out = commands.pipeline_sources(recipe("tiny-pretrain"), str(data))
    assert set(out.sources) == {"p1.web", "p2.web", "p2.synthetic"}
    assert out.phases[1].weights == {"p2.synthetic": pytest.approx(2 / 3, abs=1e-5),
                                     "p2.web": pytest.approx(1 / 3, abs=1e-5)}
    assert [p.steps for p in out.phases] == [p.steps for p in recipe("tiny-pretrain").phases]
    with pytest.raises(ConfigError, match="no tokens/mixture.json"):
        commands.pipeline_sources(recipe("tiny-pretrain"), str(tmp_path / "nothing"))


def test_max_minutes_sizes_chunks_to_the_time_left():
    """Item 9: the step budget: no measured step time -> one step; then as many as fit with the margin."""
    from pocketlm.recipe.runner import DEADLINE_MARGIN_S, _phase_note, affordable_steps
    from pocketlm.train.config import recipe
    assert affordable_steps(DEADLINE_MARGIN_S, 0.1) == 0
    assert affordable_steps(60, None) == 1
    assert affordable_steps(17, 1.0) == 10  # (17 - 5) / 1.2
    cfg = recipe("tiny-pretrain")
    assert _phase_note(cfg, 3) == "in phase1, which ends at step 24"
    assert _phase_note(cfg, 30) == "in phase2, which ends at step 40"


def test_bench_cpu_engine_micro_preset_and_default_out():
    """Item 11: --preset micro gets a context it can hold (was 4096 > 2048), and --out defaults outside the
    committed results."""
    import argparse

    from pocketlm.config import preset
    spec = importlib.util.spec_from_file_location("bench_cpu_engine", REPO / "bench" / "bench_cpu_engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = argparse.Namespace(ctx=None, out=None, prompt=128, decode=64, preset="micro", type="Q4_0")
    bench.resolve_defaults(a, preset("micro"))
    assert a.ctx == preset("micro").max_position_embeddings and "bench/results" not in a.out
    with pytest.raises(SystemExit, match="outside"):
        bench.resolve_defaults(argparse.Namespace(ctx=4096, out=None, prompt=8, decode=8, preset="micro",
                                                  type="Q4_0"), preset("micro"))


def test_data_quality_help_names_no_issue_and_no_machine_paths():
    """Item 8: bench/data_quality.py --help: no issue number, no absolute default paths."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "data_quality.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    assert "issue" not in out.stdout.lower() and "/work" not in out.stdout
    card = (REPO / "src/pocketlm/assets/default-model/MODEL_CARD.md").read_text()
    assert not re.search(r"(?<![\w.])/(?:work|tmp|root)/", card)
