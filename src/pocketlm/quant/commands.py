"""pocketlm quantize: write a model as GGUF (llama.cpp / Ollama) or quantized safetensors.

    pocketlm quantize MODEL OUT --scheme SCHEME [--keep-embeddings f16] [--format gguf]

SCHEME: f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, iq4_nl (every weight matrix that type), the K-quants q4_k, q5_k,
q6_k, and q4_k_m, llama.cpp's Q4_K_M mix (Q4_K, with Q6_K for the output and for `down_proj` in the layers
llama.cpp's `use_more_bits` picks, Q5_K for the fused `qkv_proj`: `quant.linear.q4_k_m_type`). Bytes are
llama.cpp's own quantizers' without an importance matrix (`quant.codecs`). A tensor whose rows do not fit the
type's block falls back per tensor (the output of `tensor_type`), as llama.cpp does.

MODEL is anything `pocketlm.load` reads (checkpoint folder, .safetensors, preset) or a phi3/llama .gguf file
(its weights are dequantized first, then quantized to the scheme: requantizing loses quality). The scheme and
every tensor's type are written into the output file; loading reads them from there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.quant.linear import KEEP_TYPES, SCHEMES, check_scheme


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pocketlm quantize`."""
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder, .safetensors, .gguf or preset name")
    parser.add_argument("output", metavar="OUT", help="output .gguf file, or folder for --format safetensors")
    parser.add_argument("--scheme", required=True, metavar="SCHEME",
                        help=f"type of the weight matrices: {', '.join(SCHEMES)} (q4_k_m: llama.cpp's Q4_K_M mix)")
    parser.add_argument("--keep-embeddings", choices=sorted(KEEP_TYPES), default=None,
                        help="type of the token embedding and lm_head (default: the scheme's)")
    parser.add_argument("--format", choices=("gguf", "safetensors"), default="gguf", help="output format")
    parser.add_argument("--force", action="store_true", help="overwrite OUT")


def _load(spec: str):
    import pocketlm

    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        from pocketlm.formats.gguf_model import load_gguf, load_gguf_tokenizer
        return load_gguf(path, dequantize=True), load_gguf_tokenizer(path)
    model = pocketlm.load(spec)
    tokenizer = None
    folder = path if path.is_dir() else path.parent
    if path.exists() and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        tokenizer = pocketlm.Tokenizer.from_pretrained(folder)
    if getattr(model.config, "model_type", "phi3") == "phi3small":  # cl100k_base + its specials (tokenizer_small)
        from pocketlm.tokenizer_small import Phi3SmallTokenizer
        tokenizer = Phi3SmallTokenizer.from_pretrained(folder)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    """Quantize MODEL to a GGUF file or a quantized safetensors folder (see the module docstring)."""
    check_scheme(args.scheme)  # before any model is read
    out = Path(args.output)
    if out.exists() and not args.force and (out.is_file() or any(out.iterdir())):
        raise PocketLMError(f"{out} exists; pass --force to overwrite")
    t0 = time.perf_counter()
    model, tokenizer = _load(args.model)
    if args.format == "gguf":
        from pocketlm.quant.gguf_export import check_exportable, export_gguf
        from pocketlm.quant.gguf_tokenizer import ByteLevelBPETokenizer
        from pocketlm.tokenizer import Tokenizer
        check_exportable(model.config)
        if tokenizer is not None and not isinstance(tokenizer, (Tokenizer, ByteLevelBPETokenizer)):
            raise PocketLMError(f"{args.model}: GGUF export writes a Llama SentencePiece or a byte-level BPE "
                                f"(\"gpt2\") vocabulary; this model's tokenizer is {type(tokenizer).__name__}")
        types = export_gguf(model, out, tokenizer=tokenizer, scheme=args.scheme, keep_embeddings=args.keep_embeddings)
    else:
        from pocketlm.quant.linear import model_tensor_types, quantize_model
        from pocketlm.quant.qcheckpoint import save_quantized
        quantize_model(model, args.scheme, keep_embeddings=args.keep_embeddings, backend="reference")
        save_quantized(model, out, scheme=args.scheme, tokenizer=tokenizer)
        types = model_tensor_types(model)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.iterdir())
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.format}, scheme {args.scheme}) in "
          f"{time.perf_counter() - t0:.1f}s; tensor types: {summary}")
    return 0
