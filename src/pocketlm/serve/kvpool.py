"""Prefix caching: keys/values of prompt prefixes kept in fixed-size blocks, shared by later prompts.

A prompt's first `block_size * k` tokens map to a chain of k blocks. A block is identified by its parent block
(the chain before it), its LongRoPE factor set and its own token ids, compared exactly (no hash-only match, so a
collision can never hand a request someone else's keys). vLLM's automatic prefix caching and llama.cpp's
`cache_prompt`, reduced to one process:

- `match(tokens, mode, limit)` finds the longest cached chain that covers at most `limit` tokens and copies its
  keys/values into a request's batch-1 `KVCache` (so the decode path stays unchanged: rows live in the slot
  cache as before); the request then prefills only the rest.
- `insert(tokens, mode, kv)` stores the full blocks of a finished prefill that are not cached yet.
- Reference counts: a block is pinned while another block extends it (its children) or while a request is
  copying it (users). Eviction takes the least recently used unpinned block (always a leaf of its chain), so a
  chain is never cut in the middle: every cached block is reachable from its root.
- LongRoPE: the factor set (`mode`) is part of a block's identity; keys rotated with the short factors are never
  reused for a sequence that needs the long ones (the model raises StaleCacheError for such a mix).
- The keys/values of a position depend only on the tokens up to it (causal attention; a sliding window limits
  which keys a *query* sees, not how a key is computed), so a cached block is valid for any prompt that starts
  with its chain, whatever the prompt's length.

Exactness: a prompt that hits resumes its prefill at a block boundary, with the chunks that follow aligned to
the same `chunk_size` grid `pocketlm.engine.generate.prefill` uses. The matrix shapes of the first resumed chunk
differ from a prefill from position 0, so logits can differ in the last bits (as vLLM notes for its prefix
caching); greedy outputs matched `generate` alone in every test (tests/test_serve_prefix.py).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch

from pocketlm.errors import ConfigError
from pocketlm.kvcache import kv_cache_bytes

DEFAULT_BLOCK_SIZE = 32


@dataclass(eq=False)
class Block:
    """The keys/values of `block_size` consecutive positions: (layers, n_kv, block_size, head_dim) each."""

    id: int
    key: tuple  # (parent id or -1, mode, token ids)
    parent: "Block | None"
    k: torch.Tensor
    v: torch.Tensor
    children: int = 0
    users: int = 0


class PrefixCache:
    """Blocks of prompt keys/values, at most `max_blocks` of them, LRU-evicted (see the module docstring)."""

    def __init__(self, config, *, max_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, dtype=torch.float32,
                 kv_type: str | None = None):
        if block_size < 1 or max_blocks < 0:
            raise ConfigError(f"prefix cache needs block_size >= 1 and max_blocks >= 0, got block_size "
                              f"{block_size}, max_blocks {max_blocks}")
        self.block_size, self.max_blocks = block_size, max_blocks
        # the blocks keep the type of the caches they were copied from (the model's KV dtype, or a --kv-cache
        # type: quantized blocks are QuantizedKV slices, copied code for code)
        if kv_type is not None:
            self.block_bytes = kv_cache_bytes(config, block_size, kv_type)
        else:
            self.block_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * block_size
                                * config.head_dim * torch.empty((), dtype=dtype).element_size())
        self._blocks: collections.OrderedDict[tuple, Block] = collections.OrderedDict()  # LRU first
        self._ids = itertools.count()
        self.hit_tokens = 0  # prompt tokens whose keys/values came from the cache
        self.miss_tokens = 0  # prompt tokens looked up and computed
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, parent: Block | None, mode: str, tokens) -> tuple:
        return (-1 if parent is None else parent.id, mode, tuple(tokens))

    def _chain(self, tokens: list[int], mode: str, limit: int) -> list[Block]:
        bs = self.block_size
        chain: list[Block] = []
        parent = None
        for i in range(min(limit, len(tokens)) // bs):
            block = self._blocks.get(self._key(parent, mode, tokens[i * bs:(i + 1) * bs]))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def cached_len(self, tokens: list[int], mode: str, limit: int) -> int:
        """The tokens `match` would cover now; no copy, no statistics, no LRU update."""
        return len(self._chain(tokens, mode, limit)) * self.block_size

    def match(self, tokens: list[int], mode: str, limit: int, kv) -> int:
        """Copy the longest cached chain of `tokens` (at most `limit` tokens) into the empty batch-1 cache `kv`;
        set its length and rope_mode; return the tokens covered (a multiple of block_size, maybe 0).

        Counts the hit and miss tokens of this lookup over `len(tokens)`."""
        assert kv.length == 0, "match() fills an empty cache"
        bs = self.block_size
        chain = self._chain(tokens, mode, limit)
        for b in chain:
            b.users += 1
        try:
            for i, b in enumerate(chain):
                kv.k[:, 0, :, i * bs:(i + 1) * bs] = b.k
                kv.v[:, 0, :, i * bs:(i + 1) * bs] = b.v
                self._blocks.move_to_end(b.key)
        finally:
            for b in chain:
                b.users -= 1
        n = len(chain) * bs
        if n:
            kv.length, kv.rope_mode = n, mode
        self.hit_tokens += n
        self.miss_tokens += len(tokens) - n
        return n

    def insert(self, tokens: list[int], mode: str, kv) -> int:
        """Store the full blocks of `tokens` (whose keys/values fill kv's first len(tokens) positions) that are
        not cached yet, evicting LRU leaves to make room; return the number of blocks added."""
        if self.max_blocks == 0:
            return 0
        bs = self.block_size
        parent = None
        added = 0
        for i in range(len(tokens) // bs):
            key = self._key(parent, mode, tokens[i * bs:(i + 1) * bs])
            block = self._blocks.get(key)
            if block is None:
                if parent is not None:
                    parent.users += 1  # pinned while we make room: evicting it would orphan the new block
                try:
                    room = len(self._blocks) < self.max_blocks or self._evict_one()
                finally:
                    if parent is not None:
                        parent.users -= 1
                if not room:
                    break
                block = Block(id=next(self._ids), key=key, parent=parent,
                              k=kv.k[:, 0, :, i * bs:(i + 1) * bs].clone(),
                              v=kv.v[:, 0, :, i * bs:(i + 1) * bs].clone())
                self._blocks[key] = block
                if parent is not None:
                    parent.children += 1
                added += 1
            else:
                self._blocks.move_to_end(key)
            parent = block
        return added

    def _evict_one(self) -> bool:
        """Drop the least recently used block that nothing references; False when every block is pinned."""
        for key, block in self._blocks.items():
            if block.children == 0 and block.users == 0:
                del self._blocks[key]
                if block.parent is not None:
                    block.parent.children -= 1
                self.evictions += 1
                return True
        return False

    def clear(self) -> None:
        self._blocks.clear()

    def stats(self) -> dict:
        looked = self.hit_tokens + self.miss_tokens
        return {"prefix_hit_tokens": self.hit_tokens, "prefix_miss_tokens": self.miss_tokens,
                "prefix_hit_rate": self.hit_tokens / looked if looked else 0.0, "prefix_blocks": len(self._blocks),
                "prefix_max_blocks": self.max_blocks, "prefix_block_size": self.block_size,
                "prefix_evictions": self.evictions, "prefix_bytes": len(self._blocks) * self.block_bytes}
