"""How `pocketlm eval` runs: the BOS rule (`--add-bos`, checked against transformers and lm-eval), shot counts the
pool cannot give, every task's files checked before the model loads, results written task by task, 0-shot
without a train split."""

from __future__ import annotations

import json
import shutil

import pytest
from eval_helpers import DATA, boolq_yaml, run_lm_eval  # the shared lm-eval harness: tests/eval_helpers.py

import pocketlm
from pocketlm.cli import main
from pocketlm.eval.bos import BosTokenizer, folder_flags, resolve
from pocketlm.eval.data import EvalDataError
from pocketlm.eval.runner import FewShotError, evaluate, prepare
from pocketlm.eval.tasks import get_task, resolve_tasks
from pocketlm.formats.hf import save_checkpoint


@pytest.fixture(scope="module")
def phi3_like(tmp_path_factory):
    """A checkpoint folder as the Phi-3-mini-128k / 3.5-mini folders ship it: tokenizer_config.json says
    add_bos_token false (tokenizer_class LlamaTokenizer), tokenizer.json's post-processor still adds <s>."""
    folder = tmp_path_factory.mktemp("phi3like") / "model"
    save_checkpoint(pocketlm.load("tiny", seed=5), folder, tokenizer=pocketlm.Tokenizer.default())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg |= {"add_bos_token": False, "tokenizer_class": "LlamaTokenizer", "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_bos_rule_on_a_phi3_style_folder(phi3_like):
    tok = pocketlm.Tokenizer.from_pretrained(phi3_like)
    assert folder_flags(phi3_like) == (False, True)
    add, note = resolve("auto", tok)
    assert add is False and "add_bos_token=false" in note and "--add-bos true" in note
    assert resolve("true", tok)[0] is True and resolve("false", tok)[0] is False
    # no tokenizer_config flag: the post-processor decides
    bare = phi3_like.parent / "bare"
    shutil.copytree(phi3_like, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token")
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert resolve("auto", pocketlm.Tokenizer.from_pretrained(bare)) == (True, "tokenizer.json post-processor "
                                                                          "(adds <s>)")


def test_add_bos_true_is_what_transformers_5_encodes(phi3_like):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(phi3_like)
    tok = pocketlm.Tokenizer.from_pretrained(phi3_like)
    text = "Question: is the sky blue?\nAnswer:"
    with_bos, without = BosTokenizer(tok, True), BosTokenizer(tok, False)
    hf = theirs.encode(text)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert hf == with_bos.encode(text, add_bos=with_bos.add_bos_default)  # the post-processor wins
    else:
        assert hf == without.encode(text, add_bos=without.add_bos_default)  # add_bos_token wins
    assert theirs.encode(text, add_special_tokens=False) == without.encode(text, add_bos=without.add_bos_default)
    assert hf[0] == tok.bos_id


@pytest.mark.slow  # ~30 s: lm-eval and transformers load in a subprocess
def test_add_bos_reproduces_lm_eval_either_way(phi3_like, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    yaml_path = tmp_path / "pl_boolq_bos.yaml"
    yaml_path.write_text(boolq_yaml("pl_boolq_bos"))
    theirs = run_lm_eval(phi3_like, {"default": (yaml_path, 2, ""), "nobos": (yaml_path, 2, ",add_bos_token=False")},
                         tmp_path)
    from pocketlm.eval.backends import PocketLMBackend
    model, tok = pocketlm.load(phi3_like), pocketlm.Tokenizer.from_pretrained(phi3_like)
    ours = {}
    for mode in ("true", "auto"):
        add, _ = resolve(mode, tok)
        run = evaluate(PocketLMBackend(model, BosTokenizer(tok, add)), [get_task("boolq")], data_dir=DATA, shots=2,
                       progress=False)
        ours[mode] = [r["loglikelihoods"] for r in run["samples"]["boolq"]]
    import transformers
    lm_default = "true" if int(transformers.__version__.split(".")[0]) >= 5 else "auto"
    for label, mode in (("default", lm_default), ("nobos", "auto")):
        lls = [s["lls"] for s in theirs[label]["samples"]]
        assert len(lls) == len(ours[mode]) > 0
        for a, b in zip(ours[mode], lls):
            assert a == pytest.approx(b, abs=1e-4)
    assert abs(ours["true"][0][0] - ours["auto"][0][0]) > 1e-3  # BOS really changes the scores


def test_more_shots_than_the_pool_holds_is_refused():
    with pytest.raises(FewShotError, match=r"boolq: 5 shots asked for but the few-shot pool holds only 4"):
        prepare([get_task("boolq")], DATA, shots=5)
    with pytest.raises(FewShotError, match=r"mmlu: 6 shots .* group '(astronomy|high_school_mathematics)' holds "
                                           r"only 5"):
        prepare([get_task("mmlu")], DATA, shots=6)
    with pytest.raises(FewShotError, match=r"gpqa: 3 shots .* holds only 2 usable examples \(the item itself"):
        prepare([get_task("gpqa")], DATA, shots=3)  # the pool is the evaluated set: 3 items, 2 others
    (p,) = prepare([get_task("boolq")], DATA, shots=4)
    assert p.shots == 4
    (m,) = prepare([get_task("math")], DATA, shots=3)  # no few-shot source: 0-shot, both counts recorded
    assert (m.shots, m.requested) == (0, 3)
    (b,) = prepare([get_task("bbh")], DATA, shots=5)  # the 3 CoT shots are part of each item's text
    assert (b.shots, b.requested) == (3, 5)


def test_zero_shot_needs_no_train_split(tmp_path):
    (tmp_path / "boolq").mkdir()
    shutil.copy(DATA / "boolq" / "dev.jsonl", tmp_path / "boolq")
    (p,) = prepare([get_task("boolq")], tmp_path, shots=0)
    assert p.shots == 0 and len(p.docs) == 2
    with pytest.raises(EvalDataError, match=r"boolq/train\.jsonl: file not found"):
        prepare([get_task("boolq")], tmp_path, shots=2)

    class Fixed:  # any backend: 0-shot prompts are the item text alone
        name = "fixed"

        def loglikelihood(self, reqs):
            return [(-float(len(c)), False) for _, c in reqs]

    run = evaluate(Fixed(), [get_task("boolq")], data_dir=tmp_path, shots=0, progress=False)
    rows = run["samples"]["boolq"]
    assert run["results"]["boolq"]["shots"] == 0 and rows[0]["prompt"].count("Question:") == 1
    assert [r["pred"] for r in rows] == [0, 0]  # " no" is shorter than " yes"


def test_missing_file_of_a_later_task_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import pocketlm.api
    loaded = []
    monkeypatch.setattr(pocketlm.api, "load", lambda *a, **k: loaded.append(a) or pytest.fail("model loaded"))
    data = tmp_path / "data"
    shutil.copytree(DATA / "boolq", data / "boolq")  # hellaswag (the second task) is missing
    assert main(["eval", "tiny", "--tasks", "boolq,hellaswag", "--data-dir", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(data / "hellaswag" / "hellaswag_val.jsonl") in err and not loaded
    assert main(["eval", "tiny", "--tasks", "boolq", "--shots", "9", "--data-dir", str(data)]) == 2
    assert "holds only 4" in capsys.readouterr().err and not loaded


def test_a_crash_in_a_later_task_keeps_the_finished_tasks_on_disk(tmp_path):
    class Flaky:
        name = "flaky"

        def loglikelihood(self, reqs):
            if reqs[0][0].startswith("Question: "):  # an ARC prompt; BoolQ prompts open with the passage
                raise RuntimeError("backend died")
            return [(-float(len(c)), False) for _, c in reqs]

    tasks = resolve_tasks("boolq,arc_easy")  # arc_easy prompts start with "Question: "
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="backend died"):
        evaluate(Flaky(), tasks, data_dir=DATA, limit=2, progress=False, out=out)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["results"]) == ["boolq"] and saved["config"]["complete"] is False
    assert saved["results"]["boolq"]["n"] == 2
    assert len((out / "samples_boolq.jsonl").read_text().splitlines()) == 2
    assert not (out / "samples_arc_easy.jsonl").exists()
