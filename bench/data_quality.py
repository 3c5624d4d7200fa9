"""The data-quality experiment ("data quality beats size", the Phi-3 report's claim): same model, same token budget, same optimizer and schedule, trained on
(a) unfiltered corpus text, (b) the data pipeline's mixture (filtered + dedup + knowledge-demotion + procedural
synthetic) or (c) the same mixture with teacher-written synthetic data in place of the procedural synthetic
(the paper's "filtered web + LLM-synthetic" against "filtered web + procedural"), evaluated on held-out sets
that no arm saw. Several seeds per arm; mean +- std over seeds.

    python bench/data_quality.py prepare --teacher-data DIR   # held-out sets + every arm's token shards (once)
    python bench/data_quality.py run       # train + evaluate every (arm, seed) not finished yet (resumable)
    python bench/data_quality.py run --arms unfiltered & python bench/data_quality.py run --arms data-optimal \
        --no-init & python bench/data_quality.py run --arms data-optimal+teacher --no-init &
                                           # the same, one process per arm
    python bench/data_quality.py report    # table, plot, JSON, Markdown into bench/results/data_quality.*
    python bench/data_quality.py all       # the three in order
    python bench/data_quality.py smoke --work /tmp/dq-smoke   # a seconds-long end-to-end cut (tiny corpus)

Design (every choice is a flag; the defaults are the recorded run):
- Held-out documents: `pocketlm.eval.heldout.is_heldout(id)` (sha256 of a salted id < 2%) are removed from every
  arm before tokenization; the held-out sets are built from them (`heldout.build`), and the arithmetic items (and
  the held-out synthetic lessons) are decontaminated against the training arms' synthetic documents: the
  pipeline's procedural lessons and, when --teacher-data is given, the teacher documents (an item whose question
  occurs in any of them is dropped from the held-out set).
- Arm a "unfiltered": documents of every corpus file (`--corpus`/*.jsonl) drawn at random per source up to a byte
  quota proportional to the file's size (raw-web sampling), tokenized with no filter or dedup: one token stream.
- Arm b "data-optimal": the pipeline run's last-stage part files (`--pipeline`/parts/<last stage>/<source>), with
  the run's mixture selection (`exclude_demoted` in phase 2) re-applied and held-out ids removed, re-tokenized
  into one shard folder per (phase, source); sampling weight of a source = its tokens x the mixture's weight
  (the recipe's "upsampling factor" convention, pocketlm.recipe.recipes). Phase 1 takes the first 2/3 of the
  steps, phase 2 (filtered web without demoted documents + synthetic x2) the rest.
- Arm c "data-optimal+teacher": arm b's shards and weights, except that in phase 2 the procedural synthetic
  source(s) (the pipeline config's sources of kind "synthetic") are replaced by one stream of teacher documents
  with the same sampling weight, so it has the same share of phase 2 as the procedural lessons have in arm b:
  only what fills the synthetic slot differs (the teacher stream, usually larger, is repeated less; the report
  gives the epochs). Teacher documents come from `--teacher-data` DIR (`pocketlm data teacher` outputs):
  chats.jsonl (required) and knowledge.jsonl (optional), {"messages": [...]} records, each rendered as plain
  text, user turns as "Question: ..." and assistant turns as "Answer: ...", separated by blank lines, the system
  prompt (an instruction to the teacher, not content) left out; lessons.jsonl (optional), {"id", "text"}
  records, as written. A last line without a newline (a teacher still writing) is ignored. The rendering shares
  "Question:"/"Answer:" with the held-out arithmetic prompt ("Question: q\nAnswer:"); the procedural lessons
  end with "Answer: N." too. Held-out leakage, after the held-out sets exist: a teacher document is dropped when
  it contains a held-out arithmetic question (normalised substring, `heldout.arith_items`' rule; none when the
  teacher documents were given to the held-out build), equals a held-out synthetic lesson, or shares a 13-gram
  with a held-out web document or cloze item (`pocketlm.data.decontam.DecontamIndex`, the pipeline's decontam
  stage). `prepare` without --teacher-data skips arm c and says so; with it on a prepared --work, it adds arm c
  against the held-out sets already built (their arithmetic items are then kept and the teacher documents that
  contain one are dropped instead).
- Training: `pocketlm.train.loop.Trainer` (the real trainer), preset `nano`, seq_len 256, batch 8 rows (2,048
  tokens per step), AdamW lr 2e-3 with WSD (10 warmup steps, linear decay over the last 20%), weight decay 0.1,
  grad clip 1.0, 144 steps (294,912 tokens) per run. The run's seed sets both the initial weights and the data
  order. One torch thread per process (measured on the shared machine under load: 1 thread ~870 tokens/s, 2
  threads ~390 tokens/s for nano), one process per arm.
- Token budget (--tokens): enough that at least one arm is clearly above chance on the held-out MC sets, or the
  MC columns cannot tell the arms apart. The report says, per arm and MC set, whether the mean accuracy is more
  than 2 standard errors above chance (0.25), with SE = sqrt(seed variance / seeds + per-item SE^2) (the seeds
  share the items, so the item error does not shrink with seeds). At 294,912 tokens (the recorded two-arm run)
  both arms were clearly above chance on cloze and below chance on arithmetic. Time per (arm, seed) ~ tokens /
  tokens-per-s + evaluation: at ~870 tokens/s 294,912 tokens train in ~6 min; the recorded run (two processes on
  the shared machine) trained at 300-430 tokens/s, 11-16 min, and evaluated in 1-2.5 min.
- Evaluation: `heldout.evaluate_heldout` (acc / acc_norm of 4-way MC, chance 0.25; bits per byte), 1 torch thread
  (on this shared 2-core machine one thread is ~6x faster than two for the per-item forwards). A randomly
  initialised nano (seed 0) is evaluated too, as the floor.
- Output: bench/results/data_quality.{json,md,png}: per arm mean +- std over seeds, per-seed values, whether each
  MC mean is clearly above chance, the differences between arms (b - a, c - a, c - b) with their standard errors
  over seeds, loss curves; the Markdown section holds the exact commands (for the README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pocketlm.data.records import read_part  # noqa: E402
from pocketlm.data.shards import ShardWriter  # noqa: E402
from pocketlm.eval import heldout  # noqa: E402
from pocketlm.fsutil import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TEACHER = "data-optimal+teacher"
ARMS = ("unfiltered", "data-optimal", TEACHER)
# --teacher-data files: (name, record kind); chats.jsonl is required
TEACHER_FILES = (("chats.jsonl", "chat"), ("knowledge.jsonl", "chat"), ("lessons.jsonl", "lesson"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tok():
    from pocketlm.tokenizer import Tokenizer
    return Tokenizer.default()


def _write_stream(folder: Path, texts: list[str], tok) -> dict:
    if folder.exists():
        idx = json.loads((folder / "index.json").read_text())
        return {"tokens": idx["num_tokens"], "documents": idx["num_documents"]}
    with ShardWriter(folder, dtype="uint16", shard_tokens=1 << 24, eos_id=tok.eos_id) as w:
        for t in texts:
            w.add(tok.encode(t))
    idx = json.loads((folder / "index.json").read_text())
    return {"tokens": idx["num_tokens"], "documents": idx["num_documents"]}


# ---------------------------------------------------------------- prepare
def prepare(args) -> dict:
    work, corpus, pipe = Path(args.work), Path(args.corpus), Path(args.pipeline)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    done = data / "prepared.json"
    if done.exists():
        out = json.loads(done.read_text())
        if "arm_c" in out or not args.teacher_data:
            log(f"prepare: {done} exists, skipping" + ("" if "arm_c" in out else f" ({NO_TEACHER})"))
            return out
        log(f"prepare: {done} exists; adding the {TEACHER} arm against its held-out sets")
        out["arm_c"] = prepare_teacher(read_teacher(Path(args.teacher_data)), out, work, _tok(), args,
                                       heldout_excludes_teacher=False)
        atomic_write_text(done, json.dumps(out, indent=1) + "\n")
        return out
    tok = _tok()
    t0 = time.time()
    pconf = json.loads((pipe / "config.json").read_text())
    mixture = json.loads((pipe / "tokens" / "mixture.json").read_text())
    last = _last_stage(pipe)
    synth_names = _synthetic_sources(pipe)
    synth_texts = [d.text for name in synth_names for f in sorted((pipe / "parts" / last / name).glob("*.jsonl"))
                   for d in read_part(f)]
    teacher = read_teacher(Path(args.teacher_data)) if args.teacher_data else None
    if teacher is not None and not set(synth_names) & set(mixture.get("phase2", {})):
        raise SystemExit(f"{pipe}: phase 2 of the mixture has no synthetic source ({synth_names or 'none'}) for the "
                         f"{TEACHER} arm to take the place of")
    log(f"prepare: pipeline {pipe} (last stage {last!r}, {len(synth_texts)} synthetic documents), corpus {corpus}"
        + (f", {len(teacher)} teacher documents" if teacher is not None else ""))

    # held-out sets, decontaminated against every arm's synthetic documents
    manifest = heldout.build(work / "heldout", corpus_dir=corpus, n_arith=args.n_arith, n_cloze=args.n_cloze,
                             n_synth=args.n_synth, web_bytes=args.web_bytes,
                             exclude_texts=synth_texts + [d["text"] for d in teacher or []])
    log(f"prepare: held-out sets {manifest['arith']['items']} arith, {manifest['cloze']['items']} cloze, "
        f"{manifest['ppl']['web_bytes']} web bytes, {manifest['ppl']['synthetic_docs']} synthetic docs "
        f"({manifest['heldout_documents']} held-out documents)")

    # arm a: raw corpus, per-source byte quota proportional to file size
    files = sorted(corpus.glob("*.jsonl"))
    sizes = {f.stem: f.stat().st_size for f in files}
    total = sum(sizes.values())
    budget = args.raw_tokens * args.bytes_per_token
    texts, per_src, removed_a = [], {}, 0
    for f in files:
        docs = [d for d in heldout.read_corpus_file(f)]
        keep = [d for d in docs if not heldout.is_heldout(d["id"])]
        removed_a += len(docs) - len(keep)
        random.Random(f"dq-raw:{f.stem}").shuffle(keep)
        quota, used, n = budget * sizes[f.stem] / total, 0, 0
        for d in keep:
            if used >= quota:
                break
            texts.append(d["text"])
            used += len(d["text"].encode("utf-8"))
            n += 1
        per_src[f.stem] = {"documents": n, "bytes": used}
    random.Random("dq-raw:order").shuffle(texts)
    a_stats = _write_stream(data / "a" / "raw", texts, tok)
    log(f"prepare: arm a {a_stats['tokens']:,} tokens from {a_stats['documents']} documents "
        f"({removed_a} held-out documents removed) in {time.time() - t0:.0f}s")

    # arm b: the pipeline's mixture, re-tokenized without the held-out ids
    from pocketlm.data.pipeline import _selected
    b_sources, removed_b = {}, 0
    for phase in sorted(mixture):
        for src, spec in sorted(mixture[phase].items()):
            folder = data / "b" / phase / src
            docs = [d for f in sorted((pipe / "parts" / last / src).glob("*.jsonl")) for d in read_part(f)
                    if _selected(d, spec["select"])]
            keep = [d.text for d in docs if not heldout.is_heldout(d.id)]
            removed_b += len(docs) - len(keep)
            if not keep:
                log(f"prepare: arm b {phase}/{src}: no documents, left out")
                continue
            st = _write_stream(folder, keep, tok)
            if st["tokens"] <= args.seq_len + 1:
                log(f"prepare: arm b {phase}/{src}: {st['tokens']} tokens < one row, left out")
                continue
            b_sources[f"{phase}/{src}"] = {"path": str(folder), "tokens": st["tokens"], "documents": st["documents"],
                                           "mixture_weight": spec["weight"], "phase": phase}
    log(f"prepare: arm b {sum(v['tokens'] for v in b_sources.values()):,} tokens in {len(b_sources)} folders "
        f"({removed_b} held-out document copies removed) in {time.time() - t0:.0f}s")
    out = {"arm_a": {"path": str(data / "a" / "raw"), **a_stats, "per_source": per_src,
                     "heldout_removed": removed_a, "corpus": str(corpus)},
           "arm_b": {"sources": b_sources, "heldout_removed": removed_b, "pipeline": str(pipe),
                     "synthetic_sources": synth_names,
                     "pipeline_stage": last, "pipeline_config": pconf.get("out")},
           "heldout": manifest}
    if teacher is None:
        log(f"prepare: {NO_TEACHER}")
    else:
        out["arm_c"] = prepare_teacher(teacher, out, work, tok, args, heldout_excludes_teacher=True)
    out["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(done, json.dumps(out, indent=1) + "\n")
    return out


NO_TEACHER = (f"no --teacher-data: the {TEACHER} arm is not prepared (give --teacher-data DIR, a "
              "`pocketlm data teacher` output folder with chats.jsonl and optionally knowledge.jsonl, lessons.jsonl)")


def chat_text(messages: list[dict]) -> str:
    """A teacher chat as a plain pretraining document: "Question: <user>\\n\\nAnswer: <assistant>" per turn, no system
    prompt (it is an instruction to the teacher, not content)."""
    label = {"user": "Question", "assistant": "Answer"}
    return "\n\n".join(f"{label[m['role']]}: {m['content'].strip()}" for m in messages if m["role"] in label)


def read_teacher(folder: Path) -> list[dict]:
    """The teacher documents of a `pocketlm data teacher` folder: [{"id", "text", "file"}] (see TEACHER_FILES)."""
    if not (folder / "chats.jsonl").is_file():
        raise SystemExit(f"--teacher-data {folder}: no chats.jsonl (a `pocketlm data teacher --kind chats` output)")
    docs = []
    for name, kind in TEACHER_FILES:
        path = folder / name
        if not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8")
        lines = raw.split("\n")
        if lines[-1]:
            log(f"prepare: {path}: last line has no newline (still being written?), ignored")
        for n, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = chat_text(rec["messages"]) if kind == "chat" else rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise SystemExit(f"{path} line {n}: not a teacher {kind} record ({type(e).__name__}: {e})") from None
            if not isinstance(text, str) or not text.strip():
                raise SystemExit(f"{path} line {n}: empty {kind}")
            docs.append({"id": rec.get("id", f"{name}:{n}"), "text": text, "file": name})
    if not docs:
        raise SystemExit(f"--teacher-data {folder}: no complete teacher records")
    return docs


def _teacher_leaks(docs: list[dict], heldout_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """(teacher documents without held-out items, number dropped per reason): a held-out arithmetic question as a
    normalised substring (`heldout.arith_items`' rule), a held-out synthetic lesson's exact text (`heldout.build`'s
    rule), or a 13-gram of a held-out web document or cloze item (the pipeline's decontam stage)."""
    import hashlib

    from pocketlm.data.decontam import DecontamIndex

    def items(name: str) -> list[dict]:
        return [json.loads(x) for x in (heldout_dir / name).read_text(encoding="utf-8").splitlines() if x.strip()]

    arith = [heldout.normalise(it["expression"] if it["kind"] == "expression" else
                               it["context"].removeprefix("Question: ").removesuffix("\nAnswer:"))
             for it in items("heldout-arith/test.jsonl")]
    synth = {hashlib.sha1(heldout.normalise(d["text"]).encode()).hexdigest()
             for d in items("heldout-ppl/synthetic.jsonl")}
    index = DecontamIndex()
    for d in items("heldout-ppl/web.jsonl"):
        index.add(f"heldout-ppl:{d['id']}", d["text"])
    for it in items("heldout-cloze/test.jsonl"):
        index.add(f"heldout-cloze:{it['id']}", it["context"] + it["choices"][it["gold"]])
    kept, dropped = [], {}
    for d in docs:
        norm = heldout.normalise(d["text"])
        why = ("heldout-arith" if any(q in norm for q in arith) else
               "heldout-synthetic" if hashlib.sha1(norm.encode()).hexdigest() in synth else
               "heldout-web-or-cloze" if index.match(d["text"]) else None)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            kept.append(d)
    return kept, dropped


def prepare_teacher(docs: list[dict], prepared: dict, work: Path, tok, args, *,
                    heldout_excludes_teacher: bool) -> dict:
    """Arm c's phase-2 teacher stream: decontaminated, shuffled, tokenized; weighted like the synthetic it replaces."""
    replaces = _synth_keys(prepared)
    if not replaces:
        raise SystemExit(f"arm b has no phase-2 synthetic source for the {TEACHER} arm to take the place of")
    weight = sum(prepared["arm_b"]["sources"][k]["tokens"] * prepared["arm_b"]["sources"][k]["mixture_weight"]
                 for k in replaces)
    kept, dropped = _teacher_leaks(docs, work / "heldout")
    texts = [d["text"] for d in kept]
    random.Random("dq-teacher:order").shuffle(texts)
    folder = work / "data" / "c" / "phase2" / "teacher"
    st = _write_stream(folder, texts, tok)
    if st["tokens"] <= args.seq_len + 1:
        raise SystemExit(f"{args.teacher_data}: {st['tokens']} teacher tokens after decontamination, less than one "
                         f"{args.seq_len}-token row")
    files = {name: sum(d["file"] == name for d in kept) for name, _ in TEACHER_FILES}
    log(f"prepare: arm c {st['tokens']:,} teacher tokens from {st['documents']} documents "
        f"({', '.join(f'{n} {k}' for k, n in files.items() if n)}; dropped as held-out leaks: {dropped or 'none'}), "
        f"in place of {', '.join(replaces)}")
    return {"path": str(folder), **st, "phase": "phase2", "mixture_weight": weight / st["tokens"],
            "replaces": replaces, "teacher_data": str(args.teacher_data), "documents_per_file": files,
            "heldout_leaks_dropped": dropped, "heldout_excludes_teacher": heldout_excludes_teacher}


def _synthetic_sources(pipe: Path) -> list[str]:
    """Names of the pipeline config's synthetic sources (procedural lessons)."""
    conf = json.loads((pipe / "config.json").read_text())
    return [s["name"] for s in conf.get("sources", []) if s.get("kind") == "synthetic"]


STAGE_ORDER = ("read", "filter", "dedup", "edu", "knowledge", "decontam")  # pocketlm.data.pipeline.enabled_stages


def _last_stage(pipe: Path) -> str:
    """The last stage whose part files exist: what the pipeline's pack step tokenizes."""
    have = [s for s in STAGE_ORDER if (pipe / "parts" / s).is_dir()]
    if not have:
        raise SystemExit(f"{pipe}/parts: no stage folders; is this a `pocketlm data run` output?")
    return have[-1]


# ---------------------------------------------------------------- train + evaluate
def arm_sources(arm: str, prepared: dict) -> dict[str, dict]:
    """An arm's shard folders: {"<phase>/<source>": {"path", "tokens", "mixture_weight", "phase"}} (arms b and c)."""
    srcs = dict(prepared["arm_b"]["sources"])
    if arm == TEACHER:
        if "arm_c" not in prepared:
            raise SystemExit(f"the {TEACHER} arm is not prepared: run `prepare --teacher-data DIR` first")
        c = prepared["arm_c"]
        srcs = {k: v for k, v in srcs.items() if k not in c["replaces"]}
        srcs["phase2/teacher"] = {k: c[k] for k in ("path", "tokens", "mixture_weight", "phase")}
    return srcs


def train_config(arm: str, seed: int, prepared: dict, args):
    from pocketlm.train.config import OptimConfig, Phase, ScheduleConfig, TrainConfig
    steps = max(2, args.tokens // (args.batch_size * args.seq_len))
    s1 = max(1, round(steps * 2 / 3))
    if arm == "unfiltered":
        sources = {"raw": prepared["arm_a"]["path"]}
        phases = (Phase("phase1", s1, {"raw": 1.0}), Phase("phase2", steps - s1, {"raw": 1.0}))
    else:
        srcs = arm_sources(arm, prepared)
        sources = {k.replace("/", "-"): v["path"] for k, v in srcs.items()}
        w = {ph: {k.replace("/", "-"): v["tokens"] * v["mixture_weight"] for k, v in srcs.items() if v["phase"] == ph}
             for ph in ("phase1", "phase2")}
        phases = (Phase("phase1", s1, w["phase1"]), Phase("phase2", steps - s1, w["phase2"]))
    return TrainConfig(
        task="pretrain", model=args.model, model_overrides=json.loads(args.model_overrides), sources=sources,
        phases=phases, seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.batch_size,
        optim=OptimConfig(lr=args.lr, weight_decay=0.1), seed=seed,
        schedule=ScheduleConfig(kind="wsd", warmup_steps=args.warmup, decay_fraction=0.2),
        save_every=args.save_every, keep_checkpoints=1, tensorboard=False, plot=False, num_threads=args.threads)


def run_one(arm: str, seed: int, prepared: dict, args) -> dict:
    import torch

    import pocketlm
    from pocketlm.train.loop import Trainer
    from pocketlm.train.metrics import read_metrics
    run_dir = Path(args.work) / "runs" / f"{arm}-s{seed}"
    result_file = run_dir / "heldout.json"
    if result_file.exists():
        log(f"{arm} seed {seed}: done already ({result_file})")
        return json.loads(result_file.read_text())
    cfg = train_config(arm, seed, prepared, args)
    t0 = time.time()
    trainer = Trainer(cfg, run_dir, resume="auto", progress=False)
    if trainer.step:
        log(f"{arm} seed {seed}: resuming at step {trainer.step}")
    trainer.run()
    train_s = time.time() - t0
    records = read_metrics(run_dir)
    log(f"{arm} seed {seed}: trained {cfg.total_steps} steps, {records[-1]['tokens']:,} tokens in {train_s:.0f}s "
        f"(final loss {records[-1]['loss']:.3f})")
    del trainer
    t1 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = pocketlm.load(str(run_dir / "model"))
        res = heldout.evaluate_heldout(model, _tok(), Path(args.work) / "heldout", seq_len=args.seq_len)
    finally:
        torch.set_num_threads(threads)
    out = {"arm": arm, "seed": seed, "steps": cfg.total_steps, "tokens": records[-1]["tokens"],
           "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t1, 1),
           "tokens_per_s": records[-1]["tokens"] / train_s, "final_loss": records[-1]["loss"],
           "loss_curve": [[r["step"], r["loss"]] for r in records], "config_hash": cfg.hash(), **res}
    atomic_write_text(result_file, json.dumps(out, indent=1) + "\n")
    log(f"{arm} seed {seed}: bpb web {res['bpb-web']['bits_per_byte']:.3f} synth "
        f"{res['bpb-synthetic']['bits_per_byte']:.3f} arith {res['heldout-arith']['acc']:.3f} cloze "
        f"{res['heldout-cloze']['acc']:.3f} (eval {time.time() - t1:.0f}s)")
    return out


def run_init(prepared: dict, args) -> dict:
    import torch

    import pocketlm
    out_file = Path(args.work) / "runs" / "init-s0" / "heldout.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = pocketlm.load(args.model, seed=0) if not json.loads(args.model_overrides) else _override_model(args)
    res = heldout.evaluate_heldout(model, _tok(), Path(args.work) / "heldout", seq_len=args.seq_len)
    out = {"arm": "random-init", "seed": 0, **res}
    atomic_write_text(out_file, json.dumps(out, indent=1) + "\n")
    log(f"random init: bpb web {res['bpb-web']['bits_per_byte']:.3f} arith {res['heldout-arith']['acc']:.3f} "
        f"cloze {res['heldout-cloze']['acc']:.3f}")
    return out


def _override_model(args):
    import torch

    from pocketlm.config import preset
    from pocketlm.formats import hf
    config = preset(args.model).replace(**json.loads(args.model_overrides))
    return hf.init_weights(hf.empty_model(config, torch.float32, "cpu"), seed=0)


def run(args) -> None:
    prepared = json.loads((Path(args.work) / "data" / "prepared.json").read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = ([a.strip() for a in args.arms.split(",")] if args.arms else
            [a for a in ARMS if a != TEACHER or "arm_c" in prepared])
    if set(arms) - set(ARMS):
        raise SystemExit(f"--arms {args.arms}: arms are {', '.join(ARMS)}")
    t0 = time.time()
    if not args.no_init:
        run_init(prepared, args)
    for seed in seeds:  # interleave arms so that a cut-short experiment still has every arm
        for arm in arms:
            run_one(arm, seed, prepared, args)
    log(f"run: all {len(seeds) * len(arms)} runs finished ({time.time() - t0:.0f}s this invocation)")


# ---------------------------------------------------------------- report
METRICS = [("bpb-web", "held-out web bits/byte", "lower"), ("bpb-synthetic", "held-out synthetic bits/byte", "lower"),
           ("heldout-arith", "arithmetic MC acc", "higher"), ("heldout-cloze", "cloze MC acc", "higher")]
MC_SETS = (("heldout-arith", "Arithmetic MC"), ("heldout-cloze", "Cloze MC"))
# differences reported: (arm, baseline); a pair is left out when either arm has no finished runs
PAIRS = (("data-optimal", "unfiltered"), (TEACHER, "unfiltered"), (TEACHER, "data-optimal"))
COLORS = {"unfiltered": "#d62728", "data-optimal": "#1f77b4", TEACHER: "#2ca02c"}


def _value(r: dict, key: str, norm: bool = False) -> float:
    if key.startswith("bpb"):
        return r[key]["bits_per_byte"]
    return r[key]["acc_norm" if norm else "acc"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def above_chance(s: dict, key: str) -> dict:
    """Is an arm's mean MC accuracy more than 2 standard errors above chance? SE = sqrt(seed variance / seeds +
    per-item SE^2): every seed is scored on the same items, so the item sampling error does not average out."""
    m = s[key]
    se = math.sqrt(m["std"] ** 2 / len(s["seeds"]) + m["item_stderr_mean"] ** 2)
    margin = m["mean"] - heldout.CHANCE
    return {"margin": margin, "stderr": se, "z": margin / se if se else None,
            "clearly_above": margin > 2 * se if se else margin > 0}


def report(args) -> dict:
    work = Path(args.work)
    runs = [json.loads(p.read_text()) for p in sorted(work.glob("runs/*/heldout.json"))]
    prepared = json.loads((work / "data" / "prepared.json").read_text())
    init = next((r for r in runs if r["arm"] == "random-init"), None)
    by_arm = {a: sorted([r for r in runs if r["arm"] == a], key=lambda r: r["seed"]) for a in ARMS}
    missing = [a for a in ARMS[:2] if not by_arm[a]]
    if missing:
        raise SystemExit(f"report: no finished runs for {missing} in {work}/runs")
    if not by_arm[TEACHER]:
        log(f"report: no finished {TEACHER} runs; reporting the other arms")
        del by_arm[TEACHER]
    summary: dict = {}
    for arm, rs in by_arm.items():
        s = {"seeds": [r["seed"] for r in rs], "tokens": rs[0]["tokens"], "steps": rs[0]["steps"],
             "train_seconds_mean": _mean_std([r["train_seconds"] for r in rs])[0],
             "eval_seconds_mean": _mean_std([r["eval_seconds"] for r in rs])[0],
             "tokens_per_s_mean": _mean_std([r["tokens_per_s"] for r in rs])[0]}
        for key, _, _ in METRICS:
            vals = [_value(r, key) for r in rs]
            s[key] = {"mean": _mean_std(vals)[0], "std": _mean_std(vals)[1], "per_seed": vals}
            if not key.startswith("bpb"):
                nv = [_value(r, key, norm=True) for r in rs]
                s[key + "_norm"] = {"mean": _mean_std(nv)[0], "std": _mean_std(nv)[1], "per_seed": nv}
                s[key]["n_items"] = rs[0][key]["n"]
                s[key]["item_stderr_mean"] = _mean_std([r[key]["acc_stderr"] for r in rs])[0]
                s[key]["above_chance"] = above_chance(s, key)
        s["final_train_loss"] = _mean_std([r["final_loss"] for r in rs])
        summary[arm] = s
    # differences between arms measured in the same experiment, with their standard errors over seeds
    diffs = {}
    for arm, base in PAIRS:
        if arm not in summary or base not in summary:
            continue
        o, b = summary[arm], summary[base]
        d = {}
        for key, _, better in METRICS:
            se = math.sqrt(o[key]["std"] ** 2 / len(o["seeds"]) + b[key]["std"] ** 2 / len(b["seeds"]))
            d[key] = {"difference": o[key]["mean"] - b[key]["mean"], "stderr_over_seeds": se, "better": better,
                      "ratio": o[key]["mean"] / b[key]["mean"] if b[key]["mean"] else None}
        diffs[f"{arm} - {base}"] = {"arm": arm, "baseline": base, **d}
    steps = summary["unfiltered"]["steps"]
    result = {"summary": summary, "differences": diffs, "random_init": init,
              "chance": {"heldout-arith": heldout.CHANCE, "heldout-cloze": heldout.CHANCE},
              "clearly_above_chance": {key: [a for a in summary if summary[a][key]["above_chance"]["clearly_above"]]
                                       for key, _ in MC_SETS},
              "setup": {"work": str(work), "corpus": prepared["arm_a"].get("corpus", args.corpus),
                        "pipeline": prepared["arm_b"].get("pipeline", args.pipeline),
                        "model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size,
                        "lr": args.lr, "heldout": prepared["heldout"], "arm_a_tokens": prepared["arm_a"]["tokens"],
                        "arm_b_tokens": sum(v["tokens"] for v in prepared["arm_b"]["sources"].values()),
                        "heldout_removed": {"arm_a": prepared["arm_a"]["heldout_removed"],
                                            "arm_b": prepared["arm_b"]["heldout_removed"]},
                        "composition": _shares(prepared, list(summary), steps, round(steps * 2 / 3))},
              "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in runs]}
    result["setup"]["synthetic_slot"] = _synthetic_slot(prepared, result["setup"]["composition"],
                                                        summary["unfiltered"]["tokens"])
    if TEACHER in summary:
        c = prepared["arm_c"]
        result["setup"]["arm_c"] = {k: v for k, v in c.items() if k != "path"}
        result["setup"]["heldout_removed"]["arm_c_leaks"] = c["heldout_leaks_dropped"]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "data_quality.json", json.dumps(result, indent=1) + "\n")
    table = _table(result)
    print(table)
    print(_chance_table(result))
    png = _plot(by_arm, result, out / "data_quality.png")
    atomic_write_text(out / "data_quality.md", _markdown(result, table, png, args))
    log(f"report: wrote {out / 'data_quality.json'}, {out / 'data_quality.md'}" + (f", {png}" if png else ""))
    return result


def _fmt(s: dict, key: str, digits: int = 3) -> str:
    return f"{s[key]['mean']:.{digits}f} ± {s[key]['std']:.{digits}f}"


def _table(result: dict) -> str:
    rows = ["| arm | seeds | held-out web bits/byte ↓ | held-out synthetic bits/byte ↓ | arithmetic MC acc ↑ "
            "(acc_norm) | cloze MC acc ↑ (acc_norm) |", "|---|---|---|---|---|---|"]
    for arm, s in result["summary"].items():
        rows.append(f"| {arm} | {len(s['seeds'])} | {_fmt(s, 'bpb-web')} | {_fmt(s, 'bpb-synthetic')} | "
                    f"{_fmt(s, 'heldout-arith')} ({_fmt(s, 'heldout-arith_norm')}) | "
                    f"{_fmt(s, 'heldout-cloze')} ({_fmt(s, 'heldout-cloze_norm')}) |")
    init = result.get("random_init")
    if init:
        rows.append(f"| random init (no training) | 1 | {init['bpb-web']['bits_per_byte']:.3f} | "
                    f"{init['bpb-synthetic']['bits_per_byte']:.3f} | {init['heldout-arith']['acc']:.3f} "
                    f"({init['heldout-arith']['acc_norm']:.3f}) | {init['heldout-cloze']['acc']:.3f} "
                    f"({init['heldout-cloze']['acc_norm']:.3f}) |")
    rows.append(f"| chance | | | | {heldout.CHANCE:.3f} | {heldout.CHANCE:.3f} |")
    for d in result["differences"].values():
        cells = [f"{d[key]['difference']:+.3f} ± {d[key]['stderr_over_seeds']:.3f}" for key, _, _ in METRICS]
        rows.append(f"| {d['arm']} − {d['baseline']} | | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _chance_table(result: dict) -> str:
    rows = ["| arm | " + " | ".join(f"{name}: acc − chance (SE), clearly above?" for _, name in MC_SETS) + " |",
            "|---|" + "---|" * len(MC_SETS)]
    for arm, s in result["summary"].items():
        cells = []
        for key, _ in MC_SETS:
            a = s[key]["above_chance"]
            cells.append(f"{a['margin']:+.3f} ({a['stderr']:.3f}): "
                         + (f"yes, {a['z']:.1f} SE" if a["clearly_above"] else "no"))
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(by_arm: dict, result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("report: matplotlib is not installed; no plot")
        return None
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.4))
    for ax, (key, title, better) in zip(axes[:4], METRICS):
        arms = list(result["summary"])
        means = [result["summary"][a][key]["mean"] for a in arms]
        stds = [result["summary"][a][key]["std"] for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=6, color=[COLORS[a] for a in arms])
        ax.tick_params(axis="x", labelsize=8)
        for i, a in enumerate(arms):
            ax.scatter([i] * len(by_arm[a]), result["summary"][a][key]["per_seed"], color="k", s=12, zorder=3)
        if not key.startswith("bpb"):
            ax.axhline(heldout.CHANCE, ls="--", color="gray", label="chance")
            ax.legend(loc="lower right", fontsize=8)
        else:  # zoom in: the arms differ by far less than the bars' height
            lo = min(m - s for m, s in zip(means, stds))
            hi = max(m + s for m, s in zip(means, stds))
            vals = [v for a in arms for v in result["summary"][a][key]["per_seed"]]
            lo, hi = min(lo, *vals), max(hi, *vals)
            pad = max(hi - lo, 1e-3) * 0.5
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{title} ({better} is better)", fontsize=10)
    ax = axes[4]
    for arm, rs in by_arm.items():
        for i, r in enumerate(rs):
            steps, losses = zip(*r["loss_curve"])
            ax.plot(steps, losses, color=COLORS[arm], alpha=0.7, lw=1, label=arm if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (own data; not comparable across arms)")
    ax.set_title("training loss", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(f"Data quality at small scale: {result['setup']['model']}, "
                 f"{result['summary']['unfiltered']['tokens']:,} tokens per run, "
                 f"mean ± std over {len(by_arm['unfiltered'])} seeds", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _markdown(result: dict, table: str, png: Path | None, args) -> str:
    s, setup = result["summary"], result["setup"]
    ho = setup["heldout"]
    u = s["unfiltered"]
    c = setup.get("arm_c")
    comp = setup["composition"]
    teacher_txt = ""
    if c:
        per_file = ", ".join(f"{n} from {k}" for k, n in c["documents_per_file"].items() if n)
        leaks = ", ".join(f"{n} {k}" for k, n in c["heldout_leaks_dropped"].items()) or "none"
        teacher_txt = (f"; **{TEACHER}** = the same phase 1 and phase-2 web documents as data-optimal, with the "
                       f"procedural synthetic lessons replaced by teacher-written documents at the same share of "
                       f"phase 2 ({100 * comp[TEACHER].get('teacher', 0):.0f}% of the arm's tokens): {c['documents']} "
                       f"documents ({per_file}; {c['tokens']:,} tokens) written by `pocketlm data teacher`, chats "
                       "rendered as \"Question: …\" / \"Answer: …\" paragraphs; teacher documents dropped as "
                       f"held-out leaks: {leaks}")
    arms_txt = ", ".join(s)
    lines = [
        "## The data-quality experiment (small scale)",
        "",
        f"Same model (`{args.model}` preset, {args.seq_len}-token rows, {args.batch_size} rows per step), same "
        f"token budget ({u['tokens']:,} tokens = {u['steps']} steps per run), same optimizer and schedule (AdamW, "
        f"lr {args.lr}, WSD); only the training data differs: **unfiltered** = corpus documents sampled in proportion "
        f"to each file's size, no filtering or dedup; **data-optimal** = the data pipeline's output (filtered, "
        f"deduplicated, knowledge-demoted documents removed in phase 2, plus procedural synthetic lessons in phase 2)"
        f"{teacher_txt}. "
        f"{len(u['seeds'])} seeds per arm (the seed sets the initial weights and the data order); mean ± standard "
        f"deviation over seeds. Held-out sets (`pocketlm.eval.heldout`): {ho['heldout_documents']} corpus documents "
        f"(2% by a salted hash of their id) removed from every arm before training; {ho['arith']['items']} arithmetic "
        f"word problems / expressions as 4-way multiple choice (decontaminated against the arms' synthetic "
        f"documents{' and teacher documents' if c and c['heldout_excludes_teacher'] else ''}: "
        f"{ho['arith']['dropped_decontam_or_duplicate']} dropped), {ho['cloze']['items']} 4-way cloze "
        f"items from held-out documents, bits per byte on {ho['ppl']['web_bytes']:,} bytes of held-out documents "
        f"(the first 4,000 characters of each, sources taken in turn, so about equal bytes per corpus file) "
        f"and on {ho['ppl']['synthetic_docs']} held-out synthetic lessons. Chance = 0.25 on both MC sets.",
        "",
        table,
        "",
        f"Per-item standard error of one run's accuracy: about "
        f"{u['heldout-arith']['item_stderr_mean']:.3f} (arithmetic) and "
        f"{u['heldout-cloze']['item_stderr_mean']:.3f} (cloze); the ± in the table is the spread over "
        "seeds, and the ± of the difference rows is the standard error of the difference of the two means over seeds.",
        "",
        "Above chance? Mean accuracy − 0.25, with its standard error sqrt(seed variance / seeds + per-item SE²) "
        "(the seeds share the items); \"yes\" when the mean is more than 2 standard errors above chance:",
        "",
        _chance_table(result),
        "",
    ]
    if png:
        lines += [f"![data quality](bench/results/{png.name})", ""]
    init = result.get("random_init") or {}
    notes = [f"Scale: each run is {u['tokens']:,} tokens (~{u['train_seconds_mean'] / 60:.1f} min at "
             f"{u['tokens_per_s_mean']:,.0f} tokens/s on a shared 2-core CPU, plus "
             f"~{u['eval_seconds_mean'] / 60:.1f} min of evaluation), a tiny fraction of what Phi-3 trained "
             f"on; read the numbers as what ~{u['tokens'] / 1e3:,.0f}k tokens of each kind of data teach a "
             f"{args.model} model, not as a statement about reasoning at scale."]
    for key, name in MC_SETS:
        above = result["clearly_above_chance"][key]
        below = [a for a in s if s[a][key]["mean"] < heldout.CHANCE]
        txt = f"{name}: "
        if below:
            txt += (f"{', '.join(below)} below chance (0.25)"
                    + (f", as is the untrained model ({init[key]['acc']:.3f})" if init else "") +
                    "; a model that has not learned the task ranks the choices by biases of its number/word "
                    "likelihoods, not at random. ")
        if above:
            txt += f"{', '.join(above)} clearly (> 2 SE) above chance. "
        else:
            txt += (f"No arm is clearly above chance: at {u['tokens']:,} tokens per run this set cannot tell the arms "
                    "apart; a run with more `--tokens` (in a new `--work`) is needed for it. ")
        notes.append(txt.strip())
    notes.append("Composition (needed to read the bits/byte columns; not tested as a cause): " + _composition(result)
                 + "".join(f"; {v['what']} are {100 * v['share']:.0f}% of the {arm} arm's tokens (phase 2 only), "
                           f"{v['epochs']:.1f} epochs of their {v['tokens']:,} tokens per run"
                           for arm, v in setup["synthetic_slot"].items()) + ". The "
                 "held-out web documents come from every corpus file in turn, including the files the filters "
                 "remove almost entirely" + (" (the GCIDE dictionary: 0 documents pass)"
                                             if "gcide" in setup["composition"].get("unfiltered", {}) else "")
                 + ", so they are closer to the unfiltered arm's distribution; the held-out synthetic lessons come from the same generators as "
                 "the data-optimal arm's synthetic share (other seeds, decontaminated), which only that arm saw.")
    lines += ["Result, in words: " + _verdict(result), ""] + [f"- {n}" for n in notes] + [""]
    td = f" --teacher-data {c['teacher_data']}" if c else ""
    lines += [
              "Exact commands (from the repository root, in the project's virtualenv):",
              "",
              "```sh",
              "bash scripts/build-corpus.sh                             # the corpus: data/corpus/*.jsonl",
              "pocketlm data run src/pocketlm/data/assets/pipeline-example.json   # arm b's data: data/pipeline-out",
              f"python bench/data_quality.py prepare --work {setup['work']} --corpus "
              f"{setup.get('corpus', args.corpus)} --pipeline {setup.get('pipeline', args.pipeline)}{td}",
              f"# the arms ({arms_txt}) in one process of one torch thread each:"]
    for i, arm in enumerate(s):
        lines.append(f"python bench/data_quality.py run --work {setup['work']} --seeds {args.seeds} --tokens "
                     f"{args.tokens} --arms {arm}{' --no-init' if i else ''} &")
    lines += ["wait",
              f"python bench/data_quality.py report --work {setup['work']}",
              "```", "",
              "Each `run` skips finished runs and resumes an interrupted one from its last checkpoint.", ""]
    return "\n".join(lines)


def _composition(result: dict) -> str:
    comp = result["setup"].get("composition", {})
    parts = []
    for arm, shares in comp.items():
        top = sorted(shares.items(), key=lambda kv: -kv[1])[:4]
        parts.append(f"{arm} = " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in top) + " (largest shares of tokens)")
    return "; ".join(parts)


def _synthetic_slot(prepared: dict, comp: dict, tokens: int) -> dict:
    """Per arm with synthetic data: its share of the run's tokens and how many times that stream is seen."""
    keys = _synth_keys(prepared)
    n = sum(prepared["arm_b"]["sources"][k]["tokens"] for k in keys)
    out = {}
    if keys:
        share = sum(comp["data-optimal"].get(k.split("/", 1)[1], 0.0) for k in keys)
        out["data-optimal"] = {"what": "procedural synthetic lessons", "share": share, "tokens": n,
                               "epochs": share * tokens / n}
    if TEACHER in comp:
        share, n = comp[TEACHER].get("teacher", 0.0), prepared["arm_c"]["tokens"]
        out[TEACHER] = {"what": "teacher documents", "share": share, "tokens": n, "epochs": share * tokens / n}
    return out


def _synth_keys(prepared: dict) -> list[str]:
    """Arm b's phase-2 synthetic sources, as "phase2/<name>"."""
    b = prepared["arm_b"]
    names = b.get("synthetic_sources")
    if names is None:  # a prepared.json written before the list was recorded
        names = _synthetic_sources(Path(b["pipeline"]))
    return [k for k, v in b["sources"].items() if v["phase"] == "phase2" and k.split("/", 1)[1] in names]


def _shares(prepared: dict, arms: list[str], steps: int, s1: int) -> dict:
    """Expected share of training tokens per corpus source in each arm."""
    a = prepared["arm_a"]["per_source"]
    tb = sum(v["bytes"] for v in a.values()) or 1
    out = {"unfiltered": {k: v["bytes"] / tb for k, v in a.items()}}
    for arm in arms[1:]:
        srcs, b = arm_sources(arm, prepared), {}
        for ph, frac in (("phase1", s1 / steps), ("phase2", (steps - s1) / steps)):
            tot = sum(v["tokens"] * v["mixture_weight"] for v in srcs.values() if v["phase"] == ph) or 1
            for k, v in srcs.items():
                if v["phase"] == ph:
                    name = k.split("/", 1)[1]
                    b[name] = b.get(name, 0.0) + frac * v["tokens"] * v["mixture_weight"] / tot
        out[arm] = b
    return out


def _verdict(result: dict) -> str:
    out = []
    for d in result["differences"].values():
        parts = []
        for key, title, better in METRICS:
            diff, se = d[key]["difference"], d[key]["stderr_over_seeds"]
            good = diff < 0 if better == "lower" else diff > 0
            sig = abs(diff) > 2 * se if se > 0 else abs(diff) > 0
            parts.append(f"{title}: {'better' if good else 'worse'} by {abs(diff):.3f}"
                         f"{'' if sig else ' (within 2 standard errors over seeds: not a clear difference)'}")
        out.append(f"{d['arm']} against {d['baseline']}: " + "; ".join(parts) + ".")
    return " ".join(out)


# ---------------------------------------------------------------- smoke
def smoke(args) -> None:
    """A seconds-long cut on a generated corpus + pipeline layout: checks the script end to end, not the result."""
    from pocketlm.data import synthetic
    from pocketlm.data.records import write_part
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    corpus, pipe = work / "corpus", work / "pipeline"
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    words = ("the river runs past an old mill where the miller grinds wheat into flour every morning while birds "
             "sing and children play near the water under a bright sky").split()
    docs = {}
    for src in ("alpha", "beta"):
        recs = []
        for i in range(300):
            sents = [" ".join(rng.choice(words) for _ in range(rng.randint(9, 16))).capitalize() + "." for _ in range(6)]
            recs.append({"id": f"{src}/{i:04d}", "text": " ".join(sents), "metadata": {"source": src}})
        (corpus / f"{src}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        docs[src] = recs
    from pocketlm.data.records import Document
    syn, _ = synthetic.generate(60, seed=0)
    parts = {"alpha": [Document(r["id"], r["text"], r["metadata"]) for r in docs["alpha"]],
             "beta": [Document(r["id"], r["text"], r["metadata"]) for r in docs["beta"][:150]], "synthetic": syn}
    for src, ds in parts.items():
        (pipe / "parts" / "filter" / src).mkdir(parents=True)
        write_part(pipe / "parts" / "filter" / src / "g00000-0000.jsonl", ds)
    (pipe / "config.json").write_text(json.dumps({"out": str(pipe), "sources": [
        {"name": "alpha", "path": str(corpus / "alpha.jsonl"), "kind": "web"},
        {"name": "beta", "path": str(corpus / "beta.jsonl"), "kind": "web"},
        {"name": "synthetic", "kind": "synthetic", "count": 60, "seed": 0}],
        "filters": {"gopher_repetition": {}}, "dedup": None, "edu": None, "knowledge": None, "decontam": None,
        "mixture": {}}))
    mix = {"phase1": {"alpha": {"weight": 1.0, "select": {}}, "beta": {"weight": 1.0, "select": {}}},
           "phase2": {"alpha": {"weight": 1.0, "select": {}}, "synthetic": {"weight": 2.0, "select": {}}}}
    (pipe / "tokens").mkdir(parents=True)
    (pipe / "tokens" / "mixture.json").write_text(json.dumps(mix))
    _smoke_teacher(work / "teacher", docs["alpha"], n_arith=12)
    args.corpus, args.pipeline, args.teacher_data = str(corpus), str(pipe), str(work / "teacher")
    args.n_arith, args.n_cloze, args.n_synth, args.web_bytes, args.raw_tokens = 12, 12, 6, 4000, 30_000
    args.seeds, args.tokens, args.seq_len, args.batch_size, args.save_every = "0,1", 4 * 2 * 32, 32, 2, 2
    args.model_overrides = json.dumps({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                                       "num_attention_heads": 2, "num_key_value_heads": 2,
                                       "max_position_embeddings": 256})
    args.results = str(work / "results")
    prepare(args)
    run(args)
    report(args)


def _smoke_teacher(folder: Path, alpha: list[dict], n_arith: int) -> None:
    """A fake `pocketlm data teacher` folder. Planted: chat "arith-0" asks the first held-out arithmetic question
    (the held-out build must drop that item, the chat stays), lesson "leak-0" holds the first held-out alpha
    document (in the held-out web set; the 13-gram check must drop it), and chats.jsonl ends in a torn line."""
    folder.mkdir(parents=True)
    rng = random.Random(1)
    q0 = heldout.arith_items(n_arith)[0][0]["context"].removeprefix("Question: ").removesuffix("\nAnswer:")
    chats = [{"id": "teacher-chat/arith-0", "messages": [
        {"role": "user", "content": q0}, {"role": "assistant", "content": "I work it out step by step."}]}]
    for i in range(40):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        chats.append({"id": f"teacher-chat/{i:03d}", "messages": [
            {"role": "system", "content": "You are a helpful teacher."},
            {"role": "user", "content": f"A farmer has {a} sheep and buys {b} more. How many sheep are there now?"},
            {"role": "assistant", "content": f"The farmer had {a} sheep and bought {b}, so {a} + {b} = {a + b}. "
                                             f"The answer is {a + b}."}]})
    torn = '{"id": "teacher-chat/torn", "mes'  # a teacher still writing
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats) + torn)
    facts = [("Paris", "France"), ("Rome", "Italy"), ("Madrid", "Spain"), ("Lisbon", "Portugal")]
    (folder / "knowledge.jsonl").write_text("".join(json.dumps({"id": f"teacher-chat/k{i}", "messages": [
        {"role": "user", "content": f"What is the capital of {c}?"},
        {"role": "assistant", "content": f"The capital of {c} is {city}, a large and old city."}]}) + "\n"
        for i, (city, c) in enumerate(facts)))
    leak = next(d for d in alpha if heldout.is_heldout(d["id"]))
    lessons = [{"id": "teacher-lesson/leak-0", "text": "Lesson: the mill. " + leak["text"]},
               {"id": "teacher-lesson/000", "text": "Lesson: fractions. A fraction names a part of a whole: one half "
                "of eight apples is four apples, and one quarter of eight apples is two apples."}]
    (folder / "lessons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lessons))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["prepare", "run", "report", "all", "smoke"])
    p.add_argument("--work", default="runs/data-quality", help="run outputs (default runs/data-quality)")
    p.add_argument("--corpus", default="data/corpus", help="scripts/build-corpus.sh output (default data/corpus)")
    p.add_argument("--pipeline", default="data/pipeline-out",
                   help="a finished `pocketlm data run` output (default data/pipeline-out, what "
                        "src/pocketlm/data/assets/pipeline-example.json writes)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=None, help=f"which arms to run, of {', '.join(ARMS)} (default: every prepared "
                   "arm; one `run` process per arm shares a 2-core machine better than one process with two threads)")
    p.add_argument("--teacher-data", default=None, metavar="DIR",
                   help=f"prepare: a `pocketlm data teacher` output folder (chats.jsonl; optionally knowledge.jsonl, "
                   f"lessons.jsonl) for the {TEACHER} arm; without it that arm is skipped")
    p.add_argument("--no-init", action="store_true", help="skip evaluating the randomly initialised model")
    p.add_argument("--tokens", type=int, default=294_912,
                   help="training tokens per run (default 294,912 = 144 steps). Choose enough that at least one arm "
                   "is clearly (> 2 standard errors) above chance on the held-out MC sets; the report says so per arm "
                   "and set (in the recorded two-arm run at the default, cloze was, arithmetic was not). Time per "
                   "run ~ tokens / (300-870 tokens/s on one thread) + 1-2.5 min of evaluation")
    p.add_argument("--model", default="nano")
    p.add_argument("--model-overrides", default="{}", help="JSON Phi3Config fields changed on the preset")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (1: on the shared 2-core "
                   "machine 1 thread trained nano at ~870 tokens/s, 2 threads at ~390)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--raw-tokens", type=int, default=3_000_000, help="approximate size of arm a's token stream")
    p.add_argument("--bytes-per-token", type=float, default=3.5)
    p.add_argument("--n-arith", type=int, default=400)
    p.add_argument("--n-cloze", type=int, default=400)
    p.add_argument("--n-synth", type=int, default=120)
    p.add_argument("--web-bytes", type=int, default=120_000)
    args = p.parse_args(argv)
    if args.command == "smoke":
        args.threads = 1
        smoke(args)
        return 0
    if args.command in ("prepare", "all"):
        prepare(args)
    if args.command in ("run", "all"):
        run(args)
    if args.command in ("report", "all"):
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
