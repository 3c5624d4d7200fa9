"""The Phi-3 decoder (phi-3-mini, phi-3-medium, phi-3.5-mini), all of it in this one file; phi-3.5-MoE
(`config.is_moe`) reuses it with LayerNorms, separate biased q/k/v/o projections, a biased lm_head and the
expert block of pocketlm.moe in place of the MLP (transformers' `PhimoeForCausalLM`).

Notable features, each defined in ../shared/phi3-spec.md:
- pre-norm blocks: RMSNorm computed in fp32, weight applied after the cast back (§3.1);
- rotary embeddings, NeoX "rotate-half" style, with LongRoPE scaling for the 128k models: per-frequency
  factors, short set iff the sequence fits in `original_max_position_embeddings`, and the magnitude factor
  m = sqrt(1 + ln(s)/ln(orig)) applied to cos and sin in both modes (§3.2-3.3);
- fused `qkv_proj` (rows [Q; K; V], contiguous slices) and `gate_up_proj` (rows [gate; up]), names as in the
  official checkpoints (§2.1), so the state dict is the checkpoint;
- grouped-query attention (phi-3-medium: 40 query heads share 10 KV heads);
- the 4k models' sliding window: `sliding_window + 1` visible keys by default, flash-attn semantics (§3.8);
- a preallocated KV cache for incremental decoding that remembers which LongRoPE factor set its keys were
  rotated with. Policy at the 4096 boundary: the model refuses to mix factor sets (StaleCacheError); the
  decode loop then rebuilds the cache from the whole sequence with the long factors, so every step's logits
  equal a full forward pass over the sequence so far (the rule transformers adopted in PR #33129, §4).

References: transformers `models/phi3/modeling_phi3.py` (v4.41-v5.x) and `modeling_rope_utils.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import Phi3Config
from pocketlm.errors import GenerationError, StaleCacheError
from pocketlm.moe import SparseMoeBlock
from pocketlm.kvcache import dense, kv_store


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)  # weight applied after the cast, as the reference does


def make_norm(config: Phi3Config) -> nn.Module:
    """The pre-norm of a block: RMSNorm (Phi-3), or LayerNorm with weight and bias (phi-3.5-MoE, as the reference
    builds it: nn.LayerNorm with eps = rms_norm_eps)."""
    if config.layer_norm:
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; LongRoPE keeps one inverse-frequency set per mode."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        d = config.rotary_dim
        exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # (d/2,)
        rs = config.rope_scaling
        short = torch.tensor(rs.short_factor, dtype=torch.float32) if rs else torch.ones(d // 2)
        long = torch.tensor(rs.long_factor, dtype=torch.float32) if rs else torch.ones(d // 2)
        self.register_buffer("inv_freq_short", 1.0 / (short * config.rope_theta ** exponents), persistent=False)
        self.register_buffer("inv_freq_long", 1.0 / (long * config.rope_theta ** exponents), persistent=False)

    def magnitude(self, mode: str) -> float:
        rs = self.config.rope_scaling
        if rs is not None:
            override = rs.long_mscale if mode == "long" else rs.short_mscale
            if override is not None:
                return override
        return self.config.rope_attention_factor

    def forward(self, positions: torch.Tensor, mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq_long if mode == "long" else self.inv_freq_short
        freqs = positions[:, None].float() * inv_freq[None, :]  # (T, d/2), fp32 whatever the model dtype
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
        m = self.magnitude(mode)
        return (emb.cos() * m).to(dtype), (emb.sin() * m).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, rotary_dim) or (B, 1, T, rotary_dim). Dims past rotary_dim pass through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    out = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


class KVCache:
    """Preallocated keys and values for every layer: (layers, B, n_kv, capacity, hd), in `dtype`, or in the
    cache type `kv_type` (f32, f16, int8, q8_0, q4_0: pocketlm.kvcache) when given."""

    def __init__(self, config: Phi3Config, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, kv_type: str | None = None):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, capacity, config.head_dim)
        self.k = kv_store(shape, kv_type, dtype, device)  # a tensor, or a QuantizedKV of that logical shape
        self.v = kv_store(shape, kv_type, dtype, device)
        self.kv_type = kv_type
        self.capacity = capacity
        self.length = 0  # positions filled, the same for every layer between forward calls
        self.rope_mode: str | None = None  # LongRoPE factor set the cached keys were rotated with

    def reset(self) -> None:
        self.length = 0
        self.rope_mode = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, n_kv, T, hd) at positions [length, length+T); return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return dense(self.k[layer, :, :, :end], k.dtype), dense(self.v[layer, :, :, :end], v.dtype)


class Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        if config.is_moe:  # phi-3.5-MoE checkpoints: separate, biased q/k/v projections
            self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
            self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(h, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)  # contiguous [Q; K; V] rows
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, L, hd), L = cached + T
        causal = mask is None and k.shape[2] == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.head_dim ** -0.5, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, q_size))  # (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # rows [gate; up]
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        if config.is_moe:  # phi-3.5-MoE: routed experts in place of the dense MLP (pocketlm.moe)
            self.block_sparse_moe = SparseMoeBlock(config.hidden_size, config.intermediate_size,
                                                   config.num_local_experts, config.router_jitter_noise,
                                                   sampled_training=config.moe_training == "sparsemixer",
                                                   input_jitter=config.input_jitter_noise)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)


def sequence_span(model: nn.Module, T: int, cache: KVCache | None, rope_mode: str | None) -> tuple[int, int, str]:
    """(start, L, mode) for T new tokens after the cached ones: checked against max_position_embeddings, the
    LongRoPE factor sets the model has, the cache's capacity and the factor set its keys were rotated with.
    Shared by `Phi3ForCausalLM.forward` and phi-3-small's (model_small.py)."""
    start = cache.length if cache is not None else 0
    L = start + T
    if L > model.config.max_position_embeddings:
        raise GenerationError(f"sequence of {L} tokens exceeds max_position_embeddings "
                              f"{model.config.max_position_embeddings}")
    mode = model.rope_mode_for(L) if rope_mode is None else rope_mode
    if mode not in (("short", "long") if model.config.rope_scaling is not None else ("default",)):
        raise GenerationError(f"rope_mode {mode!r} is not valid for this model")
    if cache is not None:
        if L > cache.capacity:
            raise GenerationError(f"{L} tokens do not fit the KV cache of capacity {cache.capacity}")
        if start > 0 and cache.rope_mode != mode:
            raise StaleCacheError(f"the KV cache holds {start} keys rotated with the {cache.rope_mode!r} "
                                  f"LongRoPE factors but a {L}-token sequence needs {mode!r}: reset the cache "
                                  "and prefill the whole sequence")
    return start, L, mode


class Phi3ForCausalLM(nn.Module):
    """`model(input_ids (B, T), cache=None) -> logits (B, T, vocab)`; state-dict names are the checkpoint's."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(config)
        self.kv_cache_type: str | None = None  # what make_cache stores: None = the weights' dtype (pocketlm.kvcache)

    def rope_mode_for(self, seq_len: int) -> str:
        """The LongRoPE factor set a sequence of `seq_len` tokens needs: "default", "short" or "long"."""
        c = self.config
        if c.rope_scaling is None:
            return "default"
        if c.longrope_policy != "dynamic":
            return c.longrope_policy
        return "long" if seq_len > c.original_max_position_embeddings else "short"  # `>`: 4096 is still short

    def make_cache(self, batch_size: int, capacity: int) -> KVCache:
        if not 0 < capacity <= self.config.max_position_embeddings:
            raise GenerationError(f"KV cache capacity {capacity} is outside [1, max_position_embeddings="
                                  f"{self.config.max_position_embeddings}]")
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, capacity, p.dtype, p.device, self.kv_cache_type)

    def _mask(self, start: int, T: int, L: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (T, L) mask, True = attend; None when plain causal attention (or no mask) is exact."""
        window = self.config.attention_window
        binds = window is not None and L > window
        if not binds and (T == 1 or start == 0):
            return None  # decode step sees every key; a prefill from 0 is plain causal (is_causal in SDPA)
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        k_pos = torch.arange(L, device=device)[None, :]
        mask = k_pos <= q_pos
        if binds:
            mask &= q_pos - k_pos < window
        return mask

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                rope_mode: str | None = None, inputs_embeds: torch.Tensor | None = None,
                hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_only`; with `hidden`, the final-norm states
        (B, T, hidden_size) that the head would multiply (training's chunked loss, pocketlm.train.chunked_loss).

        With a cache, `input_ids` continue the cached sequence. `rope_mode` forces the LongRoPE factor set; a
        chunked prefill passes `rope_mode_for(final length)` so that every chunk of a prompt longer than
        original_max_position_embeddings uses the long factors (default: `rope_mode_for(cached + T)`).
        `inputs_embeds` (B, T, hidden), when given, is used instead of looking `input_ids` up (phi-3.5-vision puts
        image features at the image positions, vision.py).
        """
        B, T = input_ids.shape
        start, L, mode = sequence_span(self, T, cache, rope_mode)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden)
        positions = torch.arange(start, L, device=input_ids.device)
        cos, sin = self.rotary_emb(positions, mode, x.dtype)  # (T, rotary_dim)
        mask = self._mask(start, T, L, input_ids.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length, cache.rope_mode = L, mode
        if last_only:
            x = x[:, -1:]
        if hidden:
            return self.model.norm(x)  # (B, T or 1, hidden)
        return self.lm_head(self.model.norm(x))  # (B, T or 1, vocab)

    # ---- rows at their own positions: continuous batching (serving) and packed sequences (training) ----------

    def attention_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, k_valid: torch.Tensor | None = None,
                       q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, T, L) boolean mask, True = attend: causal by position, the sliding window, and optionally only
        valid keys (k_valid (B, L)) of the same document (q_doc (B, T) / k_doc (B, L), for packed sequences)."""
        q, k = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, L)
        mask = k <= q
        window = self.config.attention_window
        if window is not None:
            mask &= q - k < window
        if k_valid is not None:
            mask &= k_valid[:, None, :]
        if q_doc is not None:
            mask &= q_doc[:, :, None] == k_doc[:, None, :]
        return mask[:, None]

    def forward_batched(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor,
                        cache=None, *, rope_mode: str | None = None, last_only: bool = False,
                        hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for rows that sit at their own positions (final-norm states with `hidden`).

        input_ids, positions: (B, T). attn_mask: (B, 1, T, L) boolean (see `attention_mask`); the caller owns
        the layout. cache: None (L = T), or any object whose `update(layer, k, v)` stores the new (B, n_kv, T, hd)
        keys/values and returns the (B, n_kv, L, hd) keys/values to attend over. One LongRoPE factor set serves
        the whole batch (`rope_mode`, default: the set the largest position needs), so a server should pick a
        static `longrope_policy`.
        """
        B, T = input_ids.shape
        mode = self.rope_mode_for(int(positions.max()) + 1) if rope_mode is None else rope_mode
        if mode not in (("short", "long") if self.config.rope_scaling is not None else ("default",)):
            raise GenerationError(f"rope_mode {mode!r} is not valid for this model")
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rotary_emb(positions.reshape(-1), mode, x.dtype)  # (B*T, rotary_dim)
        cos, sin = cos.view(B, 1, T, -1), sin.view(B, 1, T, -1)  # broadcast over heads
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if last_only:
            x = x[:, -1:]
        if hidden:
            return self.model.norm(x)  # (B, T or 1, hidden)
        return self.lm_head(self.model.norm(x))  # (B, T or 1, vocab)
