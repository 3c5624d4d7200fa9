"""Cross-entropy over the output head, computed chunk by chunk so that the (tokens x vocab) logits never exist whole.

`head_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE, reduction="sum")` and has the same
gradients for `hidden` and `weight`, but holds at most `chunk_rows` rows of logits at a time: for each chunk of
tokens it computes the logits (c, V), the loss terms, and at once the gradient of the summed loss with respect to
those logits (softmax - one-hot, zero on ignored rows), which it turns into this chunk's rows of d hidden and its
contribution to d weight. Backward only scales the stored gradients by the incoming gradient (the trick of Liger
Kernel's fused linear cross-entropy). On the 32,064-row Phi-3 head this avoids the fp32 logits, their log-softmax
and the gradient of the log-softmax (three (N, V) tensors) and one pass over each.

Precision: the logits and gradient matmuls run in the autocast dtype when autocast is on (bf16, as the plain
`lm_head` call would under autocast), else in the inputs' dtype; log-sum-exp, the loss and the accumulation of d
weight over chunks are float32. In float32 the result equals the plain path up to summation order (tested to
1e-5 relative). The stored gradients are used once: the graph cannot be backpropagated twice (retain_graph).
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100
DEFAULT_CHUNK_ROWS = 1024


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        # hidden (N, D), weight (V, D), labels (N,)
        N = hidden.shape[0]
        w = weight.to(compute_dtype)  # (V, D)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)  # (N, D)
        grad_w = None  # (V, D) float32, the sum over chunks
        for s in range(0, N, chunk_rows):
            h = hidden[s:s + chunk_rows].to(compute_dtype)  # (c, D)
            lab = labels[s:s + chunk_rows]
            valid = lab != IGNORE  # (c,)
            safe = torch.where(valid, lab, 0)
            logits = (h @ w.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target = logits.gather(1, safe[:, None])[:, 0]
            loss += torch.where(valid, lse - target, 0.0).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, safe] -= 1.0  # d(sum of losses) / d logits = softmax - one-hot
            probs.mul_(valid[:, None])  # ignored rows contribute nothing
            g = probs.to(compute_dtype)  # (c, V)
            grad_h[s:s + chunk_rows] = g @ w  # (c, D)
            part = g.T @ h  # (V, D)
            if grad_w is None:
                grad_w = part.float()  # no copy when the compute dtype is float32
            else:
                grad_w += part
        if grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):  # the scale of `loss * scale`.backward()
            grad_h, grad_w = grad_h.mul_(grad_out.to(grad_h.dtype)), grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Summed token cross-entropy of `hidden @ weight.T` against `labels` (IGNORE rows skipped), float32 scalar.

    hidden: (..., D) final-norm outputs; weight: (V, D) the output head; labels: (...) token ids or IGNORE."""
    assert chunk_rows > 0, chunk_rows
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(dev, enabled=False):
        return _HeadCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), chunk_rows, dtype)


def applies(model: nn.Module) -> bool:
    """Whether the model's head can be replaced by `head_cross_entropy`: a bias-free `nn.Linear` whose weight is
    an ordinary tensor (under FSDP the head's weight is a sharded DTensor, gathered only inside forward)."""
    head = getattr(model, "lm_head", None)
    if getattr(getattr(model, "config", None), "model_type", "phi3") == "phi3small":
        return False  # its logits are lm_head / mup_width_multiplier with the dummy ids masked (model_small.py)
    return (isinstance(head, nn.Linear) and head.bias is None and not hasattr(head.weight, "device_mesh")
            and not type(model).__name__.startswith("FSDP"))


def causal_lm_loss(model: nn.Module, labels: torch.Tensor, **forward) -> torch.Tensor:
    """Summed cross-entropy of `model(**forward)` against `labels` (B, T): through `head_cross_entropy` where it
    `applies`, else the plain way (full float32 logits, `F.cross_entropy`). `forward` holds the model call:
    {"input_ids": ...} (plain causal) or {"batched": (ids, positions, mask)} (`forward_batched`)."""
    import torch.nn.functional as F
    batched = forward.pop("batched", None)

    def run(**kw):
        return model.forward_batched(*batched, **kw) if batched is not None else model(**forward, **kw)
    if applies(model):
        return head_cross_entropy(run(hidden=True), model.lm_head.weight, labels)
    logits = run()  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
