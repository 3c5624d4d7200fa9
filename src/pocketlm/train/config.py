"""Training configuration: frozen dataclasses, and named recipes that are plain Python functions (torchtitan's
`config_registry.py`), looked up exactly. No YAML, no exec.

A recipe fixes everything a run needs except where the data lives on this machine; `--set key=value` overrides
any field by its dotted name (`optim.lr=1e-3`, `sources.web=/data/web-shards`, `phases.0.steps=100`), values
parsed as JSON when they parse (numbers, true/false, null, lists) and as strings otherwise.

Batch sizes are global: `batch_size` rows per optimizer step over all ranks, `micro_batch_size` rows per rank
per forward pass, so grad_accum = batch_size / (micro_batch_size x world_size). The same config gives the same
updates on 1 process or N (that is the FSDP test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pocketlm.errors import ConfigError

TASKS = ("pretrain", "sft", "dpo")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices (2-D parameters) only; norms are never decayed."""
    grad_clip: float | None = 1.0
    """Max global gradient norm (None: no clipping)."""


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"
    """"cosine": linear warmup then cosine to min_lr_ratio x lr; "wsd": warmup, stable, then linear decay over
    the last decay_fraction of the steps (warmup-stable-decay, MiniCPM); "constant": warmup then flat."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2


@dataclass(frozen=True)
class Phase:
    """One pretraining phase: `steps` optimizer steps drawing from the sources with these weights."""
    name: str
    steps: int
    weights: dict[str, float]


@dataclass(frozen=True)
class TrainConfig:
    task: str = "pretrain"
    """"pretrain" (token shards), "sft" (chat JSONL) or "dpo" (preference JSONL)."""
    model: str = "tiny"
    """Preset name (random init, seeded) or checkpoint folder in the official layout (ours or Microsoft's)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Phi3Config fields changed on a preset (e.g. a small vocab_size for tests)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Source name -> token shard folder (pretrain) or JSONL file (sft: {"messages": [...]};
    dpo: {"prompt": messages | str, "chosen": str, "rejected": str})."""
    phases: tuple[Phase, ...] = ()
    """Pretraining phases in order (phase 1 web, phase 2 filtered web + synthetic); sft/dpo use one phase."""
    seq_len: int = 256
    batch_size: int = 8
    micro_batch_size: int = 8
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    seed: int = 0
    dtype: str = "float32"
    """Master weight dtype. On CUDA, compute runs under bf16 autocast (or FSDP bf16 params) when mixed is set."""
    mixed_precision: str | None = "bfloat16"
    """bf16 autocast on CUDA; ignored on CPU, where training is fp32 (bit-exact resume) unless cpu_bf16."""
    cpu_bf16: bool = False
    """bf16 autocast on the CPU as well: matmuls in bf16, master weights, loss and AdamW in fp32 (as on CUDA).
    2.5-3x faster matmuls where the CPU has bf16 instructions (AVX512-BF16, AMX; bench/bench_train.py), but not
    the same numbers as fp32 training; resume stays bit-exact."""
    compile: bool = False
    """torch.compile each decoder layer (module.compile(), so parameter names do not change)."""
    activation_checkpointing: bool = False
    fsdp: bool = True
    """Shard with FSDP2 when launched on more than one process."""
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True
    plot: bool = True
    chat_format: str | None = None
    """SFT/DPO chat format (default: the model's)."""
    dpo_beta: float = 0.1
    dpo_precompute_ref: bool = True
    """Compute the frozen reference log-probs once before training (else per batch)."""
    peak_flops: float | None = None
    """Peak FLOP/s for MFU (default: the device table, or a measured matmul peak on CPU)."""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default). The tiny recipes use 1: on a shared 2-core machine two
    OpenMP threads were 10x slower than one for these small matmuls."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r} is not one of {TASKS}")
        if self.schedule.kind not in SCHEDULES:
            raise ConfigError(f"schedule.kind {self.schedule.kind!r} is not one of {SCHEDULES}")
        if not self.phases or any(p.steps <= 0 for p in self.phases):
            raise ConfigError(f"phases must be non-empty with positive steps, got {self.phases}")
        for p in self.phases:
            unknown = set(p.weights) - set(self.sources)
            if unknown:
                raise ConfigError(f"phase {p.name!r} weighs unknown sources {sorted(unknown)}; sources: "
                                  f"{sorted(self.sources)}")
        for key in ("seq_len", "batch_size", "micro_batch_size", "save_every", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype {self.dtype!r} is not float32 or bfloat16")
        if self.mixed_precision not in (None, "bfloat16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r} is not None or 'bfloat16'")

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> Phase:
        """The phase that optimizer step `step` (0-based) belongs to."""
        for p in self.phases:
            if step < p.steps:
                return p
            step -= p.steps
        return self.phases[-1]

    def grad_accum(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by micro_batch_size "
                              f"{self.micro_batch_size} x world size {world_size}")
        return self.batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def hash(self) -> str:
        """sha256 of the fields that change the numbers (not logging or checkpoint cadence)."""
        d = self.to_dict()
        for key in UNHASHED:
            d.pop(key)
        for key, default in HASHED_UNLESS_DEFAULT.items():  # fields added later: old runs keep their hash
            if d.get(key) == default:
                d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


UNHASHED = ("save_every", "keep_checkpoints", "log_every", "tensorboard", "plot", "peak_flops")
"""Fields a resumed run may change: they do not change the numbers (logging and checkpoint cadence)."""
HASHED_UNLESS_DEFAULT = {"cpu_bf16": False}
"""Fields added after runs existed: hashed only when set, so a run started before them still resumes."""


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """"field: old -> new" for every hashed field (dotted name) that differs between two `to_dict()`s."""
    a, b = _flatten({k: v for k, v in old.items() if k not in UNHASHED}), \
        _flatten({k: v for k, v in new.items() if k not in UNHASHED})
    return [f"{k}: {json.dumps(a.get(k, '<absent>'))} -> {json.dumps(b.get(k, '<absent>'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted names -> leaf values; dicts and lists of dicts (phases) are descended, other lists are leaves."""
    if isinstance(node, dict) and node:
        items = node.items()
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (config.json of a run)."""
    d = dict(d)
    d["optim"] = OptimConfig(**{**d.get("optim", {}), "betas": tuple(d.get("optim", {}).get("betas", (0.9, 0.95)))})
    d["schedule"] = ScheduleConfig(**d.get("schedule", {}))
    d["phases"] = tuple(Phase(**p) for p in d.get("phases", ()))
    return TrainConfig(**d)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key=value` strings (dotted keys into nested dataclasses, dicts and the phases tuple)."""
    d = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *path, last = key.split(".")
        node: Any = d
        for part in path:
            node = _child(node, part, key)
        if isinstance(node, dict):
            if last not in node and not (path and path[-1] in ("sources", "weights", "model_overrides")
                                         or key.startswith(("sources.", "model_overrides."))):
                raise ConfigError(f"override {key!r}: unknown field {last!r}; fields: {sorted(node)}")
            node[last] = value
        else:
            node[_index(node, last, key)] = value
    try:
        return from_dict(d)
    except TypeError as e:
        raise ConfigError(f"overrides {overrides}: {e}") from None


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, dict):
        if part not in node:
            raise ConfigError(f"override {key!r}: unknown field {part!r}; fields: {sorted(node)}")
        return node[part]
    if isinstance(node, list):
        return node[_index(node, part, key)]
    raise ConfigError(f"override {key!r}: {part!r} is not a section")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index below {len(node)}")
    return int(part)


# ---- recipes: one function per named configuration ---------------------------------------------------------------

def tiny_pretrain() -> TrainConfig:
    """Two-phase pretraining of a small-vocabulary tiny model: the test and golden-loss recipe (CPU, seconds)."""
    return TrainConfig(
        task="pretrain", model="tiny", model_overrides={"vocab_size": 512, "max_position_embeddings": 256,
                                       "pad_token_id": 0, "eos_token_id": 2},
        sources={"web": "data/tiny/web", "synthetic": "data/tiny/synthetic"},
        phases=(Phase("phase1", 24, {"web": 0.9, "synthetic": 0.1}),
                Phase("phase2", 16, {"web": 0.4, "synthetic": 0.6})),
        seq_len=32, batch_size=8, micro_batch_size=4, optim=OptimConfig(lr=3e-3, weight_decay=0.1),
        schedule=ScheduleConfig(kind="wsd", warmup_steps=4), save_every=10, num_threads=1)


def tiny_sft() -> TrainConfig:
    """SFT of a tiny model with the real Phi-3 vocabulary on packed chat rows (CPU, seconds)."""
    return TrainConfig(
        task="sft", model="tiny", sources={"chat": "data/tiny/chat.jsonl"},
        phases=(Phase("sft", 40, {"chat": 1.0}),), seq_len=64, batch_size=4, micro_batch_size=2,
        optim=OptimConfig(lr=1e-3, weight_decay=0.0), schedule=ScheduleConfig(kind="cosine", warmup_steps=4),
        save_every=10, num_threads=1)


def tiny_dpo() -> TrainConfig:
    """DPO of a tiny model with the real Phi-3 vocabulary (CPU, seconds)."""
    return TrainConfig(
        task="dpo", model="tiny", sources={"prefs": "data/tiny/prefs.jsonl"},
        phases=(Phase("dpo", 40, {"prefs": 1.0}),), seq_len=48, batch_size=4, micro_batch_size=2,
        optim=OptimConfig(lr=1e-4, weight_decay=0.0), schedule=ScheduleConfig(kind="cosine", warmup_steps=2),
        save_every=10, num_threads=1)


def nano_pretrain_cpu() -> TrainConfig:
    """The nano preset (4 layers, 256 wide, tied) pretrained on this 2-core CPU: two phases, WSD schedule."""
    return TrainConfig(
        task="pretrain", model="nano", sources={"web": "data/web", "synthetic": "data/synthetic"},
        phases=(Phase("phase1", 3000, {"web": 0.9, "synthetic": 0.1}),
                Phase("phase2", 1000, {"web": 0.3, "synthetic": 0.7})),
        seq_len=256, batch_size=16, micro_batch_size=8, optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(kind="wsd", warmup_steps=100), save_every=250)


def micro_pretrain_gpu() -> TrainConfig:
    """The micro preset on one GPU: bf16 autocast, compiled layers, 2 phases of 10k steps, 2048-token rows."""
    return TrainConfig(
        task="pretrain", model="micro", sources={"web": "data/web", "synthetic": "data/synthetic"},
        phases=(Phase("phase1", 10000, {"web": 0.9, "synthetic": 0.1}),
                Phase("phase2", 10000, {"web": 0.3, "synthetic": 0.7})),
        seq_len=2048, batch_size=64, micro_batch_size=16, optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(kind="wsd", warmup_steps=500), compile=True, save_every=1000)


def phi3_mini_sft() -> TrainConfig:
    """SFT of a phi-3-mini checkpoint (pass its folder as --set model=PATH) on chat JSONL, FSDP across GPUs."""
    return TrainConfig(
        task="sft", model="phi-3-mini-4k", sources={"chat": "data/sft.jsonl"},
        phases=(Phase("sft", 2000, {"chat": 1.0}),), seq_len=4096, batch_size=64, micro_batch_size=4,
        optim=OptimConfig(lr=2e-5, weight_decay=0.0), schedule=ScheduleConfig(kind="cosine", warmup_steps=50),
        activation_checkpointing=True, save_every=500, dtype="float32")


def phi3_mini_dpo() -> TrainConfig:
    """DPO of a phi-3-mini SFT checkpoint (--set model=PATH), beta 0.1, precomputed reference log-probs."""
    return TrainConfig(
        task="dpo", model="phi-3-mini-4k", sources={"prefs": "data/dpo.jsonl"},
        phases=(Phase("dpo", 1000, {"prefs": 1.0}),), seq_len=2048, batch_size=64, micro_batch_size=4,
        optim=OptimConfig(lr=5e-7, weight_decay=0.0), schedule=ScheduleConfig(kind="cosine", warmup_steps=50),
        activation_checkpointing=True, save_every=250)


def default_dpo() -> TrainConfig:
    """DPO of the default model on the CPU (its float checkpoint: `pocketlm convert` of the GGUF, --set model=PATH) on
    its on-policy safety pairs (`pocketlm data safety-prefs`) and the teacher's preference pairs
    (--set sources.prefs=FILE): fp32, 8 pairs of at most 192 tokens per step, beta 0.1, 160 steps."""
    return TrainConfig(
        task="dpo", model="runs/default-float", sources={"prefs": "runs/dpo-pairs.jsonl"},
        phases=(Phase("dpo", 160, {"prefs": 1.0}),), seq_len=192, batch_size=8, micro_batch_size=8,
        optim=OptimConfig(lr=5e-6, weight_decay=0.0), schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
        save_every=40, keep_checkpoints=4)


RECIPES = {
    "tiny-pretrain": tiny_pretrain,
    "tiny-sft": tiny_sft,
    "tiny-dpo": tiny_dpo,
    "nano-pretrain-cpu": nano_pretrain_cpu,
    "micro-pretrain-gpu": micro_pretrain_gpu,
    "phi3-mini-sft": phi3_mini_sft,
    "phi3-mini-dpo": phi3_mini_dpo,
    "default-dpo": default_dpo,
}


def recipe(name: str) -> TrainConfig:
    """The named recipe, looked up exactly."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"{name!r} is not a training recipe; choose from {sorted(RECIPES)}")
    return RECIPES[name]()


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
