"""Batched decode on the CPU kernels: B sequences advance one token each in ONE C call (`pl_decode_batch`).

The serving engine (serve/batching.py) keeps every decoding sequence in a row ("slot") of one slot cache and
advances all of them together each step. For a model whose decoder linears all run on the compiled kernels
(`engine.cpu.eligible`), `BatchDecoder.step` does that step in C: every layer for every row (RMSNorm, the
fused qkv / o / gate_up / down matrices as int8-activation GEMMs over the B rows, so each weight tile is read
once per step, RoPE with the row's own rotary row, the new key/value stored at the row's own position,
attention over the row's visible keys, SwiGLU), with no Python per layer, then the final RMSNorm and lm_head
(one (B, vocab) product on the kernels), as `engine.cpu.FastDecoder`'s `pl_decode_token` does for one
sequence (a final norm that is not an RMSNorm, or an lm_head off the kernels, runs in PyTorch). The embedding
rows (one lookup for the batch) stay in Python.

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
        self._rows = 0  # rows and keys per (row, head) the scratch holds
        self._keys = 0

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
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def pad(n: int) -> int:
            return -(-n // kernels.TILE) * kernels.TILE

        widest = max(c.hidden_size, c.intermediate_size, H * hd)
        self._scratch = {
            "xn": torch.empty(B, c.hidden_size), "qkv": torch.empty(B, pad((H + 2 * KV) * hd)),
            "att": torch.empty(B, H * hd), "gu": torch.empty(B, pad(2 * c.intermediate_size)),
            "hmid": torch.empty(B, c.intermediate_size), "y": torch.empty(B, pad(c.hidden_size)),
            "scores": torch.empty(B * H, keys), "qa": torch.empty(B, widest, dtype=torch.int8),
            "da": torch.empty(B, widest // 32), "sa_f": torch.empty(B, widest // 32),
            "sa_i": torch.empty(B, widest // 32, dtype=torch.int32), "h": torch.empty(B, c.hidden_size)}
        if self._lm_head is not None:
            self._scratch["logits"] = torch.empty(B, pad(self._lm_head.out_features))
        self._rows, self._keys = B, keys

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
        if modes is None:
            modes = [model.rope_mode_for(p + 1) for p in positions]
        window = c.attention_window
        lo = [max(0, p + 1 - window) if window is not None else 0 for p in positions]
        keys = max(p - a + 1 for p, a in zip(positions, lo))
        self._ensure_scratch(B, keys)
        pos_t = torch.tensor(positions)
        cos = torch.empty(B, c.rotary_dim)
        sin = torch.empty(B, c.rotary_dim)
        for mode in set(modes):  # (B, rotary_dim): each row's own factor set and position
            idx = torch.tensor([i for i, m in enumerate(modes) if m == mode])
            cos[idx], sin[idx] = model.rotary_emb(pos_t[idx], mode, torch.float32)
        slot_t = torch.tensor(slots, dtype=torch.int32)
        pos_i = pos_t.to(torch.int32)
        lo_t = torch.tensor(lo, dtype=torch.int32)
        k, v = cache.k, cache.v
        quantized = isinstance(k, QuantizedKV)
        x = model.model.embed_tokens(torch.tensor(ids)).float().contiguous()  # (B, hidden)
        s = self._scratch
        lm = self._lm_head
        batch = _Batch(B=B, kv_type=code, slots=n_slots, capacity=capacity, max_keys=self._keys,
                       slot=slot_t.data_ptr(), pos=pos_i.data_ptr(), lo=lo_t.data_ptr(),
                       k=(k.codes if quantized else k).data_ptr(), v=(v.codes if quantized else v).data_ptr(),
                       k_scale=k.scales.data_ptr() if quantized else None,
                       v_scale=v.scales.data_ptr() if quantized else None,
                       cos=cos.data_ptr(), sin=sin.data_ptr(), **{n: t.data_ptr() for n, t in s.items()},
                       norm=self._norm.data_ptr() if self._norm is not None else None,
                       lm_head=cpu._Mat(lm.packed.data_ptr(), kernels.KINDS[lm.type_name], lm.out_features,
                                        lm.in_features) if lm is not None else cpu._Mat(None, 0, 0, 0))
        rc = self._lib.pl_decode_batch(ctypes.byref(self._net), ctypes.byref(batch), x.data_ptr())
        if rc != 0:
            raise GenerationError(f"the batched C decode step refused rows at positions {positions} (slots {slots}, "
                                  f"capacity {capacity})")
        dtype = model.model.norm.weight.dtype  # the PyTorch path's logits dtype
        if self._norm is None:  # not an RMSNorm: the tail in PyTorch
            return model.lm_head(model.model.norm(x.to(dtype)[:, None]))  # (B, 1, vocab)
        if lm is None:  # lm_head not on the kernels: PyTorch's, on the h C normed
            return model.lm_head(s["h"][:B, None].to(dtype))
        logits = s["logits"][:B, None, :lm.out_features]  # (B, 1, vocab): this decoder's buffer
        return logits if dtype == torch.float32 else logits.to(dtype)


__all__ = ["BatchDecoder", "kv_type_code"]
