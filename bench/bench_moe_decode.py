"""phi-3.5-MoE decode on the CPU: pocketlm's quantized experts against llama.cpp, same Q8_0 weights, same run.

    python bench/bench_moe_decode.py [--decode 48] [--threads 1] [--repeats 3] [--out FILE.json]

A tiny-but-wide phi-3.5-MoE structure (hidden 512, 16 experts of ffn 1536, top-2, 4 layers, the real 32064-row
vocabulary) with random weights, Q8_0:
- llama.cpp (llama-cpp-python): the `phimoe` GGUF pocketlm exports, greedy decode one `eval` per token;
- pocketlm: the same model quantized in memory (`quantize_model`, Q8_0 on the compiled kernels, router and biases
  float), decoded one token per forward with a KV cache (the PyTorch module path: the fused C decoder serves
  dense models only);
- baseline: pocketlm on a DENSE model with the MoE's active width (ffn 2 x 1536, no router), same path. A
  decode step reads the weights of two experts per layer, so the MoE costs about what its active dense twin
  costs, not 16/2 = 8 times more for its total size.
Each measurement is the median of --repeats runs of --decode tokens after a 16-token prompt (wall clock, all
Python included for pocketlm). Prints a table, writes JSON (default bench/results/bench_moe_decode.json). The
machine is shared: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pocketlm.config import preset
from pocketlm.formats import hf
from pocketlm.model import Phi3ForCausalLM
from pocketlm.quant.gguf_export import export_gguf
from pocketlm.quant.linear import quantize_model

PROMPT = [1] + list(range(450, 465))


def wide_moe():
    return preset("tiny-moe").replace(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, num_local_experts=16,
                                      rope_scaling=None, name="bench-moe")


def decode_pocketlm(model, n: int) -> float:
    """Seconds per token: prefill PROMPT, then n greedy steps one forward each."""
    with torch.no_grad():
        cache = model.make_cache(1, len(PROMPT) + n + 1)
        nxt = int(model(torch.tensor([PROMPT]), cache, last_only=True)[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = int(model(torch.tensor([[nxt]]), cache)[0, -1].argmax())
        return (time.perf_counter() - t0) / n


def decode_llama(llm, n: int) -> float:
    llm.reset()
    llm.eval(PROMPT)
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_moe_decode.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    config = wide_moe()
    moe = hf.init_weights(Phi3ForCausalLM(config), seed=0).eval()
    dense_cfg = config.replace(num_local_experts=0, intermediate_size=2 * config.intermediate_size,
                               layer_norm=False, attention_bias=False, lm_head_bias=False)
    dense = hf.init_weights(Phi3ForCausalLM(dense_cfg), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moe-q8_0.gguf"
        export_gguf(moe, path, scheme="q8_0")
        size = os.path.getsize(path)
        quantize_model(moe, "q8_0")
        quantize_model(dense, "q8_0")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=args.threads, verbose=False)
        runs: dict[str, list[float]] = {"llama.cpp moe": [], "pocketlm moe": [], "pocketlm dense (active twin)": []}
        for _ in range(args.repeats):  # alternate, so that load changes hit every engine alike
            runs["llama.cpp moe"].append(decode_llama(llm, args.decode))
            runs["pocketlm moe"].append(decode_pocketlm(moe, args.decode))
            runs["pocketlm dense (active twin)"].append(decode_pocketlm(dense, args.decode))
        llm.close()
    tps = {k: 1.0 / statistics.median(v) for k, v in runs.items()}
    total, active = config.num_parameters(), config.num_parameters(active=True)
    result = {
        "structure": {"hidden": config.hidden_size, "ffn_per_expert": config.intermediate_size,
                      "experts": config.num_local_experts, "top_k": 2, "layers": config.num_hidden_layers,
                      "total_params": total, "active_params": active, "dense_twin_params": dense_cfg.num_parameters()},
        "gguf_bytes": size, "threads": args.threads, "decode_tokens": args.decode, "repeats": args.repeats,
        "load_average": os.getloadavg(), "tokens_per_s": tps,
        "ratios": {"pocketlm moe / llama.cpp moe": tps["pocketlm moe"] / tps["llama.cpp moe"],
                   "pocketlm moe / pocketlm dense twin": tps["pocketlm moe"] / tps["pocketlm dense (active twin)"]},
    }
    print(f"phi-3.5-MoE structure: {total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token, Q8_0 GGUF "
          f"{size / 2**20:.1f} MiB, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    print(f"{'engine':32s} {'decode tok/s':>12s}")
    for k, v in tps.items():
        print(f"{k:32s} {v:12.1f}")
    for k, v in result["ratios"].items():
        print(f"{k:40s} {v:6.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
