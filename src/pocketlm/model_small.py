"""The Phi-3-small decoder (model_type "phi3small"): dense and block-sparse attention layers alternating, GEGELU,
muP, LayerNorm, grouped-query attention; names and layouts as the released checkpoint.

The maths, as the released `modeling_phi3_small.py` (HF repo microsoft/Phi-3-small-8k-instruct) and vLLM's
`phi3_small.py` define it:
- x = embed_tokens(ids) * mup_embedding_multiplier (10); pre-norm blocks with nn.LayerNorm (weight and bias,
  eps = layer_norm_epsilon); `model.final_layernorm`; logits = lm_head(x) (tied to the embedding, no bias), in
  fp32, divided by mup_width_multiplier (8), with the dummy vocabulary ids set to float32's minimum.
- `self_attn.query_key_value` (bias) has head-major grouped rows: for each of the n_kv groups, its q_per_kv query
  heads, then its key head, then its value head (`_split_heads`); query head h uses key/value head
  h // q_per_kv. `self_attn.dense` (bias) is the output projection. Softmax scale: mup_attn_multiplier /
  head_dim with mup_use_scaling (1/128), else 1/sqrt(head_dim). RoPE: NeoX rotate-half over the whole head,
  base rope_embedding_base (1e6), positions / rope_position_scale (vLLM's "linear" factor; 1.0 released), and
  the LongRoPE factor sets with their per-mode magnitudes when config.json has `rope_scaling` (128k).
- Layer i is dense (plain causal) iff (i + 1) % dense_attention_every_n_layers == 0, else block-sparse: with
  block size b, query block Q = q_pos // b sees key block K = k_pos // b of head h iff
      K <= Q and (Q - K < num_local_blocks  or  (K + h * step + 1) % vert_stride == 0),
  step = 0 with blocksparse_homo_head_pattern, else max(1, vert_stride // n_heads) (`get_head_sliding_step`),
  and token-level causality k_pos <= q_pos on top (the block layout of the reference's Triton kernel and of
  vLLM's `get_sparse_attn_mask`, `blocksparse_layout`).
- `mlp.up_proj` (bias) -> GEGELU -> `mlp.down_proj` (bias). GEGELU takes the even columns as the gate and the
  odd ones as the linear part: clamp the gate to <= limit and the linear part to [-limit, limit] (infinities
  pass), out = quick_gelu(gate) * (linear + 1), quick_gelu(x) = x * sigmoid(1.702 x).

Block-sparse attention runs on the CPU two ways: `blocksparse_attention_masked` (the token mask above, one dense
SDPA: the reference for tests, and what rows at their own positions use), and `blocksparse_attention_blocked`,
which loops over query blocks and gathers only the visible key blocks (what `forward` uses), so its cost grows
with the number of visible blocks (local blocks + one in vert_stride before them), not with T^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config_small import Phi3SmallConfig
from pocketlm.errors import GenerationError
from pocketlm.model import KVCache, Phi3ForCausalLM, RotaryEmbedding, apply_rope, sequence_span


# ---- the block-sparse layout --------------------------------------------------------------------------------

def head_offsets(config: Phi3SmallConfig) -> torch.Tensor:
    """(n_heads,) int64: h * step, the shift of each head's vertical stripes (all 0 with the homo-head pattern)."""
    n_heads, vert = config.num_attention_heads, config.blocksparse_vert_stride
    step = 0 if config.blocksparse_homo_head_pattern else max(1, int(vert / n_heads))
    return torch.arange(n_heads, dtype=torch.int64) * step


def block_layout(config: Phi3SmallConfig, n_blocks: int) -> torch.Tensor:
    """(n_heads, n_blocks, n_blocks) bool: query block Q sees key block K (before token-level causality)."""
    q = torch.arange(n_blocks)[:, None]
    k = torch.arange(n_blocks)[None, :]
    vertical = (k[None] + head_offsets(config)[:, None, None] + 1) % config.blocksparse_vert_stride == 0
    return (q >= k) & ((q - k < config.blocksparse_num_local_blocks) | vertical)  # (H, NB, NB)


def blocksparse_token_mask(config: Phi3SmallConfig, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(..., n_heads, T, L) bool, True = attend, for query positions q_pos (..., T) and key positions (..., L)."""
    b, vert = config.blocksparse_block_size, config.blocksparse_vert_stride
    qb = torch.div(q_pos, b, rounding_mode="floor")[..., None, :, None]  # (..., 1, T, 1)
    kb = torch.div(k_pos, b, rounding_mode="floor")[..., None, None, :]  # (..., 1, 1, L)
    offsets = head_offsets(config).to(q_pos.device)[:, None, None]  # (H, 1, 1)
    vertical = (kb + offsets + 1) % vert == 0  # (..., H, 1, L)
    causal = k_pos[..., None, None, :] <= q_pos[..., None, :, None]  # (..., 1, T, L)
    return causal & (kb <= qb) & ((qb - kb < config.blocksparse_num_local_blocks) | vertical)


def blocksparse_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Phi3SmallConfig,
                                 q_pos: torch.Tensor, k_pos: torch.Tensor, extra: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """Block-sparse attention as one masked SDPA. q: (B, H, T, hd); k, v: (B, n_kv, L, hd); q_pos (B or 1, T),
    k_pos (B or 1, L); extra: an optional (B, 1, T, L) mask that is and-ed in. Returns (B, H, T, hd)."""
    mask = blocksparse_token_mask(config, q_pos, k_pos)  # (B or 1, H, T, L)
    if extra is not None:
        mask = mask & extra
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=config.attention_scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def blocksparse_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Phi3SmallConfig,
                                  start: int) -> torch.Tensor:
    """Block-sparse attention that reads only the visible key blocks. q: (B, H, T, hd) at positions
    start..start+T-1; k, v: (B, n_kv, L, hd) at positions 0..L-1, L = start + T. Returns (B, H, T, hd).

    For each query block: the local key blocks (shared by every head, causal inside the diagonal block) and
    each head's vertical blocks before them (gathered per head, padded to the longest list and masked)."""
    B, H, T, hd = q.shape
    n_kv, L = k.shape[1], k.shape[2]
    assert L == start + T, (L, start, T)
    b, vert, local = config.blocksparse_block_size, config.blocksparse_vert_stride, config.blocksparse_num_local_blocks
    group = H // n_kv
    k, v = k.contiguous(), v.contiguous()  # one copy, so that the reshapes in the loop are views, not copies
    kv_head = torch.arange(H, device=q.device) // group  # query head -> its key/value head
    # the first vertical block of head h is r_h: (r_h + offset_h + 1) % vert == 0
    first = (-(head_offsets(config).to(q.device) + 1)) % vert  # (H,)
    scale = config.attention_scale
    out = torch.empty_like(q)
    for qb in range(start // b, (L - 1) // b + 1):
        q_lo, q_hi = max(qb * b, start), min((qb + 1) * b, L)  # query positions of this block
        lb = max(0, qb - local + 1)  # first local block
        k_lo = lb * b
        qs = q[:, :, q_lo - start:q_hi - start]  # (B, H, tq, hd)
        k_loc = k[:, :, k_lo:q_hi].repeat_interleave(group, dim=1)  # (B, H, nl, hd)
        v_loc = v[:, :, k_lo:q_hi].repeat_interleave(group, dim=1)
        keys, values = [k_loc], [v_loc]
        q_idx = torch.arange(q_lo, q_hi, device=q.device)[:, None]
        k_idx = torch.arange(k_lo, q_hi, device=q.device)[None, :]
        masks = [(k_idx <= q_idx)[None, None].expand(1, H, q_hi - q_lo, q_hi - k_lo)]  # causal in the local part
        n_vert = (lb - first + vert - 1).clamp(min=0) // vert  # (H,): vertical blocks of each head before lb
        c = int(n_vert.max()) if lb > 0 else 0
        if c:
            blocks = first[:, None] + vert * torch.arange(c, device=q.device)[None, :]  # (H, c)
            valid = blocks < lb  # (H, c): heads with fewer stripes pad with a masked block
            pos = (blocks.clamp(max=max(lb - 1, 0))[:, :, None] * b
                   + torch.arange(b, device=q.device)).reshape(H, c * b)  # (H, c*b) key positions
            gather = kv_head[:, None] * L + pos  # rows of k viewed as (n_kv * L, hd)
            keys.insert(0, k.reshape(B, n_kv * L, hd)[:, gather])  # (B, H, c*b, hd)
            values.insert(0, v.reshape(B, n_kv * L, hd)[:, gather])
            masks.insert(0, valid.repeat_interleave(b, dim=1)[None, :, None, :].expand(1, H, q_hi - q_lo, c * b))
        out[:, :, q_lo - start:q_hi - start] = F.scaled_dot_product_attention(
            qs, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=torch.cat(masks, dim=-1), scale=scale)
    return out


# ---- the modules ----------------------------------------------------------------------------------------------

def gegelu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    """GEGELU over interleaved columns: even = gate, odd = linear. (..., 2i) -> (..., i)."""
    gate, linear = x[..., ::2], x[..., 1::2]
    if limit is not None:
        gate = torch.where(torch.isinf(gate), gate, gate.clamp(max=limit))
        linear = torch.where(torch.isinf(linear), linear, linear.clamp(min=-limit, max=limit))
    return gate * torch.sigmoid(1.702 * gate) * (linear + 1)


class SmallRotaryEmbedding(RotaryEmbedding):
    """Phi-3's rotary tables (LongRoPE factor sets and magnitudes included) with positions / rope_position_scale."""

    def __init__(self, config: Phi3SmallConfig):
        super().__init__(config)
        if config.rope_position_scale != 1.0:
            self.inv_freq_short = self.inv_freq_short / config.rope_position_scale
            self.inv_freq_long = self.inv_freq_long / config.rope_position_scale


@dataclass(frozen=True)
class SmallAttentionMask:
    """`attention_mask`'s result for Phi-3-small: the mask of the dense layers (B, 1, T, L) and of the block-sparse
    layers (B, H, T, L), True = attend."""

    dense: torch.Tensor
    sparse: torch.Tensor


class Phi3SmallAttention(nn.Module):
    def __init__(self, config: Phi3SmallConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.blocksparse = not config.is_dense_layer(layer_idx)
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, (self.n_heads + 2 * self.n_kv) * self.head_dim)
        self.dense = nn.Linear(self.n_heads * self.head_dim, h)

    def forward(self, x, cos, sin, mask, cache, positions: tuple[int, torch.Tensor | None]) -> torch.Tensor:
        """positions: (start, None) for a contiguous sequence at start..start+T-1 (then `mask` is unused), or
        (0, q_pos (B, T)) with a SmallAttentionMask for rows at their own positions."""
        B, T, _ = x.shape
        group = self.n_heads // self.n_kv
        qkv = self.query_key_value(x).view(B, T, self.n_kv, group + 2, self.head_dim)  # head-major groups
        q = qkv[:, :, :, :group].reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = qkv[:, :, :, group].transpose(1, 2)  # (B, n_kv, T, hd)
        v = qkv[:, :, :, group + 1].transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, L, hd)
        L = k.shape[2]
        scale, gqa = self.config.attention_scale, self.n_kv != self.n_heads
        start, q_pos = positions
        if isinstance(mask, SmallAttentionMask):  # rows at their own positions
            m = mask.sparse if self.blocksparse else mask.dense
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=gqa)
        elif self.blocksparse:
            y = blocksparse_attention_blocked(q, k, v, self.config, start)
        else:
            causal = T > 1 and L == T
            m = None
            if T > 1 and L > T:  # a chunk continuing a cache: causal by position
                m = torch.arange(L, device=x.device)[None, :] <= torch.arange(start, L, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, scale=scale, enable_gqa=gqa)
        return self.dense(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, hidden)


class Phi3SmallMLP(nn.Module):
    def __init__(self, config: Phi3SmallConfig):
        super().__init__()
        self.limit = config.gegelu_limit
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)  # interleaved [gate, linear]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gegelu(self.up_proj(x), self.limit))


class Phi3SmallDecoderLayer(nn.Module):
    def __init__(self, config: Phi3SmallConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Phi3SmallAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Phi3SmallMLP(config)

    def forward(self, x, cos, sin, mask, cache, positions):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3SmallModel(nn.Module):
    def __init__(self, config: Phi3SmallConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3SmallDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)

    @property
    def norm(self) -> nn.LayerNorm:
        """The final norm under the name the Phi-3 code paths use."""
        return self.final_layernorm


class Phi3SmallForCausalLM(nn.Module):
    """`model(input_ids (B, T), cache=None) -> logits (B, T, vocab)` (float32, muP-scaled, dummy ids masked);
    state-dict names are the checkpoint's. Same calling interface as `Phi3ForCausalLM`."""

    def __init__(self, config: Phi3SmallConfig):
        super().__init__()
        if not isinstance(config, Phi3SmallConfig):
            raise TypeError(f"Phi3SmallForCausalLM needs a Phi3SmallConfig, got {type(config).__name__}")
        self.config = config
        self.model = Phi3SmallModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = SmallRotaryEmbedding(config)
        self.dummy_token_ids = config.dummy_token_ids()  # a tuple, not a buffer: nothing to rebuild after meta
        self.kv_cache_type: str | None = None

    rope_mode_for = Phi3ForCausalLM.rope_mode_for  # the Phi-3 LongRoPE rule applies unchanged

    def make_cache(self, batch_size: int, capacity: int) -> KVCache:
        if not 0 < capacity <= self.config.max_position_embeddings:
            raise GenerationError(f"KV cache capacity {capacity} is outside [1, max_position_embeddings="
                                  f"{self.config.max_position_embeddings}]")
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, capacity, p.dtype, p.device, self.kv_cache_type)

    def _check_mode(self, mode: str) -> None:
        if mode not in (("short", "long") if self.config.rope_scaling is not None else ("default",)):
            raise GenerationError(f"rope_mode {mode!r} is not valid for this model")

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        m = self.config.mup_embedding_multiplier
        return x * m if m is not None and m > 0.0 else x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.final_layernorm(x)).float()  # (B, T, vocab), fp32 as the reference
        if self.config.mup_width_multiplier:
            logits = logits / self.config.mup_width_multiplier
        if self.dummy_token_ids:
            index = torch.tensor(self.dummy_token_ids, device=logits.device)
            logits = logits.index_fill(-1, index, torch.finfo(torch.float32).min)
        return logits

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                rope_mode: str | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_only`; with a cache, `input_ids` continue it."""
        B, T = input_ids.shape
        start, L, mode = sequence_span(self, T, cache, rope_mode)
        x = self._embed(input_ids)
        cos, sin = self.rotary_emb(torch.arange(start, L, device=input_ids.device), mode, x.dtype)  # (T, hd)
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, cache, (start, None))
        if cache is not None:
            cache.length, cache.rope_mode = L, mode
        if last_only:
            x = x[:, -1:]
        return self._logits(x)

    # ---- rows at their own positions: continuous batching (serving) and packed sequences (training) ----------

    def attention_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, k_valid: torch.Tensor | None = None,
                       q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> SmallAttentionMask:
        """Both layer kinds' masks: causal by position (and the block-sparse layout for the sparse layers), only
        valid keys (k_valid (B, L)), of the same document (q_doc (B, T) / k_doc (B, L))."""
        q, k = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, L)
        mask = k <= q
        if k_valid is not None:
            mask &= k_valid[:, None, :]
        if q_doc is not None:
            mask &= q_doc[:, :, None] == k_doc[:, None, :]
        dense = mask[:, None]  # (B, 1, T, L)
        return SmallAttentionMask(dense, dense & blocksparse_token_mask(self.config, q_pos, k_pos))

    def forward_batched(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_mask: SmallAttentionMask,
                        cache=None, *, rope_mode: str | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for rows at their own positions (see `Phi3ForCausalLM.forward_batched`);
        attn_mask comes from `attention_mask`."""
        if not isinstance(attn_mask, SmallAttentionMask):
            raise GenerationError("Phi-3-small's forward_batched takes the mask of its own attention_mask() "
                                  f"(dense and block-sparse layers differ), got {type(attn_mask).__name__}")
        B, T = input_ids.shape
        mode = self.rope_mode_for(int(positions.max()) + 1) if rope_mode is None else rope_mode
        self._check_mode(mode)
        x = self._embed(input_ids)
        cos, sin = self.rotary_emb(positions.reshape(-1), mode, x.dtype)  # (B*T, hd)
        cos, sin = cos.view(B, 1, T, -1), sin.view(B, 1, T, -1)  # broadcast over heads
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn_mask, cache, (0, positions))
        if last_only:
            x = x[:, -1:]
        return self._logits(x)


def checkpoint_shapes(config: Phi3SmallConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi-3-small checkpoint with its shape (Linear weights (out, in)); no lm_head when tied."""
    h, i, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + f"{norm}.weight"], shapes[p + f"{norm}.bias"] = (h,), (h,)
        shapes[p + "self_attn.query_key_value.weight"], shapes[p + "self_attn.query_key_value.bias"] = (qkv, h), (qkv,)
        shapes[p + "self_attn.dense.weight"] = (h, config.num_attention_heads * hd)
        shapes[p + "self_attn.dense.bias"] = (h,)
        shapes[p + "mlp.up_proj.weight"], shapes[p + "mlp.up_proj.bias"] = (2 * i, h), (2 * i,)
        shapes[p + "mlp.down_proj.weight"], shapes[p + "mlp.down_proj.bias"] = (h, i), (h,)
    shapes["model.final_layernorm.weight"], shapes["model.final_layernorm.bias"] = (h,), (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes
