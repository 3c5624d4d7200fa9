"""phi-3.5-vision image encoding on the CPU, at the released shape (CLIP ViT-L/14-336 + 4096->3072 projector).

One picture through pocketlm's path -- preprocess (`pocketlm.image.preprocess`), then the tower, the 2x2 merge
with separators and the projector (`Phi3ImageEmbedding`) -- against transformers' `CLIPVisionModel` run on the
same crops (hidden_states[-2]), the baseline, in the same process. Random weights (the time does not depend on
them), float32. Prints a table and writes bench/results/bench_vision.json.

    python bench/bench_vision.py                  # a 500x300 picture, num_crops 4 (5 crops)
    python bench/bench_vision.py --size 336x336 --num-crops 1   # 2 crops, the cheapest
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="500x300", help="picture WIDTHxHEIGHT (default 500x300)")
    ap.add_argument("--num-crops", type=int, default=4, help="HD transform tiles at most (default 4, the release's)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_vision.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from PIL import Image

    from pocketlm import vision
    from pocketlm.image import preprocess

    w, h = (int(x) for x in args.size.lower().split("x"))
    im = Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8"))
    config = vision.vision_preset("phi-3.5-vision")
    torch.manual_seed(0)
    emb = vision.Phi3ImageEmbedding(config).eval()  # the image side only: the language model is not built
    c = config.clip
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=c.layer_norm_eps)).eval()

    t0 = time.perf_counter()
    p = preprocess(im, num_crops=args.num_crops)
    t_pre = time.perf_counter() - t0
    rows, cols = p.crops
    crops = p.pixel_values[:1 + rows * cols]  # the padding crops are never encoded
    with torch.inference_mode():
        emb(crops[None, :2], [(c.image_size, c.image_size)])  # warm-up (one tile)
        t0 = time.perf_counter()
        out = emb(p.pixel_values[None], [p.image_size])[0]
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref(crops, output_hidden_states=True)
        t_ref = time.perf_counter() - t0
    assert out.shape[0] == p.num_tokens
    result = {"picture": f"{w}x{h}", "num_crops": args.num_crops, "crops_encoded": int(crops.shape[0]),
              "image_tokens": p.num_tokens, "threads": args.threads, "cpu_count": os.cpu_count(),
              "load_1min": os.getloadavg()[0], "preprocess_s": round(t_pre, 3),
              "pocketlm_encode_s": round(t_ours, 3), "transformers_clip_s": round(t_ref, 3),
              "ratio_pocketlm_over_transformers": round(t_ours / t_ref, 3)}
    print(f"{'picture':>10} {'crops':>5} {'tokens':>6} {'preprocess':>11} {'pocketlm encode':>16} "
          f"{'transformers CLIP':>18} {'ratio':>6}")
    print(f"{result['picture']:>10} {result['crops_encoded']:>5} {p.num_tokens:>6} {t_pre:>10.3f}s {t_ours:>15.3f}s "
          f"{t_ref:>17.3f}s {t_ours / t_ref:>6.2f}")
    print(f"(pocketlm's time includes the 2x2 merge and the projector; the machine's 1-minute load was "
          f"{result['load_1min']:.1f} on {os.cpu_count()} cores)")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
