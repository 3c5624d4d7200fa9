"""Direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290) with the sigmoid loss.

For a prompt x with chosen y_w and rejected y_l, with log-probs summed over the completion tokens:

    z    = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss = -log sigmoid(z)                       averaged over the pairs of the global batch

The completion is the assistant turn as `pocketlm.chat.render` writes it after the generation prompt, up to
and including `<|end|>` (`<|im_end|>` in ChatML; the same tokens SFT trains). The reference is the starting model, frozen; its
log-probs are precomputed once before training (`dpo_precompute_ref`) or computed per batch.
Metrics, named as in TRL's DPOTrainer: rewards/chosen = beta * (pi_w - ref_w), rewards/rejected, rewards/margins,
rewards/accuracies (chosen reward > rejected reward), logps/chosen, logps/rejected (policy).
Deviations from TRL: no label smoothing / IPO / other loss types; rows are right-padded, not packed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from pocketlm.chat import parse_messages, render, turn_end_id
from pocketlm.data.shards import DataError
from pocketlm.errors import ChatFormatError
from pocketlm.train.sft import IGNORE, read_jsonl


def encode_pair_side(prompt: list[dict], completion: str, tokenizer, *, format: str | None = None
                     ) -> tuple[list[int], int, int]:
    """(ids, start, end): ids of prompt + assistant completion; the completion is ids[start:end] (with <|end|>)."""
    prefix = render(prompt, tokenizer, add_generation_prompt=True, format=format)
    full = render(prompt + [{"role": "assistant", "content": completion}], tokenizer,
                  add_generation_prompt=False, format=format)
    if full[:len(prefix)] != prefix:
        raise ChatFormatError(f"chat format {format!r}: the prompt is not a prefix of the rendered conversation")
    end = full.index(turn_end_id(tokenizer, format), len(prefix)) + 1
    return full[:end], len(prefix), end


def _side(ids: list[int], start: int, seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:seq_len + 1]  # a completion longer than the row is cut
    row = np.full(seq_len, pad, np.int64)
    labels = np.full(seq_len, IGNORE, np.int64)
    inputs = ids[:-1]
    row[:len(inputs)] = inputs
    for t in range(max(start - 1, 0), len(ids) - 1):  # input t predicts token t+1, a completion token iff t+1 >= start
        labels[t] = ids[t + 1]
    return row, labels


class PreferencePairs:
    """A MixtureLoader source over a JSONL file of {"prompt": messages | str, "chosen": str, "rejected": str}.

    Items: chosen_ids/chosen_labels/rejected_ids/rejected_labels (seq_len,) and index (1,)."""

    def __init__(self, path: str | os.PathLike, tokenizer, seq_len: int, *, format: str | None = None):
        self.items, self.skipped = [], 0
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        for n, rec in enumerate(read_jsonl(path), 1):
            prompt = rec.get("prompt")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            try:
                parse_messages(prompt)
                sides = {}
                for key in ("chosen", "rejected"):
                    text = rec.get(key)
                    if not isinstance(text, str):
                        raise ChatFormatError(f"{key!r} must be a string, got {text!r:.60}")
                    ids, start, _ = encode_pair_side(prompt, text, tokenizer, format=format)
                    if start >= seq_len:
                        break
                    sides[key] = _side(ids, start, seq_len, pad)
            except ChatFormatError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            if len(sides) < 2:
                self.skipped += 1  # the prompt alone fills the row
                continue
            index = np.asarray([len(self.items)], np.int64)
            self.items.append({"chosen_ids": sides["chosen"][0], "chosen_labels": sides["chosen"][1],
                               "rejected_ids": sides["rejected"][0], "rejected_labels": sides["rejected"][1],
                               "index": index})
        if not self.items:
            raise DataError(f"{path}: no preference pair fits seq_len {seq_len}")

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> dict[str, np.ndarray]:
        return self.items[i]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the labelled positions of log softmax(logits)[label]: (B, T, V), (B, T) -> (B,), in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs, one forward over both halves."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps = sequence_logps(model(ids), labels)
    n = batch["chosen_ids"].shape[0]
    return logps[:n], logps[n:]


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses, chosen rewards and rejected rewards (all (B,))."""
    chosen = beta * (pi_c - ref_c)
    rejected = beta * (pi_r - ref_r)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


@torch.no_grad()
def reference_logps(ref_model, source: PreferencePairs, device, batch_size: int = 8) -> torch.Tensor:
    """(len(source), 2) reference log-probs [chosen, rejected] of every pair, in fp32 on the CPU."""
    out = []
    for lo in range(0, len(source), batch_size):
        items = [source.item(i) for i in range(lo, min(lo + batch_size, len(source)))]
        batch = {k: torch.from_numpy(np.stack([it[k] for it in items])).to(device) for k in items[0]}
        c, r = pair_logps(ref_model, batch)
        out.append(torch.stack([c, r], -1).float().cpu())
    return torch.cat(out)


class DPOObjective:
    """The per-batch DPO loss with its reference: a precomputed table, or a frozen model run per batch."""

    def __init__(self, beta: float, *, ref_table: torch.Tensor | None = None, ref_model=None):
        assert (ref_table is None) != (ref_model is None)
        self.beta, self.ref_table, self.ref_model = beta, ref_table, ref_model

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        pi_c, pi_r = pair_logps(model, batch)
        if self.ref_table is not None:
            ref = self.ref_table[batch["index"][:, 0].cpu()].to(pi_c.device)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad():
                ref_c, ref_r = pair_logps(self.ref_model, batch)
        losses, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta)
        metrics = {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margins": (rc - rr).sum(),
                   "rewards/accuracies": (rc > rr).float().sum(), "logps/chosen": pi_c.detach().sum(),
                   "logps/rejected": pi_r.detach().sum()}
        return losses.sum(), torch.tensor(len(losses)), metrics
