"""phi-3.5-MoE GGUF in llama.cpp's `phimoe` layout: pocketlm writes it, reads it back exactly, and llama.cpp
(llama-cpp-python) loads and runs it.

llama.cpp computes this architecture with other maths than the reference (its phi3 graph: RMSNorm + bias instead
of LayerNorm, softmax-top-2-renormalise instead of SparseMixer), so its tokens are compared with an independent
re-statement of *its* maths on our weights (which proves the tensor layout and every weight's placement), and the
test records that the reference maths gives different logits on the same file."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import pocketlm
import pocketlm.moe as moe
from pocketlm.config import RopeScaling, preset
from pocketlm.formats import hf
from pocketlm.model import Phi3ForCausalLM
from pocketlm.quant.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test-time reference)")
IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]


@pytest.fixture(scope="module")
def model():
    base = preset("tiny-moe")
    rs = base.rope_scaling  # llama.cpp applies one magnitude in both modes: equal mscales
    config = base.replace(rope_scaling=RopeScaling(short_factor=rs.short_factor, long_factor=rs.long_factor,
                                                   short_mscale=1.15, long_mscale=1.15))
    m = hf.init_weights(Phi3ForCausalLM(config), seed=4).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # random norms and biases, a decisive router, weights large enough to matter
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "block_sparse_moe.gate" in n:
                p.mul_(30)
            elif "embed" not in n:
                p.mul_(3)
    return m


@contextlib.contextmanager
def llamacpp_maths(model):
    """Run `model` the way llama.cpp's phimoe graph does: RMSNorm with bias, softmax top-2 renormalised."""
    def route(logits, eps):
        w, e = torch.softmax(logits, -1).topk(2, dim=-1)
        return w / w.sum(-1, keepdim=True), e

    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    for m in norms:
        m.forward = lambda x, m=m: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * m.weight + m.bias
    saved, moe.sparsemixer_route = moe.sparsemixer_route, route
    try:
        yield model
    finally:
        moe.sparsemixer_route = saved
        for m in norms:
            del m.forward


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)


def _greedy(step_logits, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(step_logits(seq))))
    return seq[len(ids):]


def test_export_import_and_llama_cpp_runs_it(tmp_path, model):
    path = tmp_path / "moe.gguf"
    written = export_gguf(model, path, scheme="f32")
    assert written["blk.0.ffn_gate_exps.weight"] == "F32" and written["blk.1.ffn_gate_inp.weight"] == "F32"
    back = pocketlm.load(path)
    assert back.config.is_moe and back.config.num_local_experts == 4 and back.config.router_jitter_noise == 0.01
    assert back.config.rope_scaling.short_mscale == back.config.rope_scaling.long_mscale == 1.15
    for n, p in model.state_dict().items():
        assert torch.equal(p, back.state_dict()[n]), n
    llm = _llama(path)
    try:
        llm.eval(IDS)
        theirs = np.array(llm.scores[:len(IDS)])
        with torch.no_grad():
            ref = model(torch.tensor([IDS]))[0].numpy()
            with llamacpp_maths(model):
                same_maths = model(torch.tensor([IDS]))[0].numpy()
        scale = np.abs(same_maths).max()
        assert np.abs(theirs - same_maths).max() < 2e-3 * scale  # the file's layout, read by llama.cpp
        assert np.abs(theirs - ref).max() > 5e-2 * scale  # llama.cpp's maths is not the reference's

        def llama_step(seq):
            llm.reset()
            llm.eval(seq)
            return llm.scores[len(seq) - 1]

        def ours_step(seq):
            with torch.no_grad(), llamacpp_maths(model):
                return model(torch.tensor([seq]))[0, -1].numpy()

        assert _greedy(llama_step, IDS, 8) == _greedy(ours_step, IDS, 8)
    finally:
        llm.close()


def test_quantized_export_runs_in_llama_cpp(tmp_path, model):
    path = tmp_path / "moe-q8.gguf"
    written = export_gguf(model, path, scheme="q8_0")
    assert written["blk.0.ffn_down_exps.weight"] == "Q8_0" and written["blk.0.ffn_gate_inp.weight"] == "F32"
    back = pocketlm.load(path)  # dequantized on import
    llm = _llama(path)
    try:
        llm.eval(IDS)
        theirs = np.array(llm.scores[:len(IDS)])
        with torch.no_grad(), llamacpp_maths(back):
            same_maths = back(torch.tensor([IDS]))[0].numpy()
        assert np.abs(theirs - same_maths).max() < 5e-2 * np.abs(same_maths).max()  # plus int8 activations
    finally:
        llm.close()
