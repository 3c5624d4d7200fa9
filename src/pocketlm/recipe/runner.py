"""The recipe's step graph: data -> chat data -> pretraining phase 1 -> phase 2 -> SFT -> DPO -> quantize -> eval
-> report, each step resumable, with inputs hashed so that a changed recipe never silently reuses stale outputs.

Layout of a recipe folder `out/`:

    recipe.json                  the resolved recipe
    steps/<step>.json            completion marker: {"step", "hash", "seconds", "finished", "summary"}, written
                                 atomically after the step's outputs
    data/                        `pocketlm data run` output (tokens/phase1, tokens/phase2, report/)
    chat/sft.jsonl, prefs.jsonl  SFT conversations and DPO pairs (`pocketlm.data.chatgen`)
    chat/tokens/                 more conversations rendered in the chat format, a phase-2 token source
    pretrain/, sft/, dpo/        `pocketlm.train` run folders (checkpoints/, metrics.jsonl, loss.png, model/)
    quant/model.<scheme>.gguf    the final model quantized
    eval/results.json            held-out tasks per model, sample chats at temperature 0
    report/report.md, report.html, *.png

Skipping and resuming: a step whose marker holds the step's current input hash is skipped. A step without a
marker runs; the training steps then continue from their run's newest complete checkpoint (the trainer's exact
`--resume auto`), the data step from the pipeline's per-part markers. A marker whose hash differs (the recipe,
the data generator's code or an upstream step changed) stops the run with `RecipeChanged`, unless `rebuild` is
set: then that step's outputs and every later step's are deleted and rebuilt. Hashes chain: each step's hash
covers its own settings and the hashes of the steps it reads, so a change flows downstream.

Deadline (`deadline`, from `--max-minutes`): training runs in chunks that end at checkpoints; before a chunk the
runner estimates its time from the last one and, if it would end past the deadline, stops with `Paused` (the
command's exit code 3). Running the command again resumes there. Made for 10-minute GPU leases that start bare:
`pack_data` writes the outputs of the data steps (and their markers) to one .tar.gz in the repository, and
`unpack_data` restores them on the GPU machine, where there is no corpus.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import pocketlm
from pocketlm.errors import PocketLMError
from pocketlm.fsutil import atomic_write_bytes, atomic_write_text, sha256_file
from pocketlm.recipe.recipes import Recipe, fingerprint

STEPS = ("data", "chat-data", "pretrain-phase1", "pretrain-phase2", "sft", "dpo", "quantize", "eval", "report")
DATA_STEPS = ("data", "chat-data")
# the folders each step writes (relative to out/); deleted on rebuild
OUTPUTS = {"data": ("data",), "chat-data": ("chat", "heldout"), "pretrain-phase1": ("pretrain",), "pretrain-phase2": (),
           "sft": ("sft",), "dpo": ("dpo",), "quantize": ("quant",), "eval": ("eval",), "report": ("report",)}


class RecipeError(PocketLMError, RuntimeError):
    """A recipe run cannot go on: missing corpus or data, bad archive, a step that failed its checks."""


class RecipeChanged(RecipeError):
    """A finished step was run with different inputs than the recipe now gives it."""


class Paused(Exception):
    """Stopped cleanly at a checkpoint before the deadline; running again resumes. Not an error."""


@dataclass
class Context:
    recipe: Recipe
    out: Path
    corpus: Path | None = None
    teacher: Path | None = None
    """`--teacher-data DIR`: the `pocketlm data teacher` outputs (see `teacher_files`)."""
    baseline: Path | None = None
    """`--baseline MODEL`: a model the eval step scores beside the run's (e.g. the default model it replaces)."""
    device: str = "cpu"
    deadline: float | None = None
    """time.time() by which the run must have stopped (None: no limit)."""
    progress: bool = True
    rebuild: bool = False
    stream: TextIO = sys.stderr
    hashes: dict[str, str] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


# ---- hashing ---------------------------------------------------------------------------------------------------

def _module_source_hash(name: str) -> str | None:
    """sha256 of a module's source file (so a changed generator re-runs its step), None when it is missing."""
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return None
    return fingerprint(Path(spec.origin).read_text(encoding="utf-8"))


def _heldout_salt() -> str:
    from pocketlm.eval.heldout import SALT  # the split is sha256(SALT + id) < fraction
    return SALT


def _normalize(obj, out: Path):
    """Replace the out folder in paths by "<out>" so the hash does not depend on where the run lives."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return json.loads(text.replace(json.dumps(str(out))[1:-1], "<out>"))


def step_inputs(ctx: Context, step: str) -> dict:
    """Everything the outputs of `step` depend on (besides the steps it reads, whose hashes are included)."""
    r = ctx.recipe
    if step == "data":
        return {"sources": r.corpus_sources, "corpus_docs": r.corpus_docs, "synthetic": r.synthetic_docs,
                "pipeline": r.pipeline,
                "weights": [r.phase1_weights, r.phase2_weights], "seed": r.data_seed,
                "heldout": r.heldout_fraction, "heldout_salt": _heldout_salt(),
                "pipeline_code": _module_source_hash("pocketlm.data.pipeline")}
    if step == "chat-data":
        d = {"chat": r.chat_conversations, "text": r.chat_text_conversations, "prefs": r.preference_pairs,
             "seed": r.data_seed, "heldout_items": r.heldout_items,
             "generator": _module_source_hash("pocketlm.data.chatgen"),
             "up": ctx.hashes["data"]}
        if r.teacher_data:  # the teacher's files by content: new teacher data rebuilds from here on
            d["teacher"] = {name: sha256_file(p)[:16] for name, p in sorted(teacher_files(ctx).items())}
            d["teacher_repeat"] = [r.teacher_sft_repeat, r.teacher_text_repeat]
        return d
    if step in ("pretrain-phase1", "pretrain-phase2"):
        up = ctx.hashes["pretrain-phase1"] if step == "pretrain-phase2" else [ctx.hashes["data"],
                                                                               ctx.hashes["chat-data"]]
        return {"config": _normalize(pretrain_config(ctx).to_dict(), ctx.out), "up": up}
    if step == "sft":
        return {"config": _normalize(sft_config(ctx).to_dict(), ctx.out),
                "up": [ctx.hashes["pretrain-phase2"], ctx.hashes["chat-data"]]}
    if step == "dpo":
        return {"config": _normalize(dpo_config(ctx).to_dict(), ctx.out),
                "up": [ctx.hashes["sft"], ctx.hashes["chat-data"]]}
    if step == "quantize":
        return {"scheme": r.quant_scheme, "up": ctx.hashes["dpo"]}
    if step == "eval":
        return {"limit": r.eval_limit, "simple_qa": r.simple_qa, "baseline": _baseline_id(ctx),
                "prompts": r.sample_prompts, "max_tokens": r.sample_max_tokens,
                "heldout": _module_source_hash("pocketlm.eval.heldout"), "up": ctx.hashes["quantize"]}
    if step == "report":
        return {"code": _module_source_hash("pocketlm.recipe.report"), "up": ctx.hashes["eval"]}
    raise AssertionError(step)


# ---- training configs --------------------------------------------------------------------------------------------

def _train_common(ctx: Context, spec, *, task: str, model: str, sources: dict, phases: tuple, schedule=None):
    from pocketlm.train.config import OptimConfig, ScheduleConfig, TrainConfig
    r = ctx.recipe
    schedule = schedule or ScheduleConfig(kind=spec.schedule, warmup_steps=spec.warmup_steps,
                                          min_lr_ratio=spec.min_lr_ratio)
    return TrainConfig(task=task, model=model, model_overrides=dict(r.model_overrides) if task == "pretrain" else {},
                       sources=sources, phases=phases, seq_len=spec.seq_len, batch_size=spec.batch_size,
                       micro_batch_size=spec.micro_batch_size,
                       optim=OptimConfig(lr=spec.lr, weight_decay=spec.weight_decay), schedule=schedule,
                       seed=r.seed, compile=r.compile and ctx.device == "cuda", save_every=spec.save_every,
                       keep_checkpoints=2, tensorboard=False, plot=True, num_threads=r.threads,
                       dpo_beta=r.dpo_beta, cpu_bf16=r.cpu_bf16)


def pretrain_sources(ctx: Context) -> tuple[dict[str, str], dict[str, float], dict[str, float]]:
    """Trainer sources ("p1.<src>", "p2.<src>", "p2.chat") and the two phases' normalised weights, from the data
    pipeline's mixture.json: share = tokens x the recipe's upsampling factor."""
    r = ctx.recipe
    mix_path = ctx.path("data", "tokens", "mixture.json")
    if not mix_path.is_file():
        raise RecipeError(f"{mix_path}: missing; the data step has not finished")
    mixture = json.loads(mix_path.read_text())
    seq = r.phase1.seq_len
    sources, w1, w2 = {}, {}, {}
    for phase, factors, weights, prefix in (("phase1", r.phase1_weights, w1, "p1"),
                                            ("phase2", r.phase2_weights, w2, "p2")):
        for src, info in sorted(mixture.get(phase, {}).items()):
            factor = float(factors.get(src, factors.get("*", 1.0)))
            if info["tokens"] <= 4 * (seq + 1) or factor <= 0:
                continue  # too small to give rows (or dropped)
            name = f"{prefix}.{src}"
            sources[name] = str(ctx.path("data", "tokens", info["path"]))
            weights[name] = info["tokens"] * factor
    for src, folder in (("chat", "tokens"), ("teacher", "teacher_tokens")):  # phase-2-only token sources
        index = ctx.path("chat", folder, "index.json")
        if index.is_file() and r.phase2_weights.get(src, 0) > 0:
            tokens = json.loads(index.read_text())["num_tokens"]
            sources[f"p2.{src}"] = str(ctx.path("chat", folder))
            w2[f"p2.{src}"] = tokens * float(r.phase2_weights[src])
    for phase, w in (("phase1", w1), ("phase2", w2)):
        if not w:
            raise RecipeError(f"{phase}: no data source has enough tokens for rows of {seq + 1}; see "
                              f"{ctx.path('data', 'report', 'report.md')}")
        total = sum(w.values())
        for k in w:
            w[k] = round(w[k] / total, 6)
    return sources, w1, w2


def pretrain_config(ctx: Context):
    from pocketlm.train.config import Phase, ScheduleConfig
    r = ctx.recipe
    sources, w1, w2 = pretrain_sources(ctx)
    total = r.phase1.steps + r.phase2.steps
    # one schedule over both phases: warmup, flat, and the decay over phase 2 (annealing on the best data)
    schedule = ScheduleConfig(kind=r.phase1.schedule, warmup_steps=r.phase1.warmup_steps,
                              min_lr_ratio=r.phase1.min_lr_ratio, decay_fraction=r.phase2.steps / total)
    return _train_common(ctx, r.phase1, task="pretrain", model=r.preset, sources=sources, schedule=schedule,
                         phases=(Phase("phase1", r.phase1.steps, w1), Phase("phase2", r.phase2.steps, w2)))


def sft_config(ctx: Context):
    from pocketlm.train.config import Phase
    r = ctx.recipe
    return _train_common(ctx, r.sft, task="sft", model=str(ctx.path("pretrain", "model")),
                         sources={"chat": str(ctx.path("chat", "sft.jsonl"))},
                         phases=(Phase("sft", r.sft.steps, {"chat": 1.0}),))


def dpo_config(ctx: Context):
    from pocketlm.train.config import Phase
    r = ctx.recipe
    return _train_common(ctx, r.dpo, task="dpo", model=str(ctx.path("sft", "model")),
                         sources={"prefs": str(ctx.path("chat", "prefs.jsonl"))},
                         phases=(Phase("dpo", r.dpo.steps, {"prefs": 1.0}),))


# ---- steps ---------------------------------------------------------------------------------------------------------

def corpus_fingerprint(corpus: Path, names: list[str]) -> dict[str, int]:
    out = {}
    for n in names:
        f = corpus / f"{n}.jsonl"
        if not f.is_file():
            raise RecipeError(f"corpus {corpus}: no {f.name} (build it with scripts/build-corpus.sh, or pass "
                              "--corpus DIR)")
        out[n] = f.stat().st_size
    return out


def _corpus_records(corpus: Path, names: list[str], limit: int | None = None):
    """(source, line, record) of each document of the named corpus files (the first `limit` of each file)."""
    for n in names:
        with open(corpus / f"{n}.jsonl", encoding="utf-8") as f:
            count = 0
            for line in f:
                if limit is not None and count >= limit:
                    break
                if line.strip():
                    count += 1
                    yield n, line, json.loads(line)


def write_training_copy(corpus: Path, names: list[str], folder: Path, fraction: float,
                        limit: int | None = None) -> dict[str, int]:
    """Copy the corpus files without the held-out documents (`heldout.is_heldout(id)`); {source: held out}."""
    from pocketlm.eval.heldout import is_heldout
    folder.mkdir(parents=True, exist_ok=True)
    held: dict[str, int] = {n: 0 for n in names}
    lines: dict[str, list[str]] = {n: [] for n in names}
    for n, line, rec in _corpus_records(corpus, names, limit):
        if is_heldout(str(rec.get("id")), fraction):
            held[n] += 1
        else:
            lines[n].append(line if line.endswith("\n") else line + "\n")
    for n in names:
        atomic_write_text(folder / f"{n}.jsonl", "".join(lines[n]))
    return held


def run_data(ctx: Context) -> dict:
    """The data pipeline over the recipe's corpus sources plus synthetic lessons (`pocketlm data run`)."""
    from pocketlm.data.pipeline import PipelineConfig, run as run_pipeline
    r = ctx.recipe
    if ctx.corpus is None:
        raise RecipeError("the data step needs the corpus: pass --corpus DIR (the output of "
                          "scripts/build-corpus.sh), or --data-archive FILE from `--pack-data`")
    names = [n for n, _ in r.corpus_sources]
    sizes = corpus_fingerprint(ctx.corpus, names)
    held = write_training_copy(ctx.corpus, names, ctx.path("data", "input"), r.heldout_fraction, r.corpus_docs)
    # kind "reference": a curated glossary (WordNet's "lemma (pos): gloss" lines) read as web text but without the
    # prose filters, which drop nearly all of it (measured: 12.6 MB of glosses -> 132k tokens kept)
    sources = [{"name": n, "kind": "web" if k == "reference" else k,
                "path": str(ctx.path("data", "input", f"{n}.jsonl")), **({"filters": {}} if k == "reference" else {})}
               for n, k in r.corpus_sources]
    if r.synthetic_docs:
        sources.append({"name": "synthetic", "kind": "synthetic", "count": r.synthetic_docs, "seed": r.data_seed})
    def factor(weights, n):
        return float(weights.get(n, weights.get("*", 1.0)))
    mixture = {"phase1": {n: {"weight": factor(r.phase1_weights, n)} for n in names},
               "phase2": {n: {"weight": factor(r.phase2_weights, n), "exclude_demoted": True} for n in names}}
    if r.synthetic_docs:
        mixture["phase2"]["synthetic"] = {"weight": factor(r.phase2_weights, "synthetic")}
    d = {"out": str(ctx.path("data")), "sources": sources, "mixture": mixture, "workers": 2,
         "progress": ctx.progress, **r.pipeline}
    cfg = PipelineConfig.from_dict(d)
    rep = run_pipeline(cfg)
    stages = {k: {kk: v[kk] for kk in ("docs_in", "docs_out", "tokens_in", "tokens_out")}
              for k, v in rep.get("stages", {}).items()}
    mix = json.loads(ctx.path("data", "tokens", "mixture.json").read_text())
    shutil.rmtree(ctx.path("data", "input"))  # the parts/ of the pipeline hold the documents from here on
    return {"corpus_bytes": sizes, "heldout_documents": held, "stages": stages,
            "tokens": {ph: sum(v["tokens"] for v in m.values()) for ph, m in mix.items()}}


TEACHER_FILES = {"chats": "chats.jsonl", "knowledge": "knowledge.jsonl", "prefs": "prefs.jsonl",
                 "lessons": "lessons.jsonl"}


def teacher_files(ctx: Context) -> dict[str, Path]:
    """{kind: path} of the teacher files in `--teacher-data DIR` (`TEACHER_FILES`; chats.jsonl is required)."""
    r = ctx.recipe
    if ctx.teacher is None:
        raise RecipeError(f"recipe {r.name} trains on teacher data: pass --teacher-data DIR, a folder with "
                          "chats.jsonl (and optionally knowledge.jsonl, prefs.jsonl, lessons.jsonl) from "
                          "`pocketlm data teacher --kind chats|prefs|lessons`")
    if not Path(ctx.teacher).is_dir():
        raise RecipeError(f"--teacher-data {ctx.teacher}: not a folder")
    found = {k: Path(ctx.teacher) / f for k, f in TEACHER_FILES.items() if (Path(ctx.teacher) / f).is_file()}
    if "chats" not in found:
        raise RecipeError(f"--teacher-data {ctx.teacher}: no chats.jsonl (write it with `pocketlm data teacher "
                          "--kind chats --out DIR/chats.jsonl ...`)")
    return found


def _read_teacher(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The records of a teacher JSONL file that have `keys`; a malformed line names the file and line."""
    from pocketlm.data.records import read_records
    return read_records(path, keys, error=RecipeError)


def load_teacher(ctx: Context) -> dict[str, list[dict]]:
    """{"chats": SFT conversations (chats + knowledge), "prefs": DPO pairs, "lessons": documents}; the SFT and
    DPO records without the teacher's `meta`/`id` fields (the trainer's formats)."""
    files = teacher_files(ctx)
    chats = []
    for kind in ("chats", "knowledge"):
        if kind in files:
            chats += [{"messages": c["messages"]} for c in _read_teacher(files[kind], ("messages",))]
    prefs = ([{k: p[k] for k in ("prompt", "chosen", "rejected")}
              for p in _read_teacher(files["prefs"], ("prompt", "chosen", "rejected"))] if "prefs" in files else [])
    lessons = _read_teacher(files["lessons"], ("text",)) if "lessons" in files else []
    return {"chats": chats, "prefs": prefs, "lessons": lessons}


def run_chat_data(ctx: Context) -> dict:
    """SFT conversations, DPO pairs and the chat-formatted phase-2 text, from `pocketlm.data.chatgen`."""
    try:
        from pocketlm.data.chatgen import generate_chat, generate_prefs
    except ImportError as e:
        raise RecipeError(f"the chat-data step needs pocketlm.data.chatgen ({e})") from None
    from pocketlm.chat import render
    from pocketlm.data.shards import ShardWriter
    from pocketlm.tokenizer import Tokenizer
    r = ctx.recipe
    corpus = str(ctx.corpus) if ctx.corpus is not None else None
    folder = ctx.path("chat")
    folder.mkdir(parents=True, exist_ok=True)
    sft = generate_chat(r.chat_conversations, r.data_seed, corpus_dir=corpus)
    prefs = generate_prefs(r.preference_pairs, r.data_seed + 2, corpus_dir=corpus)
    teacher = load_teacher(ctx) if r.teacher_data else {"chats": [], "prefs": [], "lessons": []}
    if r.teacher_data:
        import random
        rng = random.Random(r.data_seed + 3)
        sft = sft + teacher["chats"] * r.teacher_sft_repeat
        prefs = prefs + teacher["prefs"]
        rng.shuffle(sft)
        rng.shuffle(prefs)
    for name, records in (("sft.jsonl", sft), ("prefs.jsonl", prefs)):
        atomic_write_text(folder / name, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in records))
    tok = Tokenizer.default()
    text_tokens = 0
    if r.chat_text_conversations:
        convs = generate_chat(r.chat_text_conversations, r.data_seed + 1, corpus_dir=corpus)
        shards = folder / "tokens"
        if shards.exists():
            shutil.rmtree(shards)
        with ShardWriter(shards, dtype="uint16", shard_tokens=1 << 24, eos_id=None) as w:
            for c in convs:
                ids = render(c["messages"], tok, add_generation_prompt=False)  # ends <|end|><|endoftext|>
                text_tokens += len(ids)
                w.add(ids)
    teacher_tokens = 0
    if r.teacher_data and r.teacher_text_repeat:
        shards = folder / "teacher_tokens"
        if shards.exists():
            shutil.rmtree(shards)
        with ShardWriter(shards, dtype="uint16", shard_tokens=1 << 24, eos_id=None) as w:
            for _ in range(r.teacher_text_repeat):
                for c in teacher["chats"]:
                    ids = render(c["messages"], tok, add_generation_prompt=False)
                    teacher_tokens += len(ids)
                    w.add(ids)
                for d in teacher["lessons"]:
                    ids = tok.encode(d["text"], add_bos=False) + [tok.eos_id]
                    teacher_tokens += len(ids)
                    w.add(ids)
    manifest = build_heldout(ctx, exclude=[m["content"] for c in sft for m in c["messages"] if m["role"] == "user"]
                             + [d["text"] for d in teacher["lessons"]])
    extra = ({"teacher": {"chats": len(teacher["chats"]), "prefs": len(teacher["prefs"]),
                          "lessons": len(teacher["lessons"]), "sft_repeat": r.teacher_sft_repeat,
                          "text_tokens": teacher_tokens}} if r.teacher_data else {})
    return {"sft_conversations": len(sft), "preference_pairs": len(prefs), **extra,
            "chat_text_conversations": r.chat_text_conversations, "chat_text_tokens": text_tokens,
            "heldout": {k: manifest[k] for k in ("heldout_documents", "arith", "cloze", "ppl")}}


def build_heldout(ctx: Context, *, exclude: list[str]) -> dict:
    """The held-out evaluation sets (`pocketlm.eval.heldout.build`) from the held-out documents of the recipe's
    corpus sources, decontaminated against the synthetic lessons and the SFT questions."""
    from pocketlm.data import synthetic
    from pocketlm.eval.heldout import build, is_heldout
    r = ctx.recipe
    if ctx.corpus is None:
        raise RecipeError("the chat-data step needs the corpus (--corpus DIR) for the held-out sets")
    names = [n for n, _ in r.corpus_sources]
    docs = [{"id": str(rec["id"]), "text": rec["text"], "source": n}
            for n, _, rec in _corpus_records(ctx.corpus, names, r.corpus_docs)
            if is_heldout(str(rec.get("id")), r.heldout_fraction)]
    synth = [d.text for d in synthetic.generate(r.synthetic_docs, r.data_seed)[0]] if r.synthetic_docs else []
    return build(ctx.path("heldout"), docs=docs, n_arith=r.heldout_items, n_cloze=r.heldout_items,
                 n_synth=r.heldout_items, exclude_texts=synth + exclude, fraction=r.heldout_fraction)


def _trainer(ctx: Context, cfg, run_dir: Path):
    import torch
    from pocketlm.train.distributed import DistEnv
    from pocketlm.train.loop import Trainer
    if ctx.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda: no CUDA device is available")
    return Trainer(cfg, run_dir, resume="auto", env=DistEnv(device=torch.device(ctx.device)),
                   progress=ctx.progress)


def train_until(ctx: Context, cfg, run_dir: Path, end: int) -> dict:
    """Train `cfg` in `run_dir` up to optimizer step `end` (resuming), in chunks ending at checkpoints; stop with
    `Paused` before a chunk that would cross the deadline. Returns a summary of the records of the run."""
    from pocketlm.train import checkpoint as ckpt
    from pocketlm.train.metrics import read_metrics
    trainer = _trainer(ctx, cfg, run_dir)
    start = trainer.step
    per_step = None
    try:
        while trainer.step < end:
            chunk_end = min(end, (trainer.step // cfg.save_every + 1) * cfg.save_every)
            if ctx.deadline is not None:
                chunk_end = min(chunk_end, trainer.step + affordable_steps(ctx.deadline - time.time(), per_step))
                if chunk_end <= trainer.step:
                    raise Paused(f"{run_dir.name}: stopped at step {trainer.step}/{cfg.total_steps} "
                                 f"({_phase_note(cfg, trainer.step)}) before the deadline")
            t0, s0 = time.perf_counter(), trainer.step
            trainer.run(max_steps=chunk_end)
            last = ckpt.latest(run_dir)
            if last is None or int(last.name.split("-")[1]) != trainer.step:
                trainer.save()  # the chunk ended between the trainer's own checkpoints (a phase boundary)
            per_step = (time.perf_counter() - t0) / max(trainer.step - s0, 1)
    finally:
        if trainer.log is not None and not trainer.log.file.closed:
            trainer.log.close()
    records = [x for x in read_metrics(run_dir) if x["step"] <= end]
    if not records:
        raise RecipeError(f"{run_dir}: no metrics logged")
    last = records[-1]
    window = records[-10:]
    return {"steps": end, "resumed_from": start, "tokens": last["tokens"], "final_loss": last["loss"],
            "loss_last10": sum(x["loss"] for x in window) / len(window),
            "tokens_per_s": sum(x["tokens_per_s"] for x in window) / len(window)}


# seconds kept free at the deadline for the checkpoint a chunk ends with and the step's bookkeeping
DEADLINE_MARGIN_S = 5.0


def affordable_steps(seconds_left: float, per_step: float | None) -> int:
    """How many optimizer steps fit in `seconds_left` at `per_step` seconds each (with a 20% allowance and
    DEADLINE_MARGIN_S for the checkpoint), so that `--max-minutes` is a limit, not a hint. Without a measured
    step time yet, one step: it measures the time, and the next chunk is sized from it."""
    if seconds_left <= DEADLINE_MARGIN_S:
        return 0
    if not per_step:
        return 1
    return max(int((seconds_left - DEADLINE_MARGIN_S) / (per_step * 1.2)), 0)


def _phase_note(cfg, step: int) -> str:
    """Which phase a step falls in, as the progress bar counts: the steps of every phase of the run together."""
    end = 0
    for phase in cfg.phases:
        end += phase.steps
        if step < end:
            return f"in {phase.name}, which ends at step {end}"
    return "all phases done"


def run_phase1(ctx: Context) -> dict:
    cfg = pretrain_config(ctx)
    return {**train_until(ctx, cfg, ctx.path("pretrain"), cfg.phases[0].steps),
            "weights": cfg.phases[0].weights}


def run_phase2(ctx: Context) -> dict:
    cfg = pretrain_config(ctx)
    summary = train_until(ctx, cfg, ctx.path("pretrain"), cfg.total_steps)
    if not ctx.path("pretrain", "model", "config.json").is_file():
        raise RecipeError(f"{ctx.path('pretrain')}: training ended without model/")
    return {**summary, "weights": cfg.phases[1].weights}


def _run_task(ctx: Context, cfg, name: str) -> dict:
    summary = train_until(ctx, cfg, ctx.path(name), cfg.total_steps)
    if not ctx.path(name, "model", "config.json").is_file():
        raise RecipeError(f"{ctx.path(name)}: training ended without model/")
    return summary


def run_sft(ctx: Context) -> dict:
    return _run_task(ctx, sft_config(ctx), "sft")


def run_dpo(ctx: Context) -> dict:
    summary = _run_task(ctx, dpo_config(ctx), "dpo")
    from pocketlm.train.metrics import read_metrics
    recs = read_metrics(ctx.path("dpo"))[-5:]
    for key in ("rewards/accuracies", "rewards/margins"):
        if recs and key in recs[-1]:
            summary[key] = sum(x[key] for x in recs) / len(recs)
    return summary


def quant_path(ctx: Context) -> Path:
    return ctx.path("quant", f"model.{ctx.recipe.quant_scheme}.gguf")


def run_quantize(ctx: Context) -> dict:
    """The final (DPO) model as a GGUF file with `pocketlm quantize`."""
    from pocketlm.quant.commands import run as quantize
    out = quant_path(ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    args = argparse.Namespace(model=str(ctx.path("dpo", "model")), output=str(tmp), scheme=ctx.recipe.quant_scheme,
                              keep_embeddings=None, format="gguf", force=True)
    quantize(args)
    os.replace(tmp, out)
    return {"file": out.name, "bytes": out.stat().st_size}


def _baseline_id(ctx: Context):
    """What identifies `--baseline` for the eval step's hash: its file names and sizes (None without one)."""
    if ctx.baseline is None:
        return None
    p = Path(ctx.baseline)
    if not p.exists():
        raise RecipeError(f"--baseline {p}: no such model folder or file")
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return {f.name: f.stat().st_size for f in files if f.is_file()}


def run_eval(ctx: Context) -> dict:
    from pocketlm.recipe.evaluate import evaluate_models
    # the SFT model is left out: on these budgets DPO moves the held-out numbers very little, and each model
    # costs minutes on the shared CPU; its sample chats are in the DPO row's neighbourhood (see the report)
    q = f"dpo-{ctx.recipe.quant_scheme}"
    models = {"pretrain": ctx.path("pretrain", "model"), "dpo": ctx.path("dpo", "model"), q: quant_path(ctx)}
    chat = ("dpo", q)
    if ctx.baseline is not None:  # scored on this run's held-out sets and simple-qa, like the run's own models
        models["baseline"] = Path(ctx.baseline)
        chat += ("baseline",)
    results = evaluate_models(models, ctx.recipe, chat_models=chat,
                              tokenizer_dir=ctx.path("dpo", "model"), data_dir=ctx.path("heldout"), say=ctx.say,
                              simple_qa=chat if ctx.recipe.simple_qa else ())
    folder = ctx.path("eval")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.json", json.dumps(results, indent=1) + "\n")
    return {"table": results["table"]}


def run_report(ctx: Context) -> dict:
    from pocketlm.recipe.report import write_report
    paths = write_report(ctx.out)
    return {"files": [str(p.relative_to(ctx.out)) for p in paths]}


STEP_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "data": run_data, "chat-data": run_chat_data, "pretrain-phase1": run_phase1, "pretrain-phase2": run_phase2,
    "sft": run_sft, "dpo": run_dpo, "quantize": run_quantize, "eval": run_eval, "report": run_report,
}
assert tuple(STEP_FUNCTIONS) == STEPS


# ---- markers and the driver --------------------------------------------------------------------------------------

def marker_path(out: Path, step: str) -> Path:
    return Path(out) / "steps" / f"{step}.json"


def read_marker(out: Path, step: str) -> dict | None:
    p = marker_path(out, step)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None  # a torn marker counts as absent (markers are written atomically, so this is not expected)


def _clear(ctx: Context, steps: list[str]) -> None:
    for s in steps:
        marker_path(ctx.out, s).unlink(missing_ok=True)
        for rel in OUTPUTS[s]:
            p = ctx.path(rel)
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def run_recipe(ctx: Context, *, until: str | None = None) -> dict:
    """Run (or resume) every step in order, up to and including `until`; return {step: marker}.

    Raises `Paused` at the deadline, `RecipeChanged` when a finished step's inputs changed (without rebuild)."""
    if until is not None and until not in STEPS:
        raise RecipeError(f"--until {until!r} is not a step; steps: {', '.join(STEPS)}")
    ctx.path("steps").mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.path("recipe.json"), json.dumps(ctx.recipe.to_dict(), indent=1) + "\n")
    steps = list(STEPS[:STEPS.index(until) + 1] if until else STEPS)
    done: dict[str, dict] = {}
    t_all = time.perf_counter()
    for i, step in enumerate(steps, 1):
        label = f"[{i}/{len(steps)}] {step:<16}"
        marker = read_marker(ctx.out, step)
        if step in DATA_STEPS and marker is not None and marker.get("from_archive"):
            ctx.hashes[step] = marker["hash"]  # restored data: its inputs (the corpus) are not on this machine
            ctx.say(f"{label} done (from the data archive)")
            done[step] = marker
            continue
        h = fingerprint(step_inputs(ctx, step))
        if marker is not None and marker.get("hash") != h:
            if not ctx.rebuild:
                raise RecipeChanged(f"step {step!r} finished with inputs {marker.get('hash')}, the recipe now gives "
                                    f"{h}: its settings, its code or an earlier step changed. Pass --rebuild to "
                                    f"redo it and every later step, or use a new --out folder than {ctx.out}")
            ctx.say(f"{label} inputs changed: rebuilding it and every later step")
            _clear(ctx, list(STEPS[STEPS.index(step):]))
            marker = None
        ctx.hashes[step] = h
        if marker is not None:
            ctx.say(f"{label} done ({marker['seconds']:.1f}s, skipped)")
            done[step] = marker
            continue
        ctx.say(f"{label} running")
        t0 = time.perf_counter()
        try:
            summary = STEP_FUNCTIONS[step](ctx)
        except Paused:
            note_partial(ctx, step, time.perf_counter() - t0)
            ctx.say(f"{label} paused after {time.perf_counter() - t0:.1f}s (run the same command again to resume)")
            raise
        seconds = time.perf_counter() - t0
        marker = {"step": step, "hash": h, "seconds": round(seconds, 2), "finished": time.time(),
                  "recipe": ctx.recipe.name, "code_version": pocketlm.__version__, "summary": summary}
        # a resumed step's seconds are the last invocation's; earlier invocations add theirs
        prev = ctx.path("steps", f"{step}.partial.json")
        if prev.is_file():
            marker["seconds_earlier_runs"] = json.loads(prev.read_text()).get("seconds", 0.0)
            prev.unlink()
        atomic_write_text(marker_path(ctx.out, step), json.dumps(marker, indent=1) + "\n")
        ctx.say(f"{label} done ({seconds:.1f}s)")
        done[step] = marker
    ctx.say(f"recipe {ctx.recipe.name}: {len(done)} steps complete in {time.perf_counter() - t_all:.1f}s; "
            f"outputs in {ctx.out}")
    return done


def note_partial(ctx: Context, step: str, seconds: float) -> None:
    """Add the seconds of an interrupted (paused) invocation of `step` to its running total."""
    p = ctx.path("steps", f"{step}.partial.json")
    prev = json.loads(p.read_text()).get("seconds", 0.0) if p.is_file() else 0.0
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps({"seconds": prev + seconds}) + "\n")


# ---- carrying the data to a GPU machine --------------------------------------------------------------------------

_PACK = ("data/tokens", "data/report", "chat", "heldout", "steps/data.json", "steps/chat-data.json")  # chat/: teacher too


def pack_data(out: Path, archive: Path) -> dict:
    """Write the data steps' outputs (token shards, mixture, report, chat JSONL and shards, markers) to one
    .tar.gz, atomically. The data steps must be complete."""
    out = Path(out)
    for s in DATA_STEPS:
        if read_marker(out, s) is None:
            raise RecipeError(f"{out}: step {s!r} is not complete; run `pocketlm recipe NAME --until chat-data` "
                              "first")
    Path(archive).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel in _PACK:
            p = out / rel
            if p.exists():
                tar.add(p, arcname=rel)
    atomic_write_bytes(archive, buf.getvalue())
    return {"archive": str(archive), "bytes": len(buf.getvalue())}


def unpack_data(out: Path, archive: Path) -> dict:
    """Restore `pack_data`'s archive into `out` (only where the data markers are missing); mark its markers as
    coming from the archive so they are not re-checked against a corpus this machine lacks."""
    out = Path(out)
    if all(read_marker(out, s) is not None for s in DATA_STEPS):
        return {"restored": False}
    if not Path(archive).is_file():
        raise RecipeError(f"--data-archive {archive}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r:gz") as tar:
        for member in tar.getmembers():
            target = (out / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not str(target).startswith(str(out.resolve())):
                raise RecipeError(f"{archive}: refusing member {member.name!r} (links and paths outside the "
                                  "output folder are not allowed)")
        markers = {}
        for s in DATA_STEPS:
            try:
                markers[s] = json.loads(tar.extractfile(f"steps/{s}.json").read())
            except KeyError:
                raise RecipeError(f"{archive}: no steps/{s}.json; not a `--pack-data` archive") from None
        for rel in _PACK[:4]:
            if (out / rel).exists():
                shutil.rmtree(out / rel)
        tar.extractall(out, filter="data")
    for s, m in markers.items():
        m["from_archive"] = str(archive)
        atomic_write_text(marker_path(out, s), json.dumps(m, indent=1) + "\n")
    return {"restored": True}


def budget_seconds(minutes: float | None) -> float | None:
    if minutes is None:
        return None
    if not math.isfinite(minutes) or minutes <= 0:
        raise RecipeError(f"--max-minutes {minutes} must be a positive number")
    return time.time() + minutes * 60
