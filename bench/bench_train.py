"""Training throughput and MFU: pocketlm's trainer against transformers' `Phi3ForCausalLM` training step, same run.

Model: Phi-3-shaped, 12 layers x 768 wide, 12 heads, SwiGLU 2048, the real 32064-row vocabulary, untied head:
134M parameters (the ~125M class; the same shape as the H100 anchor in /work/shared/ANCHORS.md).
Both sides: the same weights (ours copied into the transformers model by name: the official layout), the same
batch of random token rows, fp32 master weights, fused AdamW, gradient clipping at 1.0, cross-entropy
over all positions. On CUDA both run under bf16 autocast; ours also compiles each decoder layer (--no-compile to
turn it off). Ours is the real training loop (`pocketlm.train.loop.Trainer`: data loader, step, logging), timed
per step, alternating step by step with transformers, a bare loop (forward, loss, backward, clip, step), which favours it slightly.

MFU = tokens/s x (6 N + 12 L h T) / peak (see pocketlm.train.metrics): on CUDA the dense bf16 datasheet peak, on
the CPU a *measured* fp32 matmul peak on the same threads, printed with the table.

    python bench/bench_train.py                       # CPU: batch 2 x 128, a few steps (minutes on 2 cores)
    python bench/bench_train.py --batch 16 --seq 2048 # GPU defaults when CUDA is available
"""

from __future__ import annotations

import argparse
import json
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


def ours(args, data: Path, run_dir: Path) -> Trainer:
    steps = args.warmup + args.steps
    cfg = TrainConfig(task="pretrain", model="phi-3-mini-4k", model_overrides=SHAPE, sources={"rand": str(data)},
                      phases=(Phase("bench", steps + 100, {"rand": 1.0}),), seq_len=args.seq,
                      batch_size=args.batch, micro_batch_size=args.batch, optim=OptimConfig(lr=3e-4),
                      schedule=ScheduleConfig(kind="constant"), compile=args.compile, save_every=10 ** 9,
                      tensorboard=False, plot=False, num_threads=args.threads)
    return Trainer(cfg, run_dir, resume="never", progress=False)


def transformers_stepper(args, trainer: Trainer, device: torch.device):
    """A function running one transformers training step, returning (seconds, loss)."""
    from transformers import Phi3Config as HFConfig, Phi3ForCausalLM as HFModel
    hf_config = HFConfig(**trainer.config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    model = HFModel(hf_config).to(device=device, dtype=torch.float32).train()
    ours_state = {n: p.detach() for n, p in trainer.model.named_parameters()}
    missing, unexpected = model.load_state_dict(ours_state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)  # the same fused kernel ours uses
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(1)

    def step() -> tuple[float, float]:
        ids = torch.randint(0, 32000, (args.batch, args.seq + 1), generator=g).to(device)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
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
    p.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                   help="torch.compile our decoder layers (default: on with CUDA)")
    p.add_argument("--out", default=None, help="JSON output (default: <tmp>/pocketlm-bench/train-<device>.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        tokens = (args.warmup + args.steps + 2) * args.batch * (args.seq + 1) * 2
        data = write_shards(Path(tmp) / "rand", [rng.integers(0, 32000, tokens).tolist()])
        trainer = ours(args, data, Path(tmp) / "run")
        hf_step = transformers_stepper(args, trainer, device)
        t_ours, t_hf, l_ours, l_hf = [], [], [], []
        tokens = args.batch * args.seq
        for _ in range(args.warmup + args.steps):  # alternate, so both see the same machine load
            record = trainer.train_step()
            t_ours.append(tokens / record["tokens_per_s"])
            l_ours.append(record["loss"])
            t, loss = hf_step()
            t_hf.append(t)
            l_hf.append(loss)
        t_ours, t_hf = t_ours[args.warmup:], t_hf[args.warmup:]
    config = trainer.config
    peak, peak_src = peak_flops(device, bf16=cuda)
    fpt = flops_per_token(config, args.seq)
    tokens = args.batch * args.seq
    rows = []
    for name, times in (("transformers Phi3ForCausalLM", t_hf), ("pocketlm Trainer" + (" +compile" if args.compile
                                                                                      else ""), t_ours)):
        step = statistics.median(times)
        rows.append({"name": name, "step_s": step, "tokens_per_s": tokens / step,
                     "mfu": tokens / step * fpt / peak, "steps_timed": len(times)})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_vs_transformers"] = r["tokens_per_s"] / base
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; model {config.num_parameters() / 1e6:.1f}M params; batch {args.batch} x "
          f"{args.seq}; {fpt / 1e9:.3f} GFLOP/token; peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
    print(f"first-step loss: transformers {l_hf[0]:.4f}, ours {l_ours[0]:.4f} (different random rows, both ~ln V)")
    print(f"{'implementation':34s} {'step (s)':>9s} {'tokens/s':>10s} {'MFU':>7s} {'vs HF':>6s}")
    for r in rows:
        print(f"{r['name']:34s} {r['step_s']:9.3f} {r['tokens_per_s']:10.1f} {r['mfu'] * 100:6.1f}% "
              f"{r['ratio_vs_transformers']:6.2f}")
    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "pocketlm-bench" / \
        f"train-{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device_name, "params": config.num_parameters(), "batch": args.batch,
                               "seq": args.seq, "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_src,
                               "torch": torch.__version__, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
