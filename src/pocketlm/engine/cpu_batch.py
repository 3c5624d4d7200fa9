"""Batched decode on the CPU kernels: B sequences advance one token each in ONE C call (`pl_decode_batch`).

The serving engine (serve/batching.py) keeps every decoding sequence in a row ("slot") of one slot cache and
advances all of them together each step. For a model whose decoder linears all run on the compiled kernels
(`engine.cpu.eligible`), `BatchDecoder.step` does that step in C: every layer for every row (RMSNorm, the
fused qkv / o / gate_up / down matrices as int8-activation GEMMs over the B rows, so each weight tile is read
once per step, RoPE with the row's own rotary row, the new key/value stored at the row's own position,
attention over the row's visible keys, SwiGLU), with no Python per layer, then the final RMSNorm and lm_head
(one (B, vocab) product on the kernels), as `engine.cpu.FastDecoder`'s `pl_decode_token` does for one
sequence (a final norm that is not an RMSNorm, or an lm_head off the kernels, runs in PyTorch). The embedding
rows come from `pl_embed_row` (as pl_decode_token) when that gives the module's own float32 values, else from
the module; the cos/sin rows from a per-mode table of `model.rotary_emb` (FastDecoder's 256-position blocks);
the per-row work between the matrix products (norms, RoPE + cache stores, SwiGLU, residuals) is split over
the kernel threads by rows. `argmax_rows` gives the greedy picks of a batch in C.

Per row: its slot, its position (its current length), the first key it sees (`attention_window`, the sliding
window rule of `model.attention_mask`) and its LongRoPE factor set (`model.rope_mode_for(position + 1)`, the
rule `generate` uses; the server pins a static policy, so in practice one set per server: `fix_longrope_policy`).

Cache types (the slot cache's store): float32 or float16 tensors, or `pocketlm.kvcache.QuantizedKV` of int8,
q8_0, q4_0, laid out (layers, slots, n_kv, capacity, head_dim). Anything else (e.g. a bfloat16 cache)
is not supported: `supports(cache)` is False and the caller keeps the PyTorch path.

Exactness: a row's logits do not depend on the other rows, their number or the thread count (the kernels keep
one accumulation order per token); they equal `FastDecoder`'s single-sequence step for the same cache type
(tests/test_serve_batched_c.py). Against the PyTorch `forward_batched` path they differ by the int8 activation
rounding both share and by summation order (the f32 cache: ~1e-5 relative).
"""

from __future__ import annotations

import ctypes

import torch

from pocketlm.engine import cpu
from pocketlm.errors import GenerationError
from pocketlm.kvcache import QuantizedKV
from pocketlm.quant import kernels

# pl_batch.kv_type in kernels.c
_KV_TYPE_CODES = {torch.float32: 0, torch.float16: 1, "int8": 2, "q8_0": 3, "q4_0": 4}


class _Batch(ctypes.Structure):
    """ctypes mirror of kernels.c `pl_batch`."""
    _fields_ = [(n, ctypes.c_int) for n in ("B", "kv_type", "slots", "capacity", "max_keys")] + \
               [(n, ctypes.c_void_p) for n in ("slot", "pos", "lo", "k", "v", "k_scale", "v_scale", "cos", "sin",
                                               "xn", "qkv", "att", "gu", "hmid", "y", "scores", "qa", "da", "sa_f",
                                               "sa_i", "norm")] + \
               [("lm_head", cpu._Mat), ("h", ctypes.c_void_p), ("logits", ctypes.c_void_p)]


def kv_type_code(store) -> int | None:
    """pl_batch.kv_type of a slot cache store (a tensor or a QuantizedKV), None when the C step cannot use it."""
    if isinstance(store, QuantizedKV):
        return _KV_TYPE_CODES.get(store.kv_type)
    return _KV_TYPE_CODES.get(store.dtype) if store.is_contiguous() and store.device.type == "cpu" else None


class BatchDecoder:
    """`step(ids, slots, positions, cache)`: one token for each of B rows of a slot cache, all layers in C."""

    def __init__(self, model):
        if not cpu.eligible(model):
            raise GenerationError("BatchDecoder needs a dense Phi-3 model whose linears all run on the CPU kernels")
        c = self.config = model.config
        if c.num_attention_heads % c.num_key_value_heads or c.head_dim > 512:
            raise GenerationError(f"the C decode step needs n_heads divisible by n_kv and head_dim <= 512: {c}")
        self.model = model
        self._lib = kernels._load()
        self._lib.pl_decode_batch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.pl_decode_batch.restype = ctypes.c_int
        self._keep: list[torch.Tensor] = []  # float32 norms (the model's may be bf16), alive with the structs
        layers = (cpu._Layer * c.num_hidden_layers)()
        for i, layer in enumerate(model.model.layers):
            a = layer.input_layernorm.weight.detach().float().contiguous()
            f = layer.post_attention_layernorm.weight.detach().float().contiguous()
            self._keep += [a, f]
            layers[i].attn_norm, layers[i].ffn_norm = a.data_ptr(), f.data_ptr()
            for name, lin in (("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
                              ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj)):
                setattr(layers[i], name, cpu.mat_of(lin, self._keep))  # parts arrays kept in self._keep
        self._layers = layers
        # the network part of pl_model (the cache and scratch fields stay NULL: pl_decode_batch does not read them)
        self._net = cpu._Model(n_layers=c.num_hidden_layers, hidden=c.hidden_size, n_heads=c.num_attention_heads,
                               n_kv=c.num_key_value_heads, head_dim=c.head_dim, inter=c.intermediate_size,
                               rotary_dim=c.rotary_dim, eps=c.rms_norm_eps,
                               layers=ctypes.cast(layers, ctypes.POINTER(cpu._Layer)))
        # the tail in C, as FastDecoder's pl_decode_token: the final RMSNorm, and lm_head when it is on the kernels
        from pocketlm.model import RMSNorm
        from pocketlm.quant.linear import QuantizedLinear
        norm, head = model.model.norm, model.lm_head
        self._norm = norm.weight.detach().float().contiguous() if type(norm) is RMSNorm else None
        self._lm_head = head if (self._norm is not None and isinstance(head, QuantizedLinear) and
                                 head.backend == "kernel" and head.bias is None and
                                 head.in_features == c.hidden_size) else None
        self._scratch: dict[str, torch.Tensor] = {}
        self._ptrs: dict[str, int] = {}  # the scratch tensors' addresses (the pl_batch fields)
        self._rows = 0  # rows and keys per (row, head) the scratch holds
        self._keys = 0
        # per-step inputs kept between steps (the engine calls step() once per decode step): the pl_batch struct,
        # the cos/sin rows of every position (blocks of cpu.ROPE_BLOCK positions, as FastDecoder's), the
        # embedding rows read in C (pl_embed_row, as pl_decode_token) when that gives the model's own values
        self._batch = _Batch()
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # mode -> (positions, rotary_dim) cos, sin
        self._lm = (cpu._Mat(self._lm_head.packed.data_ptr(), kernels.KINDS[self._lm_head.type_name],
                             self._lm_head.out_features, self._lm_head.in_features)
                    if self._lm_head is not None else cpu._Mat(None, 0, 0, 0))
        self._embed = _c_embedding(model.model.embed_tokens)
        self._static_modes = c.rope_scaling is None or c.longrope_policy != "dynamic"

    @classmethod
    def for_model(cls, model) -> "BatchDecoder | None":
        """A BatchDecoder when the model's linears run on the kernels (and the kernels load), else None."""
        if not cpu.eligible(model) or not kernels.available():
            return None
        return cls(model)

    def supports(self, cache) -> bool:
        """Whether `cache` (k/v stores of shape (layers, slots, n_kv, capacity, head_dim)) is a type the C step
        reads: f32, f16, int8, q8_0, q4_0."""
        return kv_type_code(cache.k) is not None and kv_type_code(cache.v) == kv_type_code(cache.k)

    def _ensure_scratch(self, B: int, keys: int) -> None:
        if B <= self._rows and keys <= self._keys:
            return
        B, keys = max(B, self._rows), max(-(-keys // 256) * 256, self._keys)
        c = self.config
        self._scratch = cpu.layer_scratch(c, B)
        self._scratch.update({
            "y": torch.empty(B, cpu.pad_tiles(c.hidden_size)), "scores": torch.empty(B * c.num_attention_heads, keys),
            "h": torch.empty(B, c.hidden_size),
            "x": torch.empty(B, c.hidden_size)})  # x: the embedding rows when read in C (the residual stream)
        if self._lm_head is not None:
            self._scratch["logits"] = torch.empty(B, cpu.pad_tiles(self._lm_head.out_features))
        self._ptrs = {n: t.data_ptr() for n, t in self._scratch.items()}
        self._rows, self._keys = B, keys

    def _rope_rows(self, mode: str, positions: torch.Tensor, top: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, rotary_dim) cos and sin rows of `positions` (long, (B,)) for LongRoPE factor set `mode`, gathered
        from a table of `model.rotary_emb` over blocks of cpu.ROPE_BLOCK positions (FastDecoder's values)."""
        table = self._rope.get(mode)
        if table is None or table[0].shape[0] <= top:
            n = (top // cpu.ROPE_BLOCK + 1) * cpu.ROPE_BLOCK
            have = 0 if table is None else table[0].shape[0]
            blocks = [] if table is None else [table]
            for start in range(have, n, cpu.ROPE_BLOCK):  # block by block, the shapes FastDecoder evaluates
                blocks.append(self.model.rotary_emb(torch.arange(start, start + cpu.ROPE_BLOCK), mode, torch.float32))
            table = self._rope[mode] = (torch.cat([b[0] for b in blocks]).contiguous(),
                                        torch.cat([b[1] for b in blocks]).contiguous())
        return table[0].index_select(0, positions), table[1].index_select(0, positions)

    @torch.inference_mode()
    def step(self, ids: list[int], slots: list[int], positions: list[int], cache,
             modes: list[str] | None = None) -> torch.Tensor:
        """Logits (B, 1, vocab) of token ids[r] fed at positions[r] of slot cache row slots[r], whose keys/values
        are stored there; the row attends over its keys [lo, positions[r]] (lo from the sliding window).
        The logits are this decoder's buffer when lm_head runs in C: valid until the next step (clone to keep).

        cache: `.k`, `.v` of shape (layers, slots, n_kv, capacity, head_dim) (see `supports`). modes: each row's
        LongRoPE factor set (default `model.rope_mode_for(position + 1)`)."""
        c, model = self.config, self.model
        B = len(ids)
        if not B == len(slots) == len(positions):
            raise GenerationError(f"{B} ids for {len(slots)} slots and {len(positions)} positions")
        code = kv_type_code(cache.k)
        if code is None or kv_type_code(cache.v) != code:
            raise GenerationError("the slot cache's store is not one the C decode step reads (f32, f16, int8, "
                                  "q8_0, q4_0)")
        _, n_slots, _, capacity, _ = cache.k.shape
        if any(not 0 <= t < c.vocab_size for t in ids):
            raise GenerationError(f"token ids {ids} reach outside the vocabulary [0, {c.vocab_size})")
        if any(not 0 <= p < capacity for p in positions) or any(not 0 <= s < n_slots for s in slots):
            raise GenerationError(f"positions {positions} / slots {slots} are outside the cache's {capacity} "
                                  f"positions / {n_slots} slots")
        window = c.attention_window
        lo = [max(0, p + 1 - window) for p in positions] if window is not None else [0] * B
        keys = max(positions) + 1 if window is None else max(p - a + 1 for p, a in zip(positions, lo))
        self._ensure_scratch(B, keys)
        pos_t = torch.tensor(positions)
        if modes is None and self._static_modes:  # one factor set for every position: the model's rule
            modes = model.rope_mode_for(1)
        elif modes is None:
            modes = [model.rope_mode_for(p + 1) for p in positions]
        if isinstance(modes, str) or len(set(modes)) == 1:
            cos, sin = self._rope_rows(modes if isinstance(modes, str) else modes[0], pos_t, max(positions), B)
        else:
            cos, sin = torch.empty(B, c.rotary_dim), torch.empty(B, c.rotary_dim)
            for mode in set(modes):  # (B, rotary_dim): each row's own factor set and position
                idx = torch.tensor([i for i, m in enumerate(modes) if m == mode])
                cos[idx], sin[idx] = self._rope_rows(mode, pos_t[idx], max(positions), len(idx))
        ints = ctypes.c_int * B
        slot_a, pos_a, lo_a = ints(*slots), ints(*positions), ints(*lo)
        k, v = cache.k, cache.v
        quantized = isinstance(k, QuantizedKV)
        if self._embed is not None:  # the rows in C, straight into the scratch (B, hidden)
            x = self._scratch["x"][:B]
            table, typ, tiles = self._embed
            addr, row = self._ptrs["x"], 4 * c.hidden_size
            for i, t in enumerate(ids):
                if self._lib.pl_embed_row(table, typ, tiles, c.hidden_size, t, addr + i * row) != 0:
                    raise GenerationError(f"pl_embed_row refused token {t}")
        else:
            x = model.model.embed_tokens(torch.tensor(ids)).float().contiguous()  # (B, hidden)
        lm = self._lm_head
        batch = self._batch
        batch.B, batch.kv_type, batch.slots, batch.capacity, batch.max_keys = B, code, n_slots, capacity, self._keys
        batch.slot, batch.pos, batch.lo = ctypes.addressof(slot_a), ctypes.addressof(pos_a), ctypes.addressof(lo_a)
        batch.k = (k.codes if quantized else k).data_ptr()
        batch.v = (v.codes if quantized else v).data_ptr()
        batch.k_scale = k.scales.data_ptr() if quantized else None
        batch.v_scale = v.scales.data_ptr() if quantized else None
        batch.cos, batch.sin = cos.data_ptr(), sin.data_ptr()
        for n, a in self._ptrs.items():
            if n != "x":
                setattr(batch, n, a)
        batch.norm = self._norm.data_ptr() if self._norm is not None else None
        batch.lm_head = self._lm
        rc = self._lib.pl_decode_batch(ctypes.byref(self._net), ctypes.byref(batch), x.data_ptr())
        del slot_a, pos_a, lo_a  # (alive through the call)
        if rc != 0:
            raise GenerationError(f"the batched C decode step refused rows at positions {positions} (slots {slots}, "
                                  f"capacity {capacity})")
        dtype = model.model.norm.weight.dtype  # the PyTorch path's logits dtype
        if self._norm is None:  # not an RMSNorm: the tail in PyTorch
            return model.lm_head(model.model.norm(x.to(dtype)[:, None]))  # (B, 1, vocab)
        if lm is None:  # lm_head not on the kernels: PyTorch's, on the h C normed
            return model.lm_head(self._scratch["h"][:B, None].to(dtype))
        logits = self._scratch["logits"][:B, None, :lm.out_features]  # (B, 1, vocab): this decoder's buffer
        return logits if dtype == torch.float32 else logits.to(dtype)


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """torch.argmax(logits, dim=-1).tolist() for float32 logits (B, V) on the CPU (rows may be strided, e.g. the
    decoder's padded buffer), in C (`pl_argmax_rows`: the first largest value, a NaN counting as the largest)."""
    lib = kernels._load()
    if lib is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2 or \
            logits.stride(1) != 1:
        return logits.argmax(dim=-1).tolist()
    B, V = logits.shape
    out = (ctypes.c_int32 * B)()
    lib.pl_argmax_rows(ctypes.c_void_p(logits.data_ptr()), B, V, ctypes.c_long(logits.stride(0)), out)
    return list(out)


def _c_embedding(embed) -> tuple[int, int, int] | None:
    """(table address, kernels.c type, tiles flag) when pl_embed_row gives exactly the rows the module returns as
    float32: an nn.Embedding of a float type, or a QuantizedEmbedding of a kernels type whose dtype is float32
    (one of another dtype rounds its rows to it); None otherwise (the rows then come from the module)."""
    from pocketlm.quant.linear import QuantizedEmbedding
    if isinstance(embed, QuantizedEmbedding) and embed.dtype != torch.float32:
        return None
    table = cpu.embedding_table(embed)
    if table is None:
        return None
    return table[0].data_ptr(), table[1], table[2]


__all__ = ["BatchDecoder", "argmax_rows", "kv_type_code"]
