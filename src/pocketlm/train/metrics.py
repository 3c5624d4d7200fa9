"""Training telemetry: a progress bar with tokens/s and ETA, metrics as JSONL and TensorBoard events, MFU, and a
PNG of the loss curves at the end.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token (PaLM appendix B, nanoGPT `estimate_mfu`):
6 x N_matmul + 12 x layers x hidden x seq_len, with N_matmul the parameters that take part in matmuls (all
but the embedding lookup; the head counts, tied or not). Activation recomputation is not counted.
Peaks: dense bf16 tensor-core figures from the vendors' datasheets for known GPUs (H100 SXM 989 TFLOP/s, ...;
TF32 for fp32 training). On the CPU there is no honest datasheet figure for "this process on these cores", so the
peak is *measured*: the best of a few large matmuls in the training dtype on the threads torch uses
(`measure_cpu_peak`). CPU MFU is therefore "fraction of what this machine's GEMM reaches", stated as such.
TensorBoard needs the `tensorboard` package and the PNG `matplotlib`: both optional, skipped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError
from pocketlm.fsutil import atomic_write_text

# dense (no sparsity) peak FLOP/s: (bf16, tf32). Sources: NVIDIA H100/H200/A100/L4/B200 datasheets.
GPU_PEAKS = [
    ("H100 PCIe", 756e12, 378e12), ("H100 NVL", 835e12, 418e12), ("H100", 989e12, 495e12),
    ("H200", 989e12, 495e12), ("GH200", 989e12, 495e12), ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12), ("L40S", 362e12, 183e12), ("L4", 121e12, 60e12), ("A10G", 70e12, 35e12),
    ("4090", 165e12, 82.6e12),
]
_cpu_peak_cache: dict[tuple, float] = {}


def flops_per_token(config, seq_len: int) -> float:
    moe = getattr(config, "is_moe", False)  # an MoE token runs only its selected experts: the active count
    n = config.num_parameters(active=True) if moe else config.num_parameters()
    n -= config.vocab_size * config.hidden_size  # the embedding is a lookup
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size  # the tied head is a matmul
    attn = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * n + attn


def measure_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Best matmul FLOP/s over a few n x n products on the current torch threads (cached per dtype/threads)."""
    key = (dtype, n, torch.get_num_threads())
    if key not in _cpu_peak_cache:
        g = torch.Generator().manual_seed(0)  # private: the global RNG streams belong to training (exact resume)
        a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
        a @ b  # warm up
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _cpu_peak_cache[key] = 2 * n ** 3 / best
    return _cpu_peak_cache[key]


def peak_flops(device: torch.device, *, bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf, tf32 in GPU_PEAKS:
            if key in name:
                return (bf, f"{name} dense bf16 datasheet") if bf16 else (tf32, f"{name} dense TF32 datasheet")
        return math.nan, f"{name}: unknown peak (set peak_flops)"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measure_cpu_peak(dtype), f"measured {dtype} matmul peak, {torch.get_num_threads()} CPU threads"


class Progress:
    """One-line progress: step, loss, tokens/s, ETA. Redraws in place on a terminal, prints lines elsewhere."""

    def __init__(self, total: int, start: int = 0, stream=sys.stderr, every: int = 10):
        self.total, self.stream, self.every = total, stream, every
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.t0, self.s0 = time.perf_counter(), start

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        done = step - self.s0
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        width = 24
        fill = int(width * step / max(self.total, 1))
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {step}/{self.total} loss {loss:.4f} "
                f"{tokens_per_s:,.0f} tok/s ETA {_hms(eta)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsError(PocketLMError, ValueError):
    """metrics.jsonl holds a line that is not a JSON record with a step."""


class MetricsLog:
    """metrics.jsonl (one object per logged step) plus optional TensorBoard events, rank 0 only.

    `resume_step`: the step the run continues from. Before anything is appended the log is repaired to it: torn
    or unparsable lines (a crash mid-write, a full disk) and lines of later steps (they are trained and logged
    again) are dropped and the file is rewritten atomically; TensorBoard is told to purge its events after that
    step (`purge_step`), so neither shows a replayed step twice. `sync()` makes everything logged so far durable;
    the trainer calls it before a checkpoint is marked COMPLETE, so the log always covers its checkpoint."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.repair(resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                tb_dir = Path(run_dir) / "tb"
                purge = resume_step + 1 if tb_dir.exists() else None  # steps are 1-based: drop > resume_step
                self.tb = SummaryWriter(str(tb_dir), purge_step=purge)
            except ImportError:
                print("pocketlm train: tensorboard is not installed; skipping TensorBoard events", file=sys.stderr)
        self.file = open(self.path, "a", encoding="utf-8")

    def repair(self, step: int) -> None:
        """Keep the intact records of steps <= `step`, in order; rewrite the file when anything was dropped."""
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        keep, torn, later = [], 0, 0
        for line in raw.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                torn += 1
            elif record["step"] > step:
                later += 1
            else:
                keep.append(line)
        text = "".join(k + "\n" for k in keep)
        if text.encode("utf-8") != raw:
            atomic_write_text(self.path, text)
        if torn:
            print(f"pocketlm train: {self.path}: dropped {torn} torn or unreadable line(s) (an interrupted write); "
                  f"the log now ends at step {_last_step(keep)}", file=sys.stderr)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def sync(self) -> None:
        """flush + fsync metrics.jsonl, flush TensorBoard (called before a checkpoint is marked COMPLETE)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.sync()
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _last_step(lines: list[str]) -> int:
    return json.loads(lines[-1])["step"] if lines else 0


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = _parse(line)
            if record is None:
                raise MetricsError(f"{path}:{i}: not a JSON record with a step: {line[:80]!r} (resuming the run "
                                   "repairs the log)")
            records.append(record)
    return records


def plot_losses(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path | None:
    """loss.png: loss (and lr) against step, phases marked. None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pocketlm train: matplotlib is not installed; skipping loss.png", file=sys.stderr)
        return None
    records = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    for a, b in zip(records, records[1:]):
        if a.get("phase") != b.get("phase"):
            ax.axvline(b["step"], color="grey", ls="--", lw=0.8)
            ax.text(b["step"], ax.get_ylim()[1], f" {b.get('phase')}", va="top", fontsize=8)
    ax.set_ylabel("loss")
    ax.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
