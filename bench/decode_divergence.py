"""Why the C whole-token decode (pl_decode_token) and the PyTorch one-token path differ on real SmolLM2 files.

    python bench/decode_divergence.py [--files Q8_0,Q6_K] [--kv int8] [--tokens 12] [--out FILE.json]

For each file (bench/llamacpp_quantize.py's cache, as bench_cpu_engine.py --real) and KV-cache type, the same
token ids go through three decodes from an empty cache, one token at a time:
  py    the PyTorch path (model forward with the FastKVCache),
  py+1  the same with every embedding row moved by one float32 ulp (torch.nextafter towards +inf),
  C     pl_decode_token (FastDecoder.decode_logits),
and the table gives, per token, max |logit difference| of py+1 and C against py. If C's differences are of the
size a one-ulp input change causes inside the PyTorch path itself, they are amplified rounding, not a different
rule. The first layer's RMSNorm is also redone as kernels.c does it (sum of squares in double) to count how many
of its outputs and of the int8 activation codes they quantize to differ from torch's (float32 mean). Prints a
table (load average) and writes JSON (default $TMPDIR/decode_divergence.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

IDS = [1, 504, 3458, 282, 4195, 314, 7042, 30, 378, 5356, 1018, 28, 2, 198, 1348, 314]
"""SmolLM2 token ids (BOS, then an English phrase)."""


def decode(model, fast, ids: list[int], path: str, perturb: bool = False) -> list[torch.Tensor]:
    """Logits (vocab,) per token, decoding `ids` one at a time from an empty cache on `path` ("py" or "c")."""
    hook = None
    if perturb:
        hook = model.model.embed_tokens.register_forward_hook(
            lambda mod, inp, out: torch.nextafter(out, torch.full_like(out, float("inf"))))
    cache, out = fast.make_cache(1, 64), []
    try:
        with torch.inference_mode():
            for t in ids:
                if path == "c":
                    out.append(fast.decode_logits(t, cache).clone())
                else:
                    out.append(model(torch.tensor([[t]]), cache)[0, -1].float().clone())
    finally:
        if hook is not None:
            hook.remove()
    return out


def norm_flips(model, ids: list[int]) -> list[dict]:
    """Per token: layer 0's input RMSNorm as torch computes it against kernels.c's rmsnorm (double sum of
    squares), and the int8 activation codes (q8_0 blocks) of both."""
    from pocketlm.quant import kernels
    norm = model.model.layers[0].input_layernorm
    w = norm.weight.detach().float().numpy()
    rows = []
    for t in ids:
        with torch.inference_mode():
            x = model.model.embed_tokens(torch.tensor([t])).float().reshape(1, -1)
            ref = norm(x).float()
        xd = x.numpy().astype(np.float64)
        r = np.float32(1.0) / np.sqrt(np.float32((xd * xd).sum() / x.shape[1]) + np.float32(norm.eps),
                                      dtype=np.float32)
        c = torch.from_numpy((w * (x.numpy() * r)).astype(np.float32))
        qa_ref = kernels.quantize_activations(ref.contiguous())[0]
        qa_c = kernels.quantize_activations(c.contiguous())[0]
        rows.append({"token": t, "norm_values_differing": int((ref != c).sum()),
                     "q8_codes_differing": int((qa_ref != qa_c).sum()), "width": x.shape[1]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default="Q8_0,Q6_K")
    ap.add_argument("--kv", default="int8")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llamacpp_quantize

    import pocketlm
    from pocketlm.engine import cpu
    ids = IDS[:a.tokens]
    load_before = os.getloadavg()
    results = []
    for name in a.files.split(","):
        path = str(llamacpp_quantize.smollm2(name, llamacpp_quantize.cache_dir(), threads=2))
        model = pocketlm.load(path)
        fast = cpu.FastDecoder(model, a.kv)
        py, py1, c = decode(model, fast, ids, "py"), decode(model, fast, ids, "py", True), decode(model, fast, ids, "c")
        n = min(py[0].numel(), c[0].numel())
        d1 = [float((x[:n] - y[:n]).abs().max()) for x, y in zip(py, py1)]
        dc = [float((x[:n] - y[:n]).abs().max()) for x, y in zip(py, c)]
        results.append({"file": name, "kv": a.kv, "ids": ids, "py_vs_py_plus_1ulp": d1, "py_vs_c": dc,
                        "layer0_norm": norm_flips(model, ids)})
    print(f"max |logit difference| per token against the PyTorch path, KV cache {a.kv}; load average "
          f"{load_before[0]:.2f}")
    for r in results:
        print(f"{r['file']}: token  py+1ulp      C   | layer-0 norm values / q8 codes differing (C rule vs torch)")
        for i, (x, y, f) in enumerate(zip(r["py_vs_py_plus_1ulp"], r["py_vs_c"], r["layer0_norm"])):
            print(f"  {i:>11d} {x:>8.3f} {y:>8.3f}   | {f['norm_values_differing']:>4d} / {f['q8_codes_differing']} "
                  f"of {f['width']}")
        print(f"  {'max':>11} {max(r['py_vs_py_plus_1ulp']):>8.3f} {max(r['py_vs_c']):>8.3f}")
    out = a.out or str(Path(tempfile.gettempdir()) / "decode_divergence.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"loadavg": load_before, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
