"""Multiple-choice questions about an image, for phi-3.5-vision: `pocketlm eval MODEL --tasks scienceqa-img
--data-dir D`.

Layout (the ScienceQA release, images as files): `D/scienceqa-img/problems.json`, an object
`{id: {"question", "choices": [str], "answer": int, "hint": str, "image": "image.png" | null, "split": ...}}`,
with each item's picture at `D/scienceqa-img/images/<split>/<id>/<image>`. The eval set is the `test` split's items
that have an image (ScienceQA-IMG; all splits when there is no test split).

Scored like the text multiple-choice tasks (`kind` "mc", acc and acc_norm): the log-likelihood of each
`" " + choice` after the prompt `<|image_1|>\\nContext: {hint}\\nQuestion: {question}\\nAnswer:`, the image in
place of its tag (vision.prompt_ids); with --chat the prompt is a user turn and the choice the reply.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pocketlm.eval.data import EvalDataError
from pocketlm.eval.tasks import Doc, Task

LAYOUT = ("scienceqa-img/problems.json ({id: {question, choices, answer, hint, image, split}}) and "
          "scienceqa-img/images/<split>/<id>/<image>")
MAX_PROBLEMS_BYTES = 256 * 2**20


def load_scienceqa(root: Path) -> tuple[list[Doc], list[Doc]]:
    path = Path(root) / "problems.json"
    try:
        if path.stat().st_size > MAX_PROBLEMS_BYTES:
            raise EvalDataError(f"{path}: larger than {MAX_PROBLEMS_BYTES} bytes")
        problems = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: not found; expected layout: {LAYOUT}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvalDataError(f"{path}: cannot read JSON ({e}); expected layout: {LAYOUT}") from None
    if not isinstance(problems, dict):
        raise EvalDataError(f"{path}: must hold an object of problems keyed by id; expected layout: {LAYOUT}")
    has_test = any(isinstance(p, dict) and p.get("split") == "test" for p in problems.values())
    docs = []
    for pid, p in problems.items():
        if not isinstance(p, dict) or not p.get("image") or (has_test and p.get("split") != "test"):
            continue
        choices, answer, question = p.get("choices"), p.get("answer"), p.get("question")
        if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices) and len(choices) >= 2
                and isinstance(answer, int) and 0 <= answer < len(choices) and isinstance(question, str)):
            raise EvalDataError(f"{path}: problem {pid!r} needs question (str), choices (>= 2 str) and answer (an "
                                f"index into choices), got {json.dumps(p)[:200]}")
        image = Path(root) / "images" / str(p.get("split") or "test") / str(pid) / str(p["image"])
        if not image.is_file():
            raise EvalDataError(f"{image}: the image of problem {pid!r} is missing; expected layout: {LAYOUT}")
        hint = p.get("hint") if isinstance(p.get("hint"), str) else ""
        text = "<|image_1|>\n" + (f"Context: {hint}\n" if hint.strip() else "") + f"Question: {question}\nAnswer:"
        docs.append(Doc(id=str(pid), text=text, choices=list(choices), gold=answer, target=choices[answer],
                        group=str(p.get("subject", "")), extra={"images": [str(image)]}))
    if not docs:
        raise EvalDataError(f"{path}: no problem with an image (in the test split); expected layout: {LAYOUT}")
    return docs, []


TASK = Task(name="scienceqa-img", title="ScienceQA-IMG", kind="mc", shots=0, folder="scienceqa-img", layout=LAYOUT,
            load=load_scienceqa, metric="acc",
            notes="images through phi-3.5-vision; zero-shot, log-likelihood of each choice")


@torch.inference_mode()
def loglikelihood(backend, requests: list[tuple], images: list[str]) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context, continuation) with `images` in place of the context's tags.
    Needs pocketlm's own backend on a vision model: the images are encoded once for all continuations."""
    from pocketlm import vision
    from pocketlm.eval.backends import EvalBackendError
    model = getattr(backend, "model", None)
    if not isinstance(model, vision.Phi3VForCausalLM):
        raise EvalBackendError("image tasks need a vision model (phi-3.5-vision) run by pocketlm itself, not "
                               f"{getattr(backend, 'name', type(backend).__name__)}")
    tok = backend.tok
    processed = [model.preprocess(p) for p in images]
    features = model.encode_images(processed)
    out = []
    for ctx, cont in requests:
        ctx_ids, _ = vision.prompt_ids(tok, ctx, [p.num_tokens for p in processed], chat_format=backend.chat_format)
        cont_ids = tok.encode(cont.lstrip(), add_bos=False)  # "▁choice", as after the context's last token
        ids = torch.tensor([ctx_ids + cont_ids[:-1]])
        x = model.embed_with_images(ids, features)
        logits = model(ids.clamp_min(0), inputs_embeds=x)[0, -len(cont_ids):]  # (len(cont), V)
        lp = torch.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(cont_ids)
        out.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
    return out
