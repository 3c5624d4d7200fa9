"""The recipe's evaluation step: held-out tasks for each stage's model and sample chats at temperature 0.

Held-out tasks are helper B's `pocketlm.eval.heldout` (arithmetic multiple choice, cloze multiple choice, and bits-
per-byte on held-out text; chance 0.25 for both multiple-choice sets), scored on the model after pretraining, the
final (DPO) model and its quantized GGUF, so the table shows what post-training and quantization change (the SFT
model is skipped to save minutes on the shared CPU). Sample chats are greedy (temperature 0) replies of the chat
models to the recipe's prompts, with their finish reason: "stop" means the model closed its turn with `<|end|>` (or
another chat stop token), "length" that it ran out of tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

import pocketlm
from pocketlm.tokenizer import Tokenizer


def heldout_scores(model, tokenizer, data_dir: Path, *, limit: int | None) -> tuple[dict[str, float], dict]:
    """({short metric name: value}, the full result) of `pocketlm.eval.heldout.evaluate_heldout`."""
    from pocketlm.eval.heldout import evaluate_heldout
    full = evaluate_heldout(model, tokenizer, data_dir, limit=limit)
    flat = {"arith_acc": full["heldout-arith"]["acc"], "cloze_acc": full["heldout-cloze"]["acc"],
            "cloze_acc_norm": full["heldout-cloze"]["acc_norm"], "bpb_web": full["bpb-web"]["bits_per_byte"],
            "bpb_synthetic": full["bpb-synthetic"]["bits_per_byte"]}
    return flat, full


def sample_chats(model, tokenizer, prompts, *, max_tokens: int) -> list[dict]:
    from pocketlm.engine.generate import generate_full
    out = []
    for prompt in prompts:
        r = generate_full(model, tokenizer, [{"role": "user", "content": prompt}], temperature=0.0,
                          max_tokens=max_tokens)
        out.append({"prompt": prompt, "reply": r.text, "finish_reason": r.finish_reason,
                    "completion_tokens": r.completion_tokens, "decode_tokens_per_s": round(r.decode_tokens_per_s, 1)})
    return out


def simple_qa_scores(model, tokenizer, repetition_penalty: float | None = None) -> tuple[dict[str, float], list[dict]]:
    """simple-qa (`pocketlm.eval.simple_qa`, greedy chat) as `pocketlm eval MODEL --tasks simple-qa` scores it
    (with the repetition penalty the model file declares, unless `repetition_penalty` says otherwise):
    ({"qa_acc", "qa_refusal", "qa_over_refusal", "qa_degenerate"}, the per-item rows)."""
    from pocketlm.eval import simple_qa
    from pocketlm.eval.backends import PocketLMBackend
    from pocketlm.eval.runner import evaluate
    backend = PocketLMBackend(model, tokenizer)
    if repetition_penalty is not None:
        backend.repetition_penalty = repetition_penalty
    out = evaluate(backend, [simple_qa.TASK], progress=False)
    metrics = out["results"][simple_qa.NAME]["metrics"]
    rows = [{"id": r["id"], "category": r["category"], "reply": r["generation"], "scores": r["scores"]}
            for r in out["samples"][simple_qa.NAME]]
    return {f"qa_{k}": metrics[k]["mean"] for k in ("acc", "refusal", "over_refusal", "degenerate")}, rows


def evaluate_models(models: dict[str, Path], recipe, *, chat_models=(), tokenizer_dir: Path, data_dir: Path,
                    say: Callable[[str], None] = print, simple_qa=()) -> dict:
    """{"models": {name: {"heldout": {...}, "samples": [...], "seconds"}}, "table": [{"model", metrics...}]};
    the models named in `simple_qa` are also scored on simple-qa (columns qa_*, rows under "simple_qa")."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    results, table = {}, []
    for name, path in models.items():
        t0 = time.perf_counter()
        model = pocketlm.load(path, dtype=torch.float32 if Path(path).suffix != ".gguf" else None).eval()
        with torch.no_grad():
            scores, full = heldout_scores(model, tok, data_dir, limit=recipe.eval_limit)
            samples = (sample_chats(model, tok, recipe.sample_prompts, max_tokens=recipe.sample_max_tokens)
                       if name in chat_models else [])
            qa, qa_rows = simple_qa_scores(model, tok) if name in simple_qa else ({}, [])
        row = {"model": name, **{k: round(float(v), 4) for k, v in {**scores, **qa}.items()}}
        if samples:
            row["chats_stopped"] = f"{sum(s['finish_reason'] == 'stop' for s in samples)}/{len(samples)}"
        results[name] = {"path": str(path), "heldout": full, "samples": samples,
                         **({"simple_qa": qa_rows} if qa_rows else {}),
                         "seconds": round(time.perf_counter() - t0, 2)}
        table.append(row)
        say(f"    eval {name}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "model"))
        del model
    return {"models": results, "table": table}
