"""The training loop shared by pretraining, SFT and DPO: one `Trainer`, three objectives.

Per optimizer step: set the phase's source weights -> draw `grad_accum` micro-batches (this rank's rows of each
global batch) -> count the global loss denominator (trained tokens, or pairs for DPO) with one all-reduce ->
forward/backward each micro-batch with loss = sum / global count x world size (FSDP averages gradients over
ranks, so the update equals one process with the whole global batch, whatever the masks) -> clip the global
gradient norm -> AdamW with the scheduled learning rate -> log -> maybe checkpoint.

Notable features: decoupled AdamW (weight decay on matrices only; fused on CUDA and CPU), linear warmup then
cosine or warmup-stable-decay, FSDP2 + activation checkpointing + per-layer torch.compile (see `distributed.py`), bf16
autocast on one GPU, SDPA attention (the model's), atomic checkpoints and bit-exact resume on CPU (see
`checkpoint.py`): the resumed run checks the checkpoint's sha256s (falling back past a corrupt one), restores
weights, optimizer, schedule step, loader position and RNG states, repairs metrics.jsonl to the checkpoint step
(torn lines and replayed steps dropped) and purges TensorBoard after it, so the logged losses equal those of a
run that never stopped. Nothing outside the training steps draws from the global RNGs (the CPU peak-FLOP/s probe
has its own generator). Before the first step: every source exists, and the pretraining shards' largest token
id fits the model's vocabulary. One trainer per run directory (`checkpoint.RunLock`).

References: nanoGPT `train.py` (loop shape, MFU), torchtitan `train.py` (FSDP2 + AC + compile order, full
state dicts for checkpoints), TRL (SFT/DPO objectives).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import pocketlm
from pocketlm.config import PRESETS, preset
from pocketlm.errors import ConfigError
from pocketlm.formats import hf
from pocketlm.fsutil import atomic_write_text
from pocketlm.formats.safetensors_io import CheckpointReader
from pocketlm.moe import with_aux_loss
from pocketlm.data.shards import MixtureLoader, TokenWindows
from pocketlm.train import checkpoint as ckpt
from pocketlm.train.chunked_loss import causal_lm_loss
from pocketlm.train.config import UNHASHED, TrainConfig, config_changes
from pocketlm.train.distributed import (DistEnv, all_reduce_sum, barrier, parallelize, set_gradient_sync, setup,
                                        shutdown)
from pocketlm.train.metrics import MetricsLog, Progress, flops_per_token, peak_flops, plot_losses, read_metrics
from pocketlm.train.sft import IGNORE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    s, peak, total = cfg.schedule, cfg.optim.lr, cfg.total_steps
    if step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    floor = peak * s.min_lr_ratio
    if s.kind == "constant":
        return peak
    if s.kind == "cosine":
        progress = (step - s.warmup_steps) / max(total - s.warmup_steps, 1)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay = max(int(round(total * s.decay_fraction)), 1)  # wsd: flat until the last `decay` steps
    start = total - decay
    if step < start:
        return peak
    return peak + (floor - peak) * (step - start + 1) / decay


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The starting model in the master dtype: a checkpoint folder (ours or official), or a seeded preset."""
    dtype = DTYPES[cfg.dtype]
    if Path(cfg.model).exists():
        if cfg.model_overrides:
            raise ConfigError(f"model_overrides {cfg.model_overrides} only apply to presets, not {cfg.model}")
        model = pocketlm.load(cfg.model, dtype=dtype, device=device)
    elif cfg.model in PRESETS:
        config = preset(cfg.model).replace(**cfg.model_overrides, torch_dtype=cfg.dtype)
        model = hf.init_weights(hf.empty_model(config, dtype, device), seed=cfg.seed)
    else:
        raise ConfigError(f"model {cfg.model!r} is neither an existing checkpoint folder nor a preset "
                          f"({sorted(PRESETS)})")
    return model.train()


def load_tokenizer(cfg: TrainConfig, vocab_size: int, model_type: str = "phi3"):
    from pocketlm.tokenizer import Tokenizer
    folder = Path(cfg.model)
    if model_type == "phi3small":  # cl100k_base + its specials (tokenizer_small)
        from pocketlm.tokenizer_small import Phi3SmallTokenizer
        return Phi3SmallTokenizer.from_pretrained(folder)
    has_own = folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    tok = Tokenizer.from_pretrained(folder) if has_own else Tokenizer.default()
    if len(tok) > vocab_size:
        raise ConfigError(f"the tokenizer defines {len(tok)} ids but the model has {vocab_size} rows")
    return tok


def check_sources(cfg: TrainConfig) -> None:
    """Every source path exists; otherwise name the missing `sources.X` settings (one error for all of them)."""
    missing = [n for n, p in cfg.sources.items() if not Path(p).exists()]
    if missing:
        raise ConfigError(f"{cfg.task} needs " + "; ".join(
            f"sources.{n} ({cfg.sources[n]} does not exist): add --set sources.{n}=PATH" for n in missing))


PHI3_VOCAB = 32064  # rows of Phi-3's embedding; the data pipeline tokenizes with its tokenizer


def check_vocabulary(cfg: TrainConfig, sources: dict[str, TokenWindows], vocab_size: int, run_dir: Path) -> None:
    """Refuse, before the first step, token shards whose largest id has no row in the model (it would be an
    IndexError inside the embedding), naming both numbers and the override that fixes it."""
    for name, windows in sources.items():
        top = shard_max_id(windows.shards, run_dir)
        if top < vocab_size:
            continue
        need = PHI3_VOCAB if top < PHI3_VOCAB else -(-(top + 1) // 64) * 64
        if cfg.model in PRESETS:
            fix = (f"add --set model_overrides.vocab_size={need}"
                   + (" (the Phi-3 vocabulary the data pipeline tokenizes with)" if need == PHI3_VOCAB else ""))
        else:
            fix = (f"the checkpoint {cfg.model} has a fixed vocabulary: tokenize the data with its tokenizer, or train "
                   f"a preset with --set model=<preset> --set model_overrides.vocab_size={need}")
        raise ConfigError(f"source {name!r} ({cfg.sources[name]}) holds token id {top} but the model has vocab_size "
                          f"{vocab_size} (ids 0..{vocab_size - 1}): {fix}")


def shard_max_id(shards, run_dir: Path) -> int:
    """The largest token id of a shard folder: `max_id` from index.json when the writer recorded it, else one
    pass over the (memory-mapped) shards, remembered in `<run>/shard-max-ids.json` by the index's sha256 (shard
    folders are written once, so the index identifies the contents)."""
    recorded = shards.index.get("max_id")
    if isinstance(recorded, int):
        return recorded
    key = hashlib.sha256((Path(shards.folder) / "index.json").read_bytes()).hexdigest()
    cache_path = Path(run_dir) / "shard-max-ids.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), int):
        return cache[key]
    top = -1
    for arr in shards.arrays:
        for i in range(0, len(arr), 1 << 26):
            top = max(top, int(arr[i:i + (1 << 26)].max()))
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = top
    atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    return top


def pretrain_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    labels = batch["labels"]
    # plain causal SDPA; the head's loss chunk by chunk where it can (pocketlm.train.chunked_loss)
    loss = causal_lm_loss(model, labels, input_ids=batch["input_ids"])
    count = (labels != IGNORE).sum()
    loss, metrics = with_aux_loss(model, loss, count)  # MoE load balancing (pocketlm.moe); dense: unchanged
    return loss, count, metrics


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) on CUDA and on the CPU: on the 134M bench model the fused CPU
    step took 0.4 s against 3.3 s for the per-tensor loop."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type in ("cuda", "cpu"))


class Trainer:
    """Builds model, data, objective and optimizer for `cfg` in `run_dir`; `run()` trains to the end.

    Rank 0 holds the run directory's lock (`checkpoint.RunLock`) from construction until `close()` (which `run()`
    calls when the run is finished, and `train()` always): a second trainer on the same directory is refused."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: str = "auto",
                 env: DistEnv | None = None, progress: bool = True):
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.env = env or setup()
        self.progress = progress
        self.log = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = ckpt.RunLock(self.run_dir) if self.env.main else None  # before anything touches the folder
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: str) -> None:
        cfg, env = self.cfg, self.env
        found = None
        if env.main:
            ckpt.clean(self.run_dir)
            found = self._resume_point(resume, verify=True)  # corrupt newer checkpoints are moved aside here
        barrier(env)
        resume_from = found if env.main else self._resume_point(resume, verify=False)
        if env.main:
            self._write_config(resume_from is not None)
            if resume_from is not None:
                print(f"pocketlm train: resuming from step {ckpt.checkpoint_step(resume_from)} "
                      f"(checkpoint {resume_from})", file=sys.stderr, flush=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        model = build_model(cfg, env.device)
        self.config = model.config
        # a fine-tune keeps the repetition penalty its starting checkpoint declares (generation_config.json)
        self.declared_repetition_penalty = getattr(model, "declared_repetition_penalty", None)
        self.tokenizer = (load_tokenizer(cfg, self.config.vocab_size, self.config.model_type)
                          if cfg.task != "pretrain" else None)
        ref_model = None
        if cfg.task == "dpo":  # the reference is the starting model, frozen
            ref_model = build_model(cfg, env.device).eval().requires_grad_(False)
        if resume_from is not None:
            self._load_weights(model, resume_from / "model")
        cuda = env.device.type == "cuda"
        bf16 = cuda and cfg.mixed_precision == "bfloat16"
        self.model = parallelize(model, env, compile=cfg.compile, activation_checkpointing=cfg.activation_checkpointing,
                                 fsdp=cfg.fsdp, bf16_params=bf16 and env.distributed)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and not env.distributed
                         else torch.autocast("cpu", dtype=torch.bfloat16) if env.device.type == "cpu" and cfg.cpu_bf16
                         else contextlib.nullcontext())
        self.loader, self.objective = self._build_data(ref_model)
        self.optimizer = make_optimizer(self.model, cfg, env.device)
        self.grad_accum = cfg.grad_accum(env.world_size)
        self.flops_per_token = flops_per_token(self.config, cfg.seq_len)
        # measured before the RNG states are restored, and with a private generator (metrics.measure_cpu_peak)
        self.peak, self.peak_source = ((cfg.peak_flops, "config") if cfg.peak_flops
                                       else peak_flops(env.device, bf16=bf16))
        self.step, self.tokens_seen = 0, 0
        if resume_from is not None:
            self._load_state(resume_from)
        if env.main:
            self.log = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, resume_step=self.step)
        self.resumed_from = resume_from

    def close(self) -> None:
        """Close the metrics log and release the run directory (idempotent)."""
        if self.log is not None and not self.log.file.closed:
            self.log.close()
        if self._lock is not None:
            self._lock.release()

    # ---- setup ----------------------------------------------------------------------------------------------------
    def _resume_point(self, resume: str, *, verify: bool) -> Path | None:
        """The checkpoint to continue from. `verify` (rank 0): check the sha256s, fall back past corrupt ones."""
        if resume == "auto":
            return ckpt.resumable(self.run_dir) if verify else ckpt.latest(self.run_dir)
        if resume == "never":
            last = ckpt.latest(self.run_dir)
            if last is not None:
                raise ckpt.CheckpointError(f"{self.run_dir} already holds checkpoint {last.name}; use --resume auto "
                                           "or a new run directory")
            return None
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"--resume {resume!r}: expected one of auto (the newest intact checkpoint of the run; "
                              "the default), never (start fresh; refused when the run has checkpoints), or the path "
                              f"of one of this run's checkpoint folders, e.g. {ckpt.step_dir(self.run_dir, 10)}")
        if not ckpt.is_complete(path):
            raise ckpt.CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker)")
        if path.resolve().parent.parent != self.run_dir.resolve():
            raise ckpt.CheckpointError(f"{path}: resume only from this run's own checkpoints "
                                       f"({self.run_dir / 'checkpoints'}); to start from other weights set model=")
        if verify:
            reason = ckpt.verify(path)
            if reason is not None:
                raise ckpt.CheckpointError(f"{path} is corrupt: {reason}")
        return path

    def _write_config(self, resuming: bool) -> None:
        path = self.run_dir / "config.json"
        record = {"config": self.cfg.to_dict(), "config_hash": self.cfg.hash(), "code_version": pocketlm.__version__}
        if resuming and path.exists():
            check_same_config(self.run_dir, self.cfg)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")

    def _build_data(self, ref_model):
        cfg, env = self.cfg, self.env
        fmt = cfg.chat_format or self.config.chat_format
        check_sources(cfg)
        if cfg.task == "pretrain":
            sources = {n: TokenWindows(p, cfg.seq_len) for n, p in cfg.sources.items()}
            if env.main:
                check_vocabulary(cfg, sources, self.config.vocab_size, self.run_dir)
            objective = pretrain_loss
        elif cfg.task == "sft":
            from pocketlm.train.sft import PackedChat, sft_loss
            sources = {n: PackedChat(p, self.tokenizer, cfg.seq_len, format=fmt) for n, p in cfg.sources.items()}
            objective = sft_loss
        else:
            from pocketlm.train.dpo import DPOObjective, PreferencePairs, reference_logps
            if len(cfg.sources) != 1:
                raise ConfigError(f"dpo takes one preference source, got {sorted(cfg.sources)}")
            (name, path), = cfg.sources.items()
            pairs = PreferencePairs(path, self.tokenizer, cfg.seq_len, format=fmt)
            sources = {name: pairs}
            if cfg.dpo_precompute_ref:
                objective = DPOObjective(cfg.dpo_beta, ref_table=reference_logps(ref_model, pairs, env.device))
                del ref_model
            else:
                objective = DPOObjective(cfg.dpo_beta, ref_model=ref_model)
        loader = MixtureLoader(sources, cfg.phases[0].weights, global_batch=cfg.micro_batch_size * env.world_size,
                               rank=env.rank, world_size=env.world_size, seed=cfg.seed)
        return loader, objective

    def _load_weights(self, model, folder: Path) -> None:
        with CheckpointReader(folder) as reader:
            params = dict(model.named_parameters())
            if set(reader.keys()) != set(params):
                raise ckpt.CheckpointError(f"{folder}: tensors {sorted(set(reader.keys()) ^ set(params))[:6]} do "
                                           "not match the model")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(reader.get(n))

    def _load_state(self, folder: Path) -> None:
        state = ckpt.load_state(folder, "train_state.pt")
        if state["config_hash"] != self.cfg.hash():
            saved = json.loads(state["config"]) if isinstance(state.get("config"), str) else {}
            changes = config_changes(saved, self.cfg.to_dict()) if saved else []
            raise ckpt.CheckpointError(f"{folder}: saved with config hash {state['config_hash']}, this config "
                                       f"hashes to {self.cfg.hash()}"
                                       + (f"; changed: {', '.join(changes)}" if changes else ""))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        rng = folder / f"rng-rank{self.env.rank}.pt"
        ckpt.set_rng_state(ckpt.load_state(folder, rng.name if rng.exists() else "rng-rank0.pt"))

    # ---- the step -------------------------------------------------------------------------------------------------
    def _count(self, batch: dict[str, torch.Tensor]) -> int:
        if self.cfg.task == "dpo":
            return batch["index"].shape[0]
        return int((batch["labels"] != IGNORE).sum())

    def train_step(self) -> dict:
        cfg, env, model = self.cfg, self.env, self.model
        phase = cfg.phase_at(self.step)
        self.loader.set_weights(phase.weights)
        t0 = time.perf_counter()
        batches = [{k: v.to(env.device) for k, v in self.loader.next_batch().items()} for _ in range(self.grad_accum)]
        count = float(all_reduce_sum(env, torch.tensor([sum(self._count(b) for b in batches)]))[0])
        scale = env.world_size / max(count, 1.0)
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            set_gradient_sync(model, i == len(batches) - 1)
            with self.autocast:
                loss_sum, _, metrics = self.objective(model, batch)
            (loss_sum * scale).backward()
            for k, v in {"loss": loss_sum, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double().cpu()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums)
        totals = all_reduce_sum(env, torch.stack([torch.as_tensor(sums[k]) for k in keys]))
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = cfg.batch_size * cfg.seq_len
        self.step += 1
        self.tokens_seen += tokens
        record = {"step": self.step, "phase": phase.name,
                  **{k: float(totals[i]) / max(count, 1.0) for i, k in enumerate(keys)},
                  "lr": lr, "grad_norm": float(norm), "tokens": self.tokens_seen,
                  "tokens_per_s": tokens / dt, "mfu": tokens / dt * self.flops_per_token / self.peak}
        if cfg.task == "dpo":
            record["pairs"] = int(count)
        return record

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def save(self) -> None:
        env, step = self.env, self.step
        options = StateDictOptions(full_state_dict=True, cpu_offload=env.distributed)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        tmp = ckpt.step_dir(self.run_dir, step).with_name(f"step-{step:08d}.tmp")
        if env.main:
            tmp = ckpt.begin(self.run_dir, step)
        barrier(env)
        if env.main:
            view = ckpt.StateDictView(self.config, model_state)
            view.declared_repetition_penalty = self.declared_repetition_penalty
            hf.save_checkpoint(view, tmp / "model", tokenizer=self.tokenizer)
            ckpt.save_torch({"step": step, "tokens_seen": self.tokens_seen, "optimizer": optim_state,
                             "schedule": {"step": step, "lr": lr_at(self.cfg, max(step - 1, 0))},
                             "loader": self.loader.state_dict(), "config_hash": self.cfg.hash(),
                             "config": json.dumps(self.cfg.to_dict()),
                             "code_version": pocketlm.__version__, "world_size": env.world_size},
                            tmp / "train_state.pt")
        ckpt.save_torch(ckpt.rng_state(), tmp / f"rng-rank{env.rank}.pt")
        barrier(env)
        if env.main:
            if self.log is not None:
                self.log.sync()  # the log covers every step up to this checkpoint before it counts as COMPLETE
            ckpt.commit(tmp, step)
            ckpt.prune(self.run_dir, self.cfg.keep_checkpoints)
        barrier(env)

    def export(self) -> Path:
        """Copy the last checkpoint's weights to `<run>/model` (official layout), atomically."""
        src = ckpt.step_dir(self.run_dir, self.step) / "model"
        out, tmp = self.run_dir / "model", self.run_dir / "model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    # ---- the run --------------------------------------------------------------------------------------------------
    def run(self, *, max_steps: int | None = None) -> list[dict]:
        """Train to the end (or until step `max_steps`); return every logged record of the run."""
        cfg, env = self.cfg, self.env
        end = cfg.total_steps if max_steps is None else min(max_steps, cfg.total_steps)
        bar = Progress(cfg.total_steps, self.step) if self.progress and env.main else None
        while self.step < end:
            record = self.train_step()
            if self.log is not None and (self.step % cfg.log_every == 0 or self.step == cfg.total_steps):
                self.log.log(record)
            if bar is not None:
                bar.update(self.step, record["loss"], record["tokens_per_s"])
            if self.step % cfg.save_every == 0 or self.step == cfg.total_steps:
                self.save()
        if env.main and self.step == cfg.total_steps:
            self.export()
            if cfg.plot:
                plot_losses(self.run_dir)
        records = read_metrics(self.run_dir) if env.main else []
        if self.step == cfg.total_steps:
            self.close()  # a run stopped early (max_steps) may continue on this Trainer
        return records


def check_same_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to continue a run whose config.json was written by a config with different numbers, naming the
    fields that changed (old -> new)."""
    path = Path(run_dir) / "config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable ({e}); cannot check that the run continues with the same "
                                   "config") from None
    if old.get("config_hash") == cfg.hash():
        return
    changes = config_changes(old.get("config") or {}, cfg.to_dict())
    raise ckpt.CheckpointError(f"{run_dir}: the run was started with config hash {old.get('config_hash')}, this "
                               f"config hashes to {cfg.hash()}"
                               + (f"; changed: {', '.join(changes)}" if changes else "")
                               + ". Resume with the same recipe and overrides (only "
                               + ", ".join(UNHASHED) + " may change), or use a new run directory")


def finished(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path | None:
    """The final checkpoint when `run_dir` already holds the whole run of `cfg` (last step checkpointed and the
    model exported), else None. A different config in the folder is an error, not "finished"."""
    run_dir = Path(run_dir)
    last = ckpt.latest(run_dir)
    exported = (run_dir / "model" / "config.json").is_file()
    if last is None or ckpt.checkpoint_step(last) < cfg.total_steps or not exported:
        return None
    check_same_config(run_dir, cfg)
    return last


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: str = "auto", max_steps: int | None = None,
          progress: bool = True) -> list[dict]:
    """Train `cfg` in `run_dir` (resuming from its last complete checkpoint with resume="auto"); return the
    logged records on rank 0 (empty on other ranks). A run that is already complete does nothing."""
    env = setup()
    try:
        if resume == "auto" and finished(cfg, run_dir) is not None:
            if not env.main:
                return []
            print(f"pocketlm train: {run_dir} is already complete (step {cfg.total_steps} of {cfg.total_steps}; "
                  f"final model in {Path(run_dir) / 'model'}); nothing to do", file=sys.stderr, flush=True)
            return read_metrics(run_dir)
        trainer = Trainer(cfg, run_dir, resume=resume, env=env, progress=progress)
        try:
            return trainer.run(max_steps=max_steps)
        finally:
            trainer.close()
    finally:
        shutdown(env)
