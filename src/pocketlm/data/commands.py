"""`pocketlm data`: the data-optimal pipeline: corpus, filters, dedup, edu classifier, synthetic data, shards.

    pocketlm data run CONFIG.json [--workers N] [--rebuild] [--dask [ADDRESS]]   run or resume the pipeline
    pocketlm data corpus --out DIR [--sources a,b]                   build the Debian-docs corpus (after apt)
    pocketlm data synth --out FILE.jsonl --count N [--seed S]        procedural synthetic lessons
    pocketlm data teacher --out FILE.jsonl --base-url URL --model M --topics FILE [--audiences ..] [--styles ..]
    pocketlm data teacher --kind lessons|chats|prefs --count N --out FILE.jsonl --base-url URL --model M
                          [--concurrency N] [--domains a,b]        topic-tree lessons / SFT chats / DPO pairs
    pocketlm data train-edu --annotations FILE.jsonl --out DIR       train the edu head; prints held-out F1
    pocketlm data score --head DIR FILE.jsonl                        print edu scores of documents
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pocketlm.data.records import DataPipelineError, write_part


def positive_int(text: str) -> int:
    """argparse type for counts such as --workers: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("run", help="run or resume the pipeline from a JSON config")
    p.add_argument("config")
    p.add_argument("--workers", type=positive_int, default=None, help="worker processes (default: the config's)")
    p.add_argument("--out", default=None, help="override the config's output folder (relative to the current one)")
    p.add_argument("--rebuild", action="store_true",
                   help="when the output folder holds results of other inputs (changed config or corpus), delete "
                        "them from the first changed stage on and redo them, instead of refusing")
    p.add_argument("--dask", nargs="?", const="local", default=None,
                   help="run on Dask: a scheduler address, or no value for a local cluster")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("corpus", help="convert installed Debian docs to JSONL (see scripts/build-corpus.sh)")
    p.add_argument("--out", required=True)
    p.add_argument("--sources", default="all")
    p.add_argument("--workers", type=positive_int, default=None)
    p = sub.add_parser("synth", help="write procedural synthetic lessons with verified answers")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generators", default=None, help="comma list (default: all)")
    p = sub.add_parser("teacher", help="textbook sections from an OpenAI-compatible endpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--topics", default=None, help="file with one topic per line (required without --kind)")
    p.add_argument("--extracts", default=None, help="JSONL documents used as inspiration (web extracts)")
    p.add_argument("--audiences", default="high school students,college students")
    p.add_argument("--styles", default="textbook,tutorial")
    p.add_argument("--count", type=int, default=None, help="seeded draws instead of the full product")
    p.add_argument("--rpm", type=float, default=60.0, help="requests per minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["lessons", "chats", "prefs"], default=None,
                   help="topic-tree data with checks (pocketlm.data.teacher_chat): textbook lessons, SFT chats or "
                        "DPO preference pairs; needs --count")
    p.add_argument("--concurrency", type=positive_int, default=1, help="--kind: parallel requests (the server "
                   "batches them)")
    p.add_argument("--tree", default=None, help="--kind: topic tree JSON (default: the shipped one)")
    p.add_argument("--domains", default=None, help="--kind: comma list of topic-tree domains (default: all; "
                   "'harmful,benign' gives safety data only)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="--kind: per answer (default 160, Python 2x; lessons 400)")
    p.add_argument("--temperature", type=float, default=None, help="--kind: sampling temperature (default 0.3; "
                   "lessons 0.7)")
    p.add_argument("--multi-turn", type=float, default=0.3, help="--kind: share of chats with a follow-up turn")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--corpus-dir", default=None, help="--kind: folder with wordnet.jsonl for definitions")
    p.add_argument("--decontam-tasks", default=None,
                   help="--kind: also decontaminate against these eval tasks (simple-qa always)")
    p.add_argument("--eval-data", default=None, help="--kind: eval data folder for --decontam-tasks")
    p.add_argument("--decontam-items", default=None, help="--kind: JSONL of {text} evaluation items to avoid")
    p.add_argument("--no-verify-code", action="store_true", help="--kind: do not run Python answers in the sandbox")
    p = sub.add_parser("safety-prefs", help="on-policy safety DPO pairs: MODEL's own answers to harmful requests "
                       "are rejected (pocketlm.data.safety_prefs)")
    p.add_argument("model", metavar="MODEL", help="the model to be trained (GGUF, folder): its replies are asked")
    p.add_argument("--teacher", required=True, help="model whose answers to the benign look-alikes are chosen")
    p.add_argument("--teacher-repetition-penalty", type=float, default=None,
                   help="penalty for the teacher's answers (default: what its file declares)")
    p.add_argument("--out", required=True, help="output JSONL (a .report.json is written beside it)")
    p.add_argument("--tree", default=None, help="topic tree JSON (default: the shipped one)")
    p.add_argument("--requests", default=None, help="JSON {\"harmful\": [...], \"benign\": [...]}: requests added "
                   "to the tree's")
    p.add_argument("--variants", type=positive_int, default=3, help="wrappings of each harmful request")
    p.add_argument("--samples", type=int, default=2, help="sampled replies per request besides the greedy one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p = sub.add_parser("train-edu", help="train the educational-value head on annotated JSONL")
    p.add_argument("--annotations", default=None, help="JSONL {text, score}; default: the shipped seed set")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=3.0)
    p.add_argument("--heldout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while embedding")
    p = sub.add_parser("score", help="print the edu score of each document of a corpus file (JSONL, Parquet, ...)")
    p.add_argument("--head", required=True)
    p.add_argument("file", help="documents need a 'text'; without an 'id' they are named <file stem>/<file>:<line>, "
                                "as in `data run`")


def run(args: argparse.Namespace) -> int:
    """Build the corpus, run the data pipeline, generate synthetic data, train and apply the edu classifier."""
    cmd = args.data_command
    if cmd == "run":
        from pocketlm.data.pipeline import PipelineConfig, prepare, run as run_pipeline

        cfg = PipelineConfig.from_file(args.config)
        if args.workers is not None:
            cfg.workers = args.workers
        if args.out:
            cfg.out = os.path.abspath(args.out)
        if args.no_progress:
            cfg.progress = False
        if args.rebuild:
            prepare(cfg, rebuild=True)   # delete what changed; the run below then finds the folder consistent
        if args.dask:
            from pocketlm.data.distributed import run_distributed

            rep = run_distributed(cfg, address=None if args.dask == "local" else args.dask,
                                  n_workers=cfg.workers or 2)
        else:
            rep = run_pipeline(cfg)
        for stage, st in rep["stages"].items():
            print(f"{stage:<10} docs {st['docs_in']:>9} -> {st['docs_out']:<9} tokens {st['tokens_in']:>12} -> "
                  f"{st['tokens_out']}")
        print(f"report: {Path(cfg.out) / 'report' / 'report.md'}")
        return 0
    if cmd == "corpus":
        from pocketlm.data.corpus import main

        argv = ["--out", args.out, "--sources", args.sources]
        if args.workers:
            argv += ["--workers", str(args.workers)]
        return main(argv)
    if cmd == "synth":
        from pocketlm.data.synthetic import generate

        docs, stats = generate(args.count, args.seed, args.generators.split(",") if args.generators else None)
        write_part(args.out, docs)
        print(json.dumps(stats))
        return 0
    if cmd == "safety-prefs":
        from pocketlm.data.safety_prefs import run_cli as safety_prefs

        return safety_prefs(args)
    if cmd == "teacher" and args.kind:
        from pocketlm.data.teacher_chat import run_cli

        return run_cli(args)
    if cmd == "teacher":
        from pocketlm.data.readers import read_documents
        from pocketlm.data.teacher import Teacher, items_from

        if not args.topics:
            raise DataPipelineError("data teacher: give --topics FILE, or --kind lessons|chats|prefs")
        try:
            topics = [t.strip() for t in Path(args.topics).read_text().splitlines() if t.strip()]
        except OSError as e:
            raise DataPipelineError(f"--topics {args.topics}: {e}") from None
        extracts = [d.text for d in read_documents(args.extracts)] if args.extracts else None
        items = items_from(topics, args.audiences.split(","), args.styles.split(","), extracts, seed=args.seed,
                           n=args.count)
        t = Teacher(args.base_url, args.model, api_key=args.api_key, requests_per_minute=args.rpm, seed=args.seed)
        print(json.dumps(t.run(items, args.out)))
        return 0
    if cmd == "train-edu":
        from pocketlm.data.edu import SEED_PATH, train_from_jsonl

        print(f"pocketlm data train-edu: embedding the annotations of {args.annotations or SEED_PATH} and fitting "
              f"the head (about a minute on 2 cores) -> {args.out}", file=sys.stderr, flush=True)
        head = train_from_jsonl(args.annotations or SEED_PATH, args.out, threshold=args.threshold,
                                heldout=args.heldout, seed=args.seed, progress=not args.no_progress)
        m = head.metrics
        b = m["heldout_binary"]
        print(f"edu head: {m['n_train']} train / {m['n_heldout']} held-out annotations, ridge lambda "
              f"{m['ridge_lambda']}")
        r = m["heldout_binary_rounded"]
        print(f"held-out F1 for gold >= {b['threshold']:g} at the chosen cut (raw score >= {b.get('cut')}): "
              f"{b['f1']:.3f} (precision {b['precision']:.3f}, recall {b['recall']:.3f}; {b['tp'] + b['fn']} "
              f"positives held out); with rounding: F1 {r['f1']:.3f}; MSE {m['heldout_mse']:.3f}; exact "
              f"{m['heldout_exact_acc']:.3f}")
        return 0
    if cmd == "score":
        from pocketlm.data.edu import EduScorer
        from pocketlm.data.readers import list_files, read_documents

        list_files(args.file)  # a missing file: DataPipelineError naming it
        docs = list(read_documents(args.file))
        for d, s in zip(docs, EduScorer(args.head).score([d.text for d in docs])):
            print(f"{s:.2f}\t{d.id}")
        return 0
    raise DataPipelineError(f"unknown data command {cmd!r}")  # argparse prevents this


def main(argv: list[str] | None = None) -> int:  # usable before the lead registers the verb
    parser = argparse.ArgumentParser(prog="pocketlm data")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
