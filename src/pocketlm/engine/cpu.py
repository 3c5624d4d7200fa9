"""The fast CPU decode path: one C call per generated token for models whose linears run on the kernels.

`accelerate(model)` returns a `FastDecoder` when every decoder linear of `model` is a `QuantizedLinear` on the
compiled kernels (`pocketlm.quant.kernels.KINDS`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K, Q5_K, Q6_K on the
CPU), else the model unchanged. The decode
loop in `engine.generate` calls it for every generation, so `pocketlm run`, `chat` and `eval` use it without
asking. A `FastDecoder` speaks the model protocol the loop uses (`__call__(ids, cache, last_only=, rope_mode=)`,
`make_cache`, `rope_mode_for`, `config`):

- `make_cache(1, capacity)` gives a `FastKVCache`: keys and values preallocated (with `torch.empty`, so pages
  are only resident once written) in float16 (default, as llama.cpp) or int8 with one scale per (layer, head,
  position) (`kv_dtype="int8"`, half the memory: 0.4 GB instead of 0.8 GB per 2k tokens of phi-3-mini), or
  ggml's Q8_0 / Q4_0 blocks of 32 values with f16 scales (`"q8_0"`, `"q4_0"`: 0.53 and 0.28 of f16; see
  pocketlm.kvcache).
- A prompt (T > 1) runs through the PyTorch model (matrix products on the kernels, chunked by the loop); the
  cache's `update` stores what the model computes, so both paths share one cache.
- A single token at batch 1 runs `pl_decode_step` (quant/kernels.c): all layers in C, no Python per layer.
  Only the embedding row, the final RMSNorm and lm_head (also on the kernels) stay in Python.
- The LongRoPE policy is the model's: the rotary rows come from `model.rotary_emb`, and a cache whose keys were
  rotated with the other factor set raises `StaleCacheError` (the loop then re-prefills), as in model.py.

Threads: the kernels use `kernels.default_threads()` (the cores this process may use); PyTorch's own pool
(prompt path) is set to the same number once.
"""

from __future__ import annotations

import ctypes

import torch

from pocketlm.errors import GenerationError, StaleCacheError
from pocketlm.kvcache import BLOCK_TYPES, QuantizedKV, check_head_dim
from pocketlm.quant import kernels
from pocketlm.quant.linear import QuantizedLinear

KV_DTYPES = {"f16": torch.float16, "int8": torch.int8, "q8_0": torch.int8, "q4_0": torch.uint8}
_KV_TYPE_CODES = {"f16": 1, "int8": 2, "q8_0": 3, "q4_0": 4}  # pl_model.kv_type in kernels.c


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int), ("rows", ctypes.c_int), ("cols", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qkv", _Mat), ("o", _Mat),
                ("gate_up", _Mat), ("down", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter",
                                            "rotary_dim", "capacity", "kv_type")] + \
               [("eps", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("k", ctypes.c_void_p),
                ("v", ctypes.c_void_p), ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p)] + \
               [(n, ctypes.c_void_p) for n in ("xn", "qkv", "att", "gu", "hmid", "y", "scores", "qa", "da", "sa_f",
                                               "sa_i")]


class FastKVCache:
    """Keys and values of every layer for one sequence: (layers, n_kv, capacity, head_dim) f16 or int8, or
    q8_0/q4_0 blocks (a pocketlm.kvcache.QuantizedKV each: codes + f16 scales, unwritten pages not resident)."""

    def __init__(self, config, capacity: int, kv_dtype: str = "f16"):
        if kv_dtype not in KV_DTYPES:
            raise GenerationError(f"kv_dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
        shape = (config.num_hidden_layers, config.num_key_value_heads, capacity, config.head_dim)
        self.kv_dtype = kv_dtype
        self.capacity = capacity
        self.length = 0
        self.rope_mode: str | None = None
        if kv_dtype in BLOCK_TYPES:
            self.k = QuantizedKV.empty(shape, kv_dtype, zero=False)
            self.v = QuantizedKV.empty(shape, kv_dtype, zero=False)
            self.k_scale, self.v_scale = self.k.scales, self.v.scales
            return
        self.k = torch.empty(shape, dtype=KV_DTYPES[kv_dtype])
        self.v = torch.empty(shape, dtype=KV_DTYPES[kv_dtype])
        self.k_scale = torch.empty(shape[:3]) if kv_dtype == "int8" else None
        self.v_scale = torch.empty(shape[:3]) if kv_dtype == "int8" else None

    def reset(self) -> None:
        self.length = 0
        self.rope_mode = None

    def nbytes(self) -> int:
        if self.kv_dtype in BLOCK_TYPES:
            return self.k.nbytes() + self.v.nbytes()
        extra = 0 if self.k_scale is None else 2 * self.k_scale.numel() * 4
        return 2 * self.k.numel() * self.k.element_size() + extra

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (1, n_kv, T, hd) at [length, length+T); return all keys/values so far as float32."""
        if k.shape[0] != 1:
            raise GenerationError(f"FastKVCache holds one sequence; got a batch of {k.shape[0]}")
        start, end = self.length, self.length + k.shape[2]
        if self.kv_dtype in BLOCK_TYPES:
            self.k[layer, :, start:end] = k[0]
            self.v[layer, :, start:end] = v[0]
            return self.k[layer, :, :end].dequantize()[None], self.v[layer, :, :end].dequantize()[None]
        if self.kv_dtype == "f16":
            self.k[layer, :, start:end] = k[0]
            self.v[layer, :, start:end] = v[0]
            return self.k[layer, :, :end].float()[None], self.v[layer, :, :end].float()[None]
        for store, scale, x in ((self.k, self.k_scale, k[0]), (self.v, self.v_scale, v[0])):
            s = x.float().abs().amax(-1) / 127.0  # (n_kv, T), as kernels.c store_kv
            q = torch.where(s[..., None] > 0, torch.round(x.float() / s[..., None].clamp_min(1e-30)), 0.0)
            store[layer, :, start:end] = q.to(torch.int8)
            scale[layer, :, start:end] = s
        k_all = self.k[layer, :, :end].float() * self.k_scale[layer, :, :end, None]
        v_all = self.v[layer, :, :end].float() * self.v_scale[layer, :, :end, None]
        return k_all[None], v_all[None]


def eligible(model) -> bool:
    """True when every decoder linear runs on the compiled kernels (and the model is on the CPU)."""
    try:
        layers = model.model.layers
    except AttributeError:
        return False
    if getattr(model.config, "is_moe", False):  # the fused decoder is for dense layers (qkv_proj, gate_up_proj)
        return False
    if getattr(model.config, "model_type", "phi3") == "phi3small":  # block-sparse layers, GEGELU: model_small.py
        return False
    for layer in layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if not (isinstance(lin, QuantizedLinear) and lin.backend == "kernel"):
                return False
    return True


def accelerate(model, kv_dtype: str | None = None):
    """A `FastDecoder` for `model` when `eligible(model)`, else `model` itself. Cached on the model: kv_dtype None
    keeps the cached decoder's cache type (f16 for a new one)."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise GenerationError(f"kv cache type {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
    if isinstance(model, FastDecoder):
        if kv_dtype is None or kv_dtype == model.kv_dtype:
            return model
        model = model.model
    cached = getattr(model, "_pocketlm_fast", None)
    if cached is not None and kv_dtype in (None, cached.kv_dtype):
        return cached
    if not eligible(model):
        return model
    fast = FastDecoder(model, kv_dtype or "f16")
    object.__setattr__(model, "_pocketlm_fast", fast)  # plain attribute, not a registered submodule
    return fast


_threads_set = False


class FastDecoder:
    """The model protocol of `engine.generate` over a kernel-backed model, decoding single tokens in C."""

    def __init__(self, model, kv_dtype: str = "f16"):
        global _threads_set
        self.model = model
        self.config = c = model.config
        self.kv_dtype = kv_dtype
        check_head_dim(kv_dtype, c.head_dim)
        if c.num_attention_heads % c.num_key_value_heads or c.head_dim > 512:
            raise GenerationError(f"the C decode step needs n_heads divisible by n_kv and head_dim <= 512: {c}")
        self._lib = kernels._load()
        if not _threads_set:
            torch.set_num_threads(kernels.default_threads())
            _threads_set = True
        # float32 copies of the norms (the model's may be bf16), kept alive with the structs
        self._keep: list[torch.Tensor] = []
        layers = (_Layer * c.num_hidden_layers)()
        for i, layer in enumerate(model.model.layers):
            a = layer.input_layernorm.weight.detach().float().contiguous()
            f = layer.post_attention_layernorm.weight.detach().float().contiguous()
            self._keep += [a, f]
            layers[i].attn_norm, layers[i].ffn_norm = a.data_ptr(), f.data_ptr()
            for field, lin in (("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
                               ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj)):
                setattr(layers[i], field, _Mat(lin.packed.data_ptr(), kernels.KINDS[lin.type_name],
                                               lin.out_features, lin.in_features))
        self._layers = layers
        self._struct: _Model | None = None
        self._struct_cache: FastKVCache | None = None

    # ---- the protocol ------------------------------------------------------------------------------------------
    def rope_mode_for(self, seq_len: int) -> str:
        return self.model.rope_mode_for(seq_len)

    def parameters(self):
        return self.model.parameters()

    def make_cache(self, batch_size: int, capacity: int):
        if batch_size != 1:
            return self.model.make_cache(batch_size, capacity)
        if not 0 < capacity <= self.config.max_position_embeddings:
            raise GenerationError(f"KV cache capacity {capacity} is outside [1, max_position_embeddings="
                                  f"{self.config.max_position_embeddings}]")
        return FastKVCache(self.config, capacity, self.kv_dtype)

    def __call__(self, input_ids: torch.Tensor, cache=None, *, last_only: bool = False,
                 rope_mode: str | None = None) -> torch.Tensor:
        if not (isinstance(cache, FastKVCache) and tuple(input_ids.shape) == (1, 1)):
            return self.model(input_ids, cache, last_only=last_only, rope_mode=rope_mode)
        return self._decode(int(input_ids[0, 0]), cache, rope_mode)

    # ---- one token in C ---------------------------------------------------------------------------------------
    def _bind(self, cache: FastKVCache) -> _Model:
        """The C view of the model + this cache, with scratch buffers (rebuilt when the cache changes)."""
        if self._struct is not None and self._struct_cache is cache:
            return self._struct
        c = self.config
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def pad(n: int) -> int:
            return -(-n // kernels.TILE) * kernels.TILE

        widest = max(c.hidden_size, c.intermediate_size, H * hd)
        scratch = {
            "xn": torch.empty(c.hidden_size), "qkv": torch.empty(pad((H + 2 * KV) * hd)), "att": torch.empty(H * hd),
            "gu": torch.empty(pad(2 * c.intermediate_size)), "hmid": torch.empty(c.intermediate_size),
            "y": torch.empty(pad(max(c.hidden_size, H * hd))), "scores": torch.empty(H * cache.capacity),
            "qa": torch.empty(widest, dtype=torch.int8), "da": torch.empty(widest // 32),
            "sa_f": torch.empty(widest // 32), "sa_i": torch.empty(widest // 32, dtype=torch.int32)}
        m = _Model(n_layers=c.num_hidden_layers, hidden=c.hidden_size, n_heads=H, n_kv=KV, head_dim=hd,
                   inter=c.intermediate_size, rotary_dim=c.rotary_dim, capacity=cache.capacity,
                   kv_type=_KV_TYPE_CODES[cache.kv_dtype], eps=c.rms_norm_eps,
                   layers=ctypes.cast(self._layers, ctypes.POINTER(_Layer)), k=_codes(cache.k).data_ptr(),
                   v=_codes(cache.v).data_ptr(),
                   k_scale=cache.k_scale.data_ptr() if cache.k_scale is not None else None,
                   v_scale=cache.v_scale.data_ptr() if cache.v_scale is not None else None,
                   **{name: t.data_ptr() for name, t in scratch.items()})
        self._scratch = scratch
        self._struct, self._struct_cache = m, cache
        return m

    @torch.inference_mode()
    def _decode(self, token: int, cache: FastKVCache, rope_mode: str | None) -> torch.Tensor:
        c, model = self.config, self.model
        pos = cache.length
        L = pos + 1
        if L > cache.capacity:
            raise GenerationError(f"{L} tokens do not fit the KV cache of capacity {cache.capacity}")
        mode = model.rope_mode_for(L) if rope_mode is None else rope_mode
        if pos > 0 and cache.rope_mode != mode:
            raise StaleCacheError(f"the KV cache holds {pos} keys rotated with the {cache.rope_mode!r} LongRoPE "
                                  f"factors but a {L}-token sequence needs {mode!r}: reset the cache and prefill")
        if not 0 <= token < c.vocab_size:
            raise GenerationError(f"token id {token} is outside the vocabulary [0, {c.vocab_size})")
        m = self._bind(cache)
        x = model.model.embed_tokens(torch.tensor([token])).float().reshape(-1).contiguous()  # (hidden,)
        cos, sin = model.rotary_emb(torch.tensor([pos]), mode, torch.float32)  # (1, rotary_dim)
        cos, sin = cos.contiguous(), sin.contiguous()
        window = c.attention_window
        lo = max(0, L - window) if window is not None else 0
        rc = self._lib.pl_decode_step(ctypes.byref(m), ctypes.c_void_p(x.data_ptr()), pos, lo,
                                      ctypes.c_void_p(cos.data_ptr()), ctypes.c_void_p(sin.data_ptr()))
        if rc != 0:
            raise GenerationError(f"the C decode step refused position {pos} (capacity {cache.capacity})")
        cache.length, cache.rope_mode = L, mode
        dtype = model.model.norm.weight.dtype
        h = model.model.norm(x.to(dtype).reshape(1, 1, -1))
        return model.lm_head(h)  # (1, 1, vocab)


def _codes(store) -> torch.Tensor:
    return store.codes if isinstance(store, QuantizedKV) else store


def kv_cache_bytes(config, n_tokens: int, kv_dtype: str = "f16") -> int:
    """Bytes the cache needs for n_tokens (for memory planning and the CLI's report)."""
    from pocketlm.kvcache import kv_cache_bytes as plan
    return plan(config, n_tokens, kv_dtype)


__all__ = ["FastDecoder", "FastKVCache", "accelerate", "eligible", "kv_cache_bytes", "KV_DTYPES"]
