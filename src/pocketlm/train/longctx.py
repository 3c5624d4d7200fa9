"""Context extension training, the Phi-3 report's method at small scale: `pocketlm train longctx`.

  pocketlm train longctx --model MODEL_DIR --run-dir runs/long --data text.txt --scale 4 --tokens 200000
  pocketlm train longctx ... --method pi        (or ntk: the baselines, same budget)

Given a model trained at `original` tokens (its config's max_position_embeddings, or `--original`):

1. data: `--data` is a token shard folder (`pocketlm data` output, index.json) or a UTF-8 text file, tokenized
   with the model folder's tokenizer; the last `--search-windows` windows of `target` tokens are held out (the
   factor search's data) and the rest is the fine-tuning set, both written as shard folders under RUN/data/;
2. factors (target = scale x original, s = scale, n = rotary_dim / 2): "longrope" runs LongRoPE's evolutionary
   search on the held-out perplexity at the target length (`pocketlm.longrope_search.search`); "pi" is linear
   position interpolation, lambda_i = s; "ntk" is NTK-aware scaling (theta x s^(d/(d-2))) as per-frequency
   factors lambda_i = s^(2i/(d-2)). Written to RUN/factors.json;
3. RUN/start/ = the model with those factors in config.json exactly as the released 128K models store them:
   `rope_scaling = {"type": "longrope", "long_factor": [...], "short_factor": [1.0, ...]}`,
   `original_max_position_embeddings` = original, `max_position_embeddings` = target. Sequences of at most
   `original` tokens use the short factors (1.0: the original frequencies), longer ones the long factors; both
   carry LongRoPE's magnitude sqrt(1 + ln s / ln original), as the released models do;
4. fine-tuning at the target length (so with the long factors) with the shared trainer (`pocketlm.train.loop`:
   atomic checkpoints, exact `--resume auto`): ceil(tokens / (batch x target)) steps of AdamW, cosine schedule.

The result, RUN/model/, loads with `pocketlm.load` and with transformers' Phi3ForCausalLM (the tokenizer files of
the starting folder are copied beside it). Steps 1-3 are done once (a rerun reuses RUN/data, RUN/factors.json and
RUN/start; a different method or scale in the same run directory is an error).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import ConfigError

METHODS = ("longrope", "pi", "ntk")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def method_factors(method: str, n: int, scale: float) -> list[float]:
    """The closed-form long factors of "pi" (s for every frequency) and "ntk" (s^(2i/(d-2)), d = 2n)."""
    from pocketlm.longrope_search import ntk_factors, pi_factors
    if method == "pi":
        return pi_factors(n, scale)
    if method == "ntk":
        return ntk_factors(n, scale)
    raise ConfigError(f"method {method!r} has no closed-form factors (closed forms: pi, ntk)")


def read_tokens(data: str | Path, model_dir: Path) -> np.ndarray:
    """The token stream of `data`: a shard folder's tokens, or a text file tokenized by the model's tokenizer."""
    from pocketlm.data.shards import ShardSet
    data = Path(data)
    if (data / "index.json").is_file():
        s = ShardSet(data)
        return s.read(0, s.num_tokens)
    if not data.is_file():
        raise ConfigError(f"--data {data}: neither a token shard folder (index.json) nor a text file")
    from pocketlm.tokenizer import Tokenizer
    try:
        text = data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {data}: cannot read it as UTF-8 text: {e}") from None
    return np.asarray(Tokenizer.from_pretrained(model_dir).encode(text), dtype=np.int64)


def prepare(model_dir: str | Path, run_dir: str | Path, data: str | Path, *, scale: float, method: str,
            original: int | None = None, search_windows: int = 2, population: int = 8, generations: int = 4,
            seed: int = 0) -> dict:
    """Steps 1-3 of the module docstring (once per run directory); return RUN/factors.json's content."""
    from pocketlm import load
    from pocketlm.data.shards import write_shards
    from pocketlm.fsutil import atomic_write_text
    from pocketlm.longrope_search import search, write_factors
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {METHODS}")
    model_dir, run = Path(model_dir), Path(run_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: not a checkpoint folder (no config.json)")
    info_path = run / "factors.json"
    if info_path.is_file() and (run / "start" / "config.json").is_file():
        info = json.loads(info_path.read_text())
        if info["method"] != method or info["scale"] != scale or info["model"] != str(model_dir):
            raise ConfigError(f"{run} was prepared for method {info['method']}, scale {info['scale']}, model "
                              f"{info['model']}; use another --run-dir for method {method}, scale {scale}")
        return info
    model = load(str(model_dir), dtype=torch.float32).eval()
    original = int(original or model.config.max_position_embeddings)
    target = int(round(original * scale))
    if scale <= 1 or target <= original:
        raise ConfigError(f"--scale {scale} must make the target length exceed the original {original}")
    n = model.config.rotary_dim // 2
    ids = read_tokens(data, model_dir)
    if ids.size and int(ids.max()) >= model.config.vocab_size:
        raise ConfigError(f"--data {data}: token id {int(ids.max())} >= the model's vocabulary "
                          f"{model.config.vocab_size}")
    held = search_windows * target
    if len(ids) < held + 2 * (target + 1):
        raise ConfigError(f"--data {data}: {len(ids)} tokens; need at least {held + 2 * (target + 1)} "
                          f"({search_windows} held-out windows of {target} + 2 training rows)")
    train_ids, held_ids = ids[:-held], ids[-held:]
    windows = [held_ids[i * target:(i + 1) * target].tolist() for i in range(search_windows)]
    for name, arr in (("train", train_ids), ("heldout", held_ids)):
        if not (run / "data" / name / "index.json").is_file():
            write_shards(run / "data" / name, [arr.tolist()], dtype="uint32" if model.config.vocab_size > 65535
                         else "uint16")
    report: dict = {}
    if method == "longrope":
        res = search(model, windows, target, original=original, population=population, generations=generations,
                     seed=seed)
        long_factor = res.long_factor
        report = {"search_perplexity": res.perplexity, "baselines": res.baselines, "history": res.history,
                  "evaluated": res.evaluated}
    else:
        long_factor = method_factors(method, n, scale)
    start, tmp = run / "start", run / "start.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in model_dir.iterdir():  # config, weights, tokenizer; not a GGUF or card that would lack the factors
        if f.is_file() and (f.suffix in (".json", ".safetensors") or f.name in TOKENIZER_FILES):
            shutil.copy2(f, tmp / f.name)
    write_factors(tmp, long_factor, target, original)
    shutil.rmtree(start, ignore_errors=True)
    tmp.rename(start)
    info = {"method": method, "scale": scale, "model": str(model_dir), "original": original, "target": target,
            "long_factor": [float(x) for x in long_factor], "short_factor": [1.0] * n,
            "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)), **report}
    atomic_write_text(info_path, json.dumps(info, indent=1) + "\n")
    return info


def train_config(run_dir: str | Path, info: dict, *, tokens: int, batch_size: int = 1, lr: float = 1e-4,
                 warmup_steps: int = 2, seed: int = 0, save_every: int = 50, num_threads: int | None = None):
    """The shared trainer's config for step 4: the start folder, fine-tuned at the target length."""
    from pocketlm.train.config import OptimConfig, Phase, ScheduleConfig, TrainConfig
    if tokens <= 0 or batch_size <= 0:
        raise ConfigError(f"--tokens {tokens} and --batch-size {batch_size} must be positive")
    run, target = Path(run_dir), info["target"]
    steps = math.ceil(tokens / (batch_size * target))
    return TrainConfig(task="pretrain", model=str(run / "start"), sources={"text": str(run / "data" / "train")},
                       phases=(Phase("longctx", steps, {"text": 1.0}),), seq_len=target, batch_size=batch_size,
                       micro_batch_size=batch_size, optim=OptimConfig(lr=lr, weight_decay=0.0),
                       schedule=ScheduleConfig(kind="cosine", warmup_steps=min(warmup_steps, steps)), seed=seed,
                       save_every=save_every, tensorboard=False, plot=False, num_threads=num_threads)


def run(args) -> int:
    """`pocketlm train longctx`: prepare (data, factors, start folder), then fine-tune with exact resume."""
    from pocketlm.train.loop import train
    info = prepare(args.model, args.run_dir, args.data, scale=args.scale, method=args.method, original=args.original,
                   search_windows=args.search_windows, population=args.population, generations=args.generations,
                   seed=args.seed)
    print(f"pocketlm train longctx: {info['method']} factors for {info['original']} -> {info['target']} tokens "
          f"in {Path(args.run_dir) / 'start'}", file=sys.stderr)
    cfg = train_config(args.run_dir, info, tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, save_every=args.save_every, num_threads=args.num_threads)
    records = train(cfg, args.run_dir, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    out = Path(args.run_dir) / "model"
    if out.is_dir():
        for name in TOKENIZER_FILES:
            src = Path(args.run_dir) / "start" / name
            if src.is_file() and not (out / name).exists():
                shutil.copy2(src, out / name)
    if records:
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; extended model in {out}")
    return 0


def add_arguments(p) -> None:
    """The `pocketlm train longctx` options."""
    p.add_argument("--model", required=True, help="checkpoint folder of the short-context model")
    p.add_argument("--run-dir", required=True, help="directory for data, factors, checkpoints and model/")
    p.add_argument("--data", required=True, help="token shard folder or UTF-8 text file (the fine-tuning text)")
    p.add_argument("--scale", type=float, default=4.0, help="target length = scale x original (default 4)")
    p.add_argument("--original", type=int, default=None,
                   help="the length the model was trained at (default: its max_position_embeddings)")
    p.add_argument("--method", default="longrope", choices=METHODS,
                   help="longrope (searched factors, default), pi (position interpolation) or ntk (NTK-aware)")
    p.add_argument("--tokens", type=int, default=100_000, help="fine-tuning token budget (default 100000)")
    p.add_argument("--batch-size", type=int, default=1, help="rows of target tokens per step (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--search-windows", type=int, default=2, help="held-out windows for the search (default 2)")
    p.add_argument("--population", type=int, default=8, help="search population (default 8)")
    p.add_argument("--generations", type=int, default=4, help="search generations (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", default="auto", metavar="auto|never|CHECKPOINT",
                   help="auto (newest intact checkpoint, default), never, or a checkpoint folder")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this step (the schedule is unchanged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


__all__ = ["METHODS", "add_arguments", "method_factors", "prepare", "read_tokens", "run", "train_config"]
