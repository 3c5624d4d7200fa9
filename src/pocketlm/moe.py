"""phi-3.5-MoE's feed-forward block: 16 SiLU-gated experts per layer, two of them chosen per token by the
SparseMixer router, and the router load-balancing loss used in training.

The maths follows the released checkpoint and transformers' `models/phimoe/modeling_phimoe.py` (facts only):

- router: `gate` is a bias-free Linear(hidden -> experts) giving logits s (one row per token);
- SparseMixer selection at inference (it is not "softmax, top-2, renormalise"):
    first expert  e1 = argmax s; its weight is softmax over the logits *near* the max, at e1, where "near" keeps
                  s_j with (max - s_j) / max(|s_j|, max) <= 2 * jitter_eps and drops the rest to -inf;
    second expert e2 = argmax of s with e1 set to -inf (threshold t2 = s[e2]); its weight is softmax over
                  (s with e1 at -inf) keeping s_j with (t2 - s_j) / max(|s_j|, t2) <= 2 * jitter_eps, at e2.
  The two weights are used as they are (they do not sum to 1). With a small jitter_eps (0.01) most tokens
  give each selected expert weight 1.0 unless another logit is within ~2% of it.
- experts: `experts.N.w1` (gate), `w3` (up), `w2` (down): y = w2(silu(w1 x) * w3 x), names as in the checkpoint;
- load-balancing loss (Switch Transformer eq. 4-6, as transformers' `load_balancing_loss_func` computes it):
  with every layer's router logits stacked over rows, f_e = (top-2 assignments of softmax(s) to e) / rows and
  P_e = (sum of softmax(s)_e) / rows, loss = E * sum_e f_e * P_e (= 2 when routing is perfectly balanced).

Training (config `moe_training`): "deterministic" uses the inference selection with gradients through the
selected weights (FSDP ranks agree exactly); "sparsemixer" is the reference's estimator (`sparsemixer_train`):
input jitter, Gumbel-sampled experts among the near-max ones, the weight times 1 or 1/3 (Heun's third-order
midpoint rule) and its own gradient, drawing random numbers in the reference's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sparsemixer_route(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's inference routing. logits: (N, E) -> weights (N, 2) in the logits' dtype, experts (N, 2).

    Differentiable in `logits` through the weights (the selection itself is discrete)."""
    with torch.no_grad():
        top1, e1 = logits.max(dim=-1, keepdim=True)  # (N, 1)
        far1 = (top1 - logits) / logits.abs().clamp(min=top1) > 2 * jitter_eps  # (N, E) dropped from softmax 1
    w1 = torch.softmax(logits.masked_fill(far1, float("-inf")), dim=-1).gather(-1, e1)  # (N, 1)
    without_e1 = torch.scatter(logits, -1, e1, float("-inf"))  # (N, E)
    with torch.no_grad():
        top2, e2 = without_e1.max(dim=-1, keepdim=True)
        # the reference measures the distance from the second threshold on the original logits (e1 included,
        # but it is -inf in `without_e1` either way)
        far2 = (top2 - logits) / logits.abs().clamp(min=top2) > 2 * jitter_eps
    w2 = torch.softmax(without_e1.masked_fill(far2, float("-inf")), dim=-1).gather(-1, e2)  # (N, 1)
    return torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)


class _HeunMultiplier(torch.autograd.Function):
    """The sampled expert's weight `multiplier * mask_for_one`, whose gradient goes to the router logits as
    SparseMixer defines it: d/ds = g * multiplier * (onehot(selected) - masked_gates)."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad):
        multiplier, selected, masked_gates = ctx.saved_tensors
        grad = grad * multiplier
        grad_scores = (masked_gates * -grad).scatter_add(-1, selected, grad)
        return grad_scores, None, None, None, None


def _sampled_pick(scores: torch.Tensor, candidates: torch.Tensor, threshold: torch.Tensor, jitter_eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseMixer training draw among `candidates` (scores with already-picked experts at -inf)."""
    with torch.no_grad():
        far = (threshold - scores) / scores.abs().clamp(min=threshold) > 2 * jitter_eps
    masked = candidates.masked_fill(far, float("-inf"))
    noise = torch.empty_like(masked, memory_format=torch.legacy_contiguous_format).exponential_().log()
    picked = (masked - noise).max(dim=-1)[1].unsqueeze(-1)  # Gumbel-max sampling, (N, 1)
    gates = torch.softmax(masked, dim=-1)
    return picked, gates


def sparsemixer_train(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's training routing, as the reference computes it (random: the global torch RNG, drawn in the
    reference's order). logits: (N, E) -> weights (N, 2), experts (N, 2)."""
    weights, experts = [], []
    candidates = logits
    for k in range(2):
        with torch.no_grad():
            threshold = candidates.max(dim=-1, keepdim=True)[0]
        picked, gates = _sampled_pick(logits, candidates, threshold, jitter_eps)
        multiplier = gates.gather(-1, picked)
        top = gates.max(dim=-1, keepdim=True)
        coin = torch.rand_like(top[0])
        if k == 1:
            coin = coin.uniform_()  # the reference draws the second coin twice
        mask_for_one = torch.add(0.3333, torch.logical_or(picked == top[1], coin > 0.75), alpha=0.6667).type_as(gates)
        weights.append(_HeunMultiplier.apply(logits, multiplier, picked, gates, mask_for_one))
        experts.append(picked)
        candidates = torch.scatter(logits, -1, picked, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(experts, dim=-1)


class Expert(nn.Module):
    """One SiLU-gated feed-forward expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)  # gate
        self.w2 = nn.Linear(intermediate, hidden, bias=False)  # down
        self.w3 = nn.Linear(hidden, intermediate, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoeBlock(nn.Module):
    """`block_sparse_moe`: router `gate` plus `experts`; only the experts some token selected are run, each on
    its own tokens (a decode step reads the weights of two experts per layer).

    In training mode the router logits of the last forward are kept in `router_logits` (rows, E) for the
    load-balancing loss; in eval mode nothing is kept."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, jitter_eps: float, *,
                 sampled_training: bool = False, input_jitter: float = 0.0):
        super().__init__()
        self.jitter_eps = jitter_eps
        self.sampled_training, self.input_jitter = sampled_training, input_jitter
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate) for _ in range(num_experts))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        sampled = self.training and self.sampled_training
        if sampled and self.input_jitter > 0:  # the reference jitters in the block, then again in the router
            x = x * torch.empty_like(x).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        x = x.reshape(-1, shape[-1])  # (N, hidden)
        if sampled and self.input_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        logits = self.gate(x)  # (N, E)
        self.router_logits = logits if self.training else None
        route = sparsemixer_train if sampled else sparsemixer_route
        weights, chosen = route(logits, self.jitter_eps)  # (N, 2), (N, 2)
        if x.shape[0] == 1 and not self.training:  # a decode step: two expert calls, no grouping
            e1, e2 = chosen[0].tolist()
            y = self.experts[e1](x) * weights[:, :1] + self.experts[e2](x) * weights[:, 1:]
            return y.to(x.dtype).view(shape)
        out = torch.zeros_like(x)
        # training runs every expert, on no rows when none chose it: its gradient is then zeros, not None, so
        # that every rank of FSDP and every micro-batch reduce the same tensors
        for e in range(len(self.experts)) if self.training else torch.unique(chosen).tolist():
            rows, slot = torch.where(chosen == e)  # tokens that chose expert e, and in which of their 2 slots
            y = self.experts[e](x[rows]) * weights[rows, slot, None]  # (n_e, hidden)
            out = out.index_add(0, rows, y.to(out.dtype))
        return out.view(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int = 2,
                        row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The auxiliary load-balancing loss over all layers' router logits (each (rows, E), rows in the same order
    in every layer). row_mask: optional (rows,) 0/1 weights that leave rows out (padding)."""
    num_experts = router_logits[0].shape[-1]
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    total = torch.zeros((), dtype=torch.float32, device=counts.device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (rows, E)
        top = probs.topk(top_k, dim=-1).indices  # (rows, top_k)
        w = torch.ones(probs.shape[0], device=probs.device) if row_mask is None else row_mask.float()
        counts = counts.index_add(0, top.reshape(-1), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * w[:, None]).sum(dim=0)
        total = total + w.sum()
    return num_experts * torch.sum((counts / total) * (prob_sum / total))


def with_aux_loss(model: nn.Module, loss_sum: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A training objective's (sum of token losses, metric sums) with the MoE load-balancing loss added as the
    reference adds it (loss = mean token loss + router_aux_loss_coef * aux): the sum form carries
    `coef * aux * tokens`, so that dividing by the token count gives the reference's loss. The metric
    "aux_loss" (summed the same way) reports aux whatever the coefficient. A dense model: unchanged, no metric."""
    aux = model_aux_loss(model)
    if aux is None:
        return loss_sum, {}
    n = tokens.to(aux.dtype)
    coef = model.config.router_aux_loss_coef
    return loss_sum + coef * aux * n if coef else loss_sum, {"aux_loss": aux.detach() * n}


def model_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The load-balancing loss of the MoE layers' last training forward; None for a dense model or when no
    router logits were kept (eval mode)."""
    logits = [m.router_logits for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not logits or any(t is None for t in logits):
        return None
    return load_balancing_loss(logits)
