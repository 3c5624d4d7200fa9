"""phi-3.5-MoE training: the objective with the router load-balancing loss equals transformers' PhimoeForCausalLM
loss (labels + output_router_logits), `pocketlm train` reports it, and FSDP2 on 2 processes equals 1 process."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pocketlm.config import preset
from pocketlm.formats import hf
from pocketlm.model import Phi3ForCausalLM
from pocketlm.moe import SparseMoeBlock
from pocketlm.train.loop import build_model, pretrain_loss
from pocketlm.train.sft import IGNORE
from test_train import make_pretrain_data
from test_train_fsdp import LINEAR_ATOL, LINEAR_EPS, _config, _run, differences

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

MOE = ["--set", "model=tiny-moe", "--set", "model_overrides.router_aux_loss_coef=0.02"]


def test_training_loss_with_aux_equals_reference(tmp_path):
    config = preset("tiny-moe").replace(vocab_size=512, eos_token_id=2, router_aux_loss_coef=0.02)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():  # a router wide enough that routing is uneven (a non-trivial aux loss)
        for m in model.modules():
            if isinstance(m, SparseMoeBlock):
                m.gate.weight.mul_(30)
    hf.save_checkpoint(model, tmp_path)
    ref = transformers.PhimoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    model.train()
    loss_sum, count, metrics = pretrain_loss(model, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        out = ref(ids, labels=ids, output_router_logits=True)
    assert abs(loss_sum.item() / count.item() - out.loss.item()) < 1e-5
    assert abs(metrics["aux_loss"].item() / count.item() - out.aux_loss.item()) < 1e-5
    assert out.aux_loss.item() > 2.02  # uneven routing: 0.02 * aux shows in the loss beyond 1e-5 (balanced: 2)
    loss_sum.backward()
    assert model.model.layers[0].block_sparse_moe.gate.weight.grad.abs().sum() > 0
    model.eval()  # eval forwards keep no router logits: no aux term, no metric
    assert pretrain_loss(model, {"input_ids": ids, "labels": labels})[2] == {}


def test_pocketlm_train_reports_aux_loss_and_fsdp_two_processes_equal_one(tmp_path):
    web, syn = make_pretrain_data(tmp_path)
    args = ["pretrain", "--recipe", "tiny-pretrain", "--set", f"sources.web={web}", "--set",
            f"sources.synthetic={syn}", "--set", "phases.0.steps=3", "--set", "phases.1.steps=2",
            "--set", "save_every=5", "--set", f"optim.eps={LINEAR_EPS}", *MOE]
    one, two = _run(tmp_path / "one", args, 1), _run(tmp_path / "two", args, 2)
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["aux_loss"] >= 2.0 - 1e-6 for r in records)
    assert set(one[1]) == set(hf.expected_shapes(build_model(_config(args), torch.device("cpu")).config))
    start = build_model(_config(args), torch.device("cpu")).state_dict()
    moved = min(float((one[1][n] - start[n]).abs().max()) for n in one[1])
    assert moved > 10 * LINEAR_ATOL  # every tensor moved (the least: a key bias, ~5e-5), every expert included
    found = differences(one, two, weight_bound=LINEAR_ATOL, noise=LINEAR_ATOL, rare=0.0)
    assert not found, found


def test_unchosen_experts_get_zero_gradients_not_none():
    """Every rank and micro-batch then reduces the same tensors (FSDP2), and AdamW treats them alike."""
    block = SparseMoeBlock(16, 32, 8, 0.01).train()
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[0, 0], block.gate.weight[1, 0] = 5.0, 4.0  # every token picks experts 0 and 1
    block(torch.ones(3, 16)).sum().backward()
    grads = [e.w1.weight.grad for e in block.experts]
    assert all(g is not None for g in grads)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert all(float(g.abs().sum()) == 0.0 for g in grads[2:])


def test_sampled_sparsemixer_training_equals_reference():
    """moe_training="sparsemixer": the same random draws as transformers' training-mode PhimoeForCausalLM (same
    seed), so the same experts, weights, loss and gradients."""
    from transformers.models.phimoe import modeling_phimoe

    from pocketlm.moe import sparsemixer_train
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 8, generator=g) * torch.tensor([0.05, 1.0, 4.0, 0.2]).repeat(16)[:, None]
    upstream = torch.randn(64, 2, generator=g)
    ours, theirs = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    torch.manual_seed(7)
    w, e = sparsemixer_train(ours, 0.01)
    torch.manual_seed(7)
    ref_w, ref_e = modeling_phimoe.sparsemixer(theirs, jitter_eps=0.01, training=True)
    assert torch.equal(e, ref_e) and torch.equal(w, ref_w)
    assert (w.detach() < 0.34).any() and (e[:, 0] != scores.argmax(-1)).any()  # the 1/3 rule and sampling happen
    (w * upstream).sum().backward()
    (ref_w * upstream).sum().backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6) and ours.grad.abs().sum() > 0
    # the whole model in training mode, input jitter included
    config = preset("tiny-moe").replace(vocab_size=512, eos_token_id=2, router_aux_loss_coef=0.02,
                                        moe_training="sparsemixer")
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).train()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_checkpoint(model, tmp)
        ref = transformers.PhimoeForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    torch.manual_seed(3)
    loss_sum, count, _ = pretrain_loss(model, {"input_ids": ids, "labels": labels})
    torch.manual_seed(3)
    out = ref(ids, labels=ids, output_router_logits=True)
    assert abs(loss_sum.item() / count.item() - out.loss.item()) < 1e-5
    (loss_sum / count).backward()
    out.loss.backward()
    for name in ("model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.self_attn.q_proj.weight"):
        hf_name = name.replace("block_sparse_moe.gate", "mlp.router")
        a, b = dict(model.named_parameters())[name].grad, dict(ref.named_parameters())[hf_name].grad
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max()), name
    torch.manual_seed(4)  # another seed: other draws
    assert abs(pretrain_loss(model, {"input_ids": ids, "labels": labels})[0].item() - loss_sum.item()) > 1e-4
