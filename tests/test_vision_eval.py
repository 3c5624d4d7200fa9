"""`pocketlm eval MODEL --tasks scienceqa-img --data-dir D`: the ScienceQA layout read from files (test-split items
with an image only), each choice's log-likelihood with the image in place of its tag equal to a full forward of
the reference-style call, acc from those numbers, and the layout named when a file is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

import pocketlm  # noqa: E402
from pocketlm import Tokenizer, vision  # noqa: E402
from pocketlm.eval.data import EvalDataError  # noqa: E402


def make_scienceqa(root):
    problems = {
        "1": {"question": "Which shape is red?", "choices": ["the disc", "the square", "neither"], "answer": 0,
              "hint": "Look at the picture.", "image": "image.png", "split": "test", "subject": "natural science"},
        "2": {"question": "How many shapes?", "choices": ["one", "two"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test"},
        "3": {"question": "No picture here?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
              "split": "test"},
        "4": {"question": "Train item", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "split": "train"},
    }
    d = root / "scienceqa-img"
    d.mkdir(parents=True)
    (d / "problems.json").write_text(json.dumps(problems))
    for pid, split, seed in (("1", "test", 1), ("2", "test", 2), ("4", "train", 3)):
        (d / "images" / split / pid).mkdir(parents=True)
        arr = (np.random.RandomState(seed).rand(50 + 20 * seed, 70, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(d / "images" / split / pid / "image.png")
    return d


@pytest.fixture(scope="module")
def model():
    return pocketlm.load("tiny-vision")


def test_scienceqa_img_scores_by_loglikelihood_with_the_image(tmp_path, model):
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.eval.runner import evaluate
    from pocketlm.eval.tasks import get_task
    d = make_scienceqa(tmp_path / "data")
    tok = Tokenizer.default()
    got = evaluate(PocketLMBackend(model, tok), [get_task("scienceqa-img")], data_dir=tmp_path / "data",
                   progress=False)
    rows = got["samples"]["scienceqa-img"]
    assert sorted(r["id"] for r in rows) == ["1", "2"]  # test split, with an image
    problems = json.loads((d / "problems.json").read_text())
    correct = 0
    for r in rows:
        p = problems[r["id"]]
        im = model.preprocess(str(d / "images" / "test" / r["id"] / "image.png"))
        hint = f"Context: {p['hint']}\n" if p["hint"] else ""
        ctx, _ = vision.prompt_ids(tok, f"<|image_1|>\n{hint}Question: {p['question']}\nAnswer:", [im.num_tokens])
        lls = []
        for choice in p["choices"]:
            cont = tok.encode(choice, add_bos=False)
            seq = torch.tensor([ctx + cont])
            with torch.no_grad():
                logits = model.forward_with_images(seq, im.pixel_values[None], [im.image_size])
            lp = torch.log_softmax(logits[0, len(ctx) - 1:-1].float(), dim=-1)
            lls.append(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()))
        assert r["loglikelihoods"] == pytest.approx(lls, abs=1e-3)
        correct += int(int(np.argmax(lls)) == p["answer"])
    result = got["results"]["scienceqa-img"]
    assert result["n"] == 2 and result["metric"] == "acc"
    assert result["metrics"]["acc"]["mean"] == pytest.approx(correct / 2)


def test_layout_errors_name_the_layout(tmp_path):
    from pocketlm.eval.vision_tasks import load_scienceqa
    with pytest.raises(EvalDataError, match="problems.json: not found; expected layout"):
        load_scienceqa(tmp_path)
    d = make_scienceqa(tmp_path / "data")
    (d / "images" / "test" / "2" / "image.png").unlink()
    with pytest.raises(EvalDataError, match="the image of problem '2' is missing"):
        load_scienceqa(d)


def test_eval_cli_reaches_the_image_task(tmp_path, capsys):
    """`pocketlm eval tiny-vision --tasks scienceqa-img --data-dir D --limit 1`: the verb loads the vision model
    and writes the samples."""
    from pocketlm import cli
    make_scienceqa(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(["eval", "tiny-vision", "--tasks", "scienceqa-img", "--data-dir", str(tmp_path / "data"),
                     "--limit", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (out / "samples_scienceqa-img.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["loglikelihoods"]) == len(rows[0]["choices"])
