"""The chunked head cross-entropy (pocketlm.train.chunked_loss) equals the plain one: loss and both gradients, in
float32 against float32 and float64 references, for every chunking, with ignored rows and a scaled backward; the
trainer's loss curve is the same with it as with the plain path; and the opt-in CPU bf16 autocast (`cpu_bf16`)
trains to nearly the same curve while keeping old runs' config hashes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketlm.train import chunked_loss
from pocketlm.train.chunked_loss import IGNORE, head_cross_entropy
from pocketlm.train.config import HASHED_UNLESS_DEFAULT, apply_overrides
from pocketlm.train.loop import train
from test_train import make_pretrain_data, pretrain_cfg


def _case(N=37, D=24, V=101, seed=0, ignore=(3, 4, 20)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 2
    weight = torch.randn(V, D, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignore)] = IGNORE
    return hidden, weight, labels


def _plain(hidden, weight, labels, scale=1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.T, labels, ignore_index=IGNORE, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _chunked(hidden, weight, labels, chunk, scale=1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head_cross_entropy(h, w, labels, chunk_rows=chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 1024])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_equals_plain_cross_entropy_fp32(chunk, scale):
    hidden, weight, labels = _case()
    ref = _plain(hidden, weight, labels, scale)
    exact = _plain(hidden.double(), weight.double(), labels, scale)
    got = _chunked(hidden, weight, labels, chunk, scale)
    assert got[0].dtype == torch.float32
    for a, b, e in zip(got, ref, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # |grad| ~ 1-10: float32 summation order
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
    assert torch.all(got[1][[3, 4, 20]] == 0)  # ignored rows: no gradient


def test_batched_shapes_all_ignored_and_a_wrong_label_is_caught():
    hidden, weight, labels = _case(N=24)
    h3, l3 = hidden.view(2, 12, -1), labels.view(2, 12)  # (B, T, D), (B, T) as the trainer passes them
    torch.testing.assert_close(head_cross_entropy(h3, weight, l3, chunk_rows=7), _plain(hidden, weight, labels)[0])
    none = torch.full_like(labels, IGNORE)
    loss, gh, gw = _chunked(hidden, weight, none, 5)
    assert loss == 0 and not gh.any() and not gw.any()
    other = labels.clone()
    other[0] = (other[0] + 1) % weight.shape[0]
    assert not torch.allclose(_chunked(hidden, weight, other, 5)[2], _plain(hidden, weight, labels)[2])


def test_tied_head_gradients_add_up():
    """With a tied embedding the weight gets the embedding's gradient plus the head's, as autograd sums them."""
    hidden, weight, labels = _case(N=16, ignore=())
    ids = torch.arange(16) % weight.shape[0]

    def grads(fn):
        w = weight.clone().requires_grad_()
        x = w[ids] + hidden  # an "embedding" lookup of the same matrix
        fn(x, w).backward()
        return w.grad
    plain = grads(lambda x, w: F.cross_entropy(x @ w.T, labels, reduction="sum"))
    torch.testing.assert_close(grads(lambda x, w: head_cross_entropy(x, w, labels, chunk_rows=3)), plain,
                               rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_plain_autocast_path():
    hidden, weight, labels = _case(N=40, D=32, V=300)

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad
    plain = run(lambda h, w: F.cross_entropy((h @ w.T).float(), labels, ignore_index=IGNORE, reduction="sum"))
    got = run(lambda h, w: head_cross_entropy(h, w, labels, chunk_rows=16))
    assert got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_training_curve_is_the_same_with_and_without_chunking(tmp_path, monkeypatch):
    make_pretrain_data(tmp_path / "data")
    cfg = pretrain_cfg(tmp_path / "data", "phases.0.steps=6", "phases.1.steps=2", "save_every=100")
    calls = []
    real = chunked_loss.head_cross_entropy
    monkeypatch.setattr(chunked_loss, "head_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    chunked = [r["loss"] for r in train(cfg, tmp_path / "a", progress=False)]
    assert len(calls) == 16  # 8 steps x 2 micro-batches went through the chunked loss
    monkeypatch.setattr(chunked_loss, "applies", lambda model: False)
    plain = [r["loss"] for r in train(cfg, tmp_path / "b", progress=False)]
    assert len(calls) == 16
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0] - 0.5
    # bf16 autocast on the CPU: a different (faster) recipe, the same curve to bf16 precision
    bf16 = apply_overrides(cfg, ["cpu_bf16=true"])
    assert bf16.hash() != cfg.hash()
    d = cfg.to_dict()
    assert set(HASHED_UNLESS_DEFAULT) <= set(d)
    fast = [r["loss"] for r in train(bf16, tmp_path / "c", progress=False)]
    assert fast != chunked and fast == pytest.approx(chunked, rel=2e-2, abs=2e-2)


def test_new_fields_keep_old_hashes():
    from pocketlm.train.config import UNHASHED, recipe
    import hashlib
    import json
    cfg = recipe("tiny-pretrain")
    d = cfg.to_dict()
    for k in (*UNHASHED, *HASHED_UNLESS_DEFAULT):
        d.pop(k)
    assert cfg.hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_fsdp_sharded_heads_are_not_chunked():
    from pocketlm.config import preset
    from pocketlm.formats import hf
    model = hf.init_weights(hf.empty_model(preset("tiny"), torch.float32, torch.device("cpu")), seed=0)
    assert chunked_loss.applies(model)
    model.lm_head.weight.device_mesh = object()  # what a DTensor parameter has
    assert not chunked_loss.applies(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_equals_plain_cross_entropy_on_cuda_with_bf16_autocast():
    hidden, weight, labels = (t.cuda() for t in _case(N=300, D=64, V=1000))

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w)
        (loss * 0.5).backward()
        return loss.detach(), h.grad, w.grad
    plain = run(lambda h, w: F.cross_entropy((h @ w.T).float(), labels, ignore_index=IGNORE, reduction="sum"))
    got = run(lambda h, w: head_cross_entropy(h, w, labels, chunk_rows=128))
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_cpu_bf16_resume_is_bit_exact(tmp_path):
    make_pretrain_data(tmp_path / "data")
    cfg = pretrain_cfg(tmp_path / "data", "phases.0.steps=4", "phases.1.steps=2", "save_every=3", "cpu_bf16=true")
    full = [r["loss"] for r in train(cfg, tmp_path / "a", progress=False)]
    train(cfg, tmp_path / "b", progress=False, max_steps=5)  # last checkpoint: step 3; steps 4-5 are redone
    assert [r["loss"] for r in train(cfg, tmp_path / "b", progress=False)] == full
