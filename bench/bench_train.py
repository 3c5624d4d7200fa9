"""Training throughput and MFU: pocketlm's trainer against transformers' `Phi3ForCausalLM` training step, same run.

Model: Phi-3-shaped, 12 layers x 768 wide, 12 heads, SwiGLU 2048, the real 32064-row vocabulary, untied head:
134M parameters (the ~125M class; the same shape as the H100 anchor in /work/shared/ANCHORS.md).
Both sides: the same weights (ours copied into the transformers model by name: the official layout), the same
batch of random token rows, fp32 master weights, fused AdamW, gradient clipping at 1.0, cross-entropy
over all positions. On CUDA both run under bf16 autocast; ours also compiles each decoder layer (--no-compile to
turn it off). Ours is the real training loop (`pocketlm.train.loop.Trainer`: data loader, step, logging), timed
per step, alternating step by step with transformers, a bare loop (forward, loss, backward, clip, step), which favours it slightly.
Ours computes the head's loss chunk by chunk (`pocketlm.train.chunked_loss`: the float32 logits, their
log-softmax and its gradient are never materialised whole).

On a CPU with bf16 instructions (AVX512-BF16 or AMX) two more sides run, alternating with the first two: ours
with `cpu_bf16=true` (bf16 autocast on the CPU: bf16 matmuls, fp32 master weights, loss and AdamW) and
transformers under the same `torch.autocast("cpu", bfloat16)`, so that the speed-up of the recipe and of the
implementation can be told apart. The side order rotates every round, the machine's load average is printed, and
"paired" is the median over rounds of (transformers fp32 step / this side's step in the same round).

MFU = tokens/s x (6 N + 12 L h T) / peak (see pocketlm.train.metrics): on CUDA the dense bf16 datasheet peak, on
the CPU a *measured* fp32 matmul peak on the same threads, printed with the table (bf16 sides can pass 100%).

    python bench/bench_train.py                       # CPU: batch 2 x 128, a few steps (minutes on 2 cores)
    python bench/bench_train.py --threads 1 --compile --out bench/results/bench_train_cpu.json  # the README's line
    python bench/bench_train.py --batch 16 --seq 2048 # GPU defaults when CUDA is available
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pocketlm.data.shards import write_shards
from pocketlm.train.config import OptimConfig, Phase, ScheduleConfig, TrainConfig
from pocketlm.train.loop import Trainer
from pocketlm.train.metrics import flops_per_token, peak_flops

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=4096, sliding_window=2047, pad_token_id=32000)
# --shape small-cpu: the default model's recipe (`pocketlm recipe small-cpu`: nano's width, 8 layers, tied
# embeddings, 15.0M parameters), where the 32,064-row head is most of the work per token
SHAPES = {"134m": SHAPE,
          "small-cpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=1024, sliding_window=1023,
                            pad_token_id=32000, tie_word_embeddings=True)}


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16): where cpu_bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def ours(args, data: Path, run_dir: Path, cpu_bf16: bool = False) -> Trainer:
    steps = args.warmup + args.steps
    cfg = TrainConfig(task="pretrain", model="phi-3-mini-4k", model_overrides=SHAPES[args.shape],
                      sources={"rand": str(data)},
                      phases=(Phase("bench", steps + 100, {"rand": 1.0}),), seq_len=args.seq,
                      batch_size=args.batch, micro_batch_size=args.batch, optim=OptimConfig(lr=3e-4),
                      schedule=ScheduleConfig(kind="constant"), compile=args.compile, save_every=10 ** 9,
                      tensorboard=False, plot=False, num_threads=args.threads, cpu_bf16=cpu_bf16)
    return Trainer(cfg, run_dir, resume="never", progress=False)


def transformers_stepper(args, trainer: Trainer, device: torch.device):
    """A function running one transformers training step, returning (seconds, loss)."""
    from transformers import Phi3Config as HFConfig, Phi3ForCausalLM as HFModel
    hf_config = HFConfig(**trainer.config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    model = HFModel(hf_config).to(device=device, dtype=torch.float32).train()
    ours_state = {n: p.detach() for n, p in trainer.model.named_parameters()}
    missing, unexpected = model.load_state_dict(ours_state, strict=False)
    tied = trainer.config.tie_word_embeddings  # the tied head is the embedding in both models
    assert not unexpected and all("rotary" in m or (tied and m == "lm_head.weight") for m in missing), \
        (missing, unexpected)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)  # the same fused kernel ours uses
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(1)

    def step(cpu_bf16: bool = False) -> tuple[float, float]:
        ids = torch.randint(0, 32000, (args.batch, args.seq + 1), generator=g).to(device)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, float(loss.detach())
    return step


def main() -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16 if cuda else 2)
    p.add_argument("--seq", type=int, default=2048 if cuda else 128)
    p.add_argument("--steps", type=int, default=10 if cuda else 8, help="timed rounds (each side one step per round)")
    p.add_argument("--warmup", type=int, default=3 if cuda else 2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="134m",
                   help="model shape: 134m (12 x 768, the anchor's) or small-cpu (the default model's recipe)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                   help="torch.compile our decoder layers (default: on with CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: also run both sides under bf16 autocast (default: when the CPU has bf16 instructions)")
    p.add_argument("--out", default=None, help="JSON output (default: <tmp>/pocketlm-bench/train-<device>.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    bf16_sides = not cuda and (cpu_has_bf16() if args.bf16 is None else args.bf16)
    load_before = os.getloadavg()
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        n = (args.warmup + args.steps + 2) * args.batch * (args.seq + 1) * 2
        data = write_shards(Path(tmp) / "rand", [rng.integers(0, 32000, n).tolist()])
        trainer = ours(args, data, Path(tmp) / "run")
        hf_step = transformers_stepper(args, trainer, device)

        def ours_step(t: Trainer):
            def step():
                record = t.train_step()
                return tokens / record["tokens_per_s"], record["loss"]
            return step
        hf_name = "transformers Phi3ForCausalLM" + (" (bf16 autocast)" if cuda else " fp32")
        sides = {hf_name: hf_step,
                 "pocketlm Trainer" + (" +compile" if args.compile else "") + ("" if cuda else " fp32"):
                     ours_step(trainer)}
        if bf16_sides:
            fast = ours(args, data, Path(tmp) / "run-bf16", cpu_bf16=True)
            sides["transformers + CPU bf16 autocast"] = lambda: hf_step(cpu_bf16=True)
            sides["pocketlm Trainer" + (" +compile" if args.compile else "") + " cpu_bf16"] = ours_step(fast)
        times: dict[str, list[float]] = {k: [] for k in sides}
        losses: dict[str, list[float]] = {k: [] for k in sides}
        names = list(sides)
        for r in range(args.warmup + args.steps):  # alternate, so all sides see the same machine load
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                t, loss = sides[name]()
                times[name].append(t)
                losses[name].append(loss)
        warmup = {k: v[:args.warmup] for k, v in times.items()}  # the first step of a compiled side compiles
        times = {k: v[args.warmup:] for k, v in times.items()}
    load_after = os.getloadavg()
    config = trainer.config
    peak, peak_src = peak_flops(device, bf16=cuda)
    fpt = flops_per_token(config, args.seq)
    rows = []
    for name, ts in times.items():
        step = statistics.median(ts)
        rows.append({"name": name, "step_s": step, "step_s_min": min(ts), "tokens_per_s": tokens / step,
                     "mfu": tokens / step * fpt / peak, "steps_timed": len(ts), "first_loss": losses[name][0],
                     "warmup_step_s": warmup[name],
                     "paired_ratio_vs_transformers": statistics.median(
                         b / a for a, b in zip(ts, times[hf_name]))})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_vs_transformers"] = r["tokens_per_s"] / base
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; model {config.num_parameters() / 1e6:.1f}M params; batch {args.batch} x "
          f"{args.seq}; {fpt / 1e9:.3f} GFLOP/token; peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs")
    print("first-step loss (different random rows, all ~ln V): " +
          ", ".join(f"{k} {v[0]:.4f}" for k, v in losses.items()))
    print(f"{'implementation':40s} {'step (s)':>9s} {'min (s)':>8s} {'tokens/s':>10s} {'MFU':>7s} {'vs HF':>6s} "
          f"{'paired':>7s}")
    for r in rows:
        print(f"{r['name']:40s} {r['step_s']:9.3f} {r['step_s_min']:8.3f} {r['tokens_per_s']:10.1f} "
              f"{r['mfu'] * 100:6.1f}% {r['ratio_vs_transformers']:6.2f} {r['paired_ratio_vs_transformers']:7.2f}")
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "pocketlm-bench" / \
        f"train-{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "params": config.num_parameters(), "batch": args.batch,
                               "seq": args.seq, "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_src,
                               "torch": torch.__version__, "load_average_before": load_before,
                               "load_average_after": load_after, "cpus": os.cpu_count(), "results": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
