"""Supervised fine-tuning on chat data in the Phi-3 format, packed without cross-contamination.

- Rendering: `pocketlm.chat.render` (the official templates, token for token). The trained tokens of an
  assistant turn are exactly those after the generation prompt of the conversation so far (`render(messages[:i],
  add_generation_prompt=True)`) up to and including the closing `<|end|>` 32007, so the model learns to emit
  `<|end|>` and generation stops. Everything else (system and user turns, the `<|assistant|>` marker, the
  `<|endoftext|>` after the last turn) is context only: label -100.
- Packing: conversations are packed greedily, in file order, into rows of `seq_len` tokens; a conversation that
  does not fit the rest of a row starts a new one, one longer than `seq_len` is truncated. Each token carries its
  conversation number (`doc`) and its position inside that conversation (restarting at 0), and attention is
  masked to the same conversation (`model.attention_mask(q_doc=, k_doc=)` + `model.forward_batched`), so a packed
  row gives the same logits as its conversations run one by one. The last token of a conversation has no target.
  Padding at the end of a row is its own document with label -100.

References: TRL `SFTTrainer` (assistant_only_loss, padding_free packing with position_ids restarting per
sequence); nanochat `render_conversation` (mask of the assistant tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pocketlm.chat import parse_messages, render, turn_end_id
from pocketlm.data.shards import DataError
from pocketlm.errors import ChatFormatError
from pocketlm.train.chunked_loss import causal_lm_loss
from pocketlm.moe import with_aux_loss

IGNORE = -100


def encode_chat(messages: list[dict], tokenizer, *, format: str | None = None) -> tuple[list[int], list[bool]]:
    """The conversation's ids (no generation prompt) and, per id, whether it is trained (assistant tokens)."""
    msgs = parse_messages(messages)
    full = render(messages, tokenizer, add_generation_prompt=False, format=format)
    end_id = turn_end_id(tokenizer, format)
    trained = [False] * len(full)
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        if i == 0:
            raise ChatFormatError("an assistant turn needs a user or system turn before it (messages[0] is "
                                  "from the assistant)")
        prefix = render(messages[:i], tokenizer, add_generation_prompt=True, format=format)
        if full[:len(prefix)] != prefix:
            raise ChatFormatError(f"chat format {format!r}: the prompt of turn {i} is not a prefix of the rendered "
                                  "conversation; cannot place the assistant tokens")
        try:
            end = full.index(end_id, len(prefix))
        except ValueError:
            raise ChatFormatError(f"assistant turn {i} is not closed by {tokenizer.id_to_token(end_id)!r} in format "
                                  f"{format!r}") from None
        for t in range(len(prefix), end + 1):
            trained[t] = True
    return full, trained


def pack(conversations: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Greedy packing into rows of `seq_len`: {"input_ids", "labels", "positions", "doc"} each (seq_len,) int64."""
    rows, cur = [], []  # cur: list of (ids, trained) in the row being filled

    def flush():
        ids = np.full(seq_len, pad_id, np.int64)
        labels = np.full(seq_len, IGNORE, np.int64)
        positions = np.zeros(seq_len, np.int64)
        doc = np.zeros(seq_len, np.int64)
        t = 0
        for d, (c_ids, c_trained) in enumerate(cur):
            n = len(c_ids)
            ids[t:t + n] = c_ids
            positions[t:t + n] = np.arange(n)
            doc[t:t + n] = d
            for j in range(n - 1):  # the target of token j is token j+1 of the same conversation
                if c_trained[j + 1]:
                    labels[t + j] = c_ids[j + 1]
            t += n
        if t < seq_len:  # padding: one more document that attends only to itself
            positions[t:] = np.arange(seq_len - t)
            doc[t:] = len(cur)
        rows.append({"input_ids": ids, "labels": labels, "positions": positions, "doc": doc})

    used = 0
    for ids, trained in conversations:
        ids, trained = ids[:seq_len], trained[:seq_len]
        if used + len(ids) > seq_len:
            flush()
            cur, used = [], 0
        cur.append((ids, trained))
        used += len(ids)
    if cur:
        flush()
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such JSONL file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(out[-1], dict):
            raise DataError(f"{path}:{n}: expected an object, got {line[:80]!r}")
    if not out:
        raise DataError(f"{path}: empty")
    return out


class PackedChat:
    """A MixtureLoader source: packed SFT rows from a JSONL file of {"messages": [...]} lines."""

    def __init__(self, path: str | os.PathLike, tokenizer, seq_len: int, *, format: str | None = None):
        convs = []
        for n, rec in enumerate(read_jsonl(path), 1):
            if "messages" not in rec:
                raise DataError(f"{path}:{n}: no 'messages' key")
            try:
                convs.append(encode_chat(rec["messages"], tokenizer, format=format))
            except ChatFormatError as e:
                raise DataError(f"{path}:{n}: {e}") from None
        self.num_conversations = len(convs)
        self.truncated = sum(len(ids) > seq_len for ids, _ in convs)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.rows = pack(convs, seq_len, pad)

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, i: int) -> dict[str, np.ndarray]:
        return self.rows[i]


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sum of token losses, number of trained tokens, extra metric sums) for one packed batch."""
    ids, positions, doc = batch["input_ids"], batch["positions"], batch["doc"]
    mask = model.attention_mask(positions, positions, q_doc=doc, k_doc=doc)  # (B, 1, T, T)
    labels = batch["labels"]
    loss = causal_lm_loss(model, labels, batched=(ids, positions, mask))  # chunked head loss where it applies
    count = (labels != IGNORE).sum()
    loss, metrics = with_aux_loss(model, loss, count)  # MoE load balancing (pocketlm.moe); dense: unchanged
    return loss, count, metrics
