"""The fast CPU decode path: one C call per generated token for models whose linears run on the kernels.

`accelerate(model)` returns a `FastDecoder` when every decoder linear of `model` is a `QuantizedLinear` on the
compiled kernels (`pocketlm.quant.kernels.KINDS`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K, Q5_K, Q6_K on the
CPU; a fused qkv_proj / gate_up_proj whose parts a GGUF file stores in different types, a
`ConcatQuantizedLinear`, counts when all its parts are: C runs it as one pl_mat of kind KIND_PARTS, `mat_of`),
else the model unchanged. The decode
loop in `engine.generate` calls it for every generation, so `pocketlm run`, `chat` and `eval` use it without
asking. A `FastDecoder` speaks the model protocol the loop uses (`__call__(ids, cache, last_only=, rope_mode=)`,
`make_cache`, `rope_mode_for`, `config`):

- `make_cache(1, capacity)` gives a `FastKVCache`: keys and values preallocated (with `torch.empty`, so pages
  are only resident once written) in float16 (default, as llama.cpp) or int8 with one scale per (layer, head,
  position) (`kv_dtype="int8"`, half the memory: 0.4 GB instead of 0.8 GB per 2k tokens of phi-3-mini), or
  ggml's Q8_0 / Q4_0 blocks of 32 values with f16 scales (`"q8_0"`, `"q4_0"`: 0.53 and 0.28 of f16; see
  pocketlm.kvcache).
- A prompt chunk (T > 1, chunked by the loop) is one C call too, `pl_prefill` (`prefill_chunk`): every layer for
  the T tokens (RMSNorm, qkv, RoPE with each position's cos/sin row, the keys/values stored in the cache's type,
  flash attention over the cache with the causal mask and sliding window, o_proj, SiLU MLP, residuals), then the
  model's final norm and lm_head in PyTorch on the rows asked for. Every row is computed alone (its result does
  not depend on the chunking or the thread count). It also fills a batch-1 `model.KVCache` of f32/f16/int8/q8_0/
  q4_0 (`cache_view`: the serving engine's prefill caches). `c_prefill = False` (or norms that are not RMSNorms)
  selects the PyTorch model for prompts, whose cache `update` stores what it computes, so both share one cache.
- A single token at batch 1 is one C call, `pl_decode_token` (quant/kernels.c), which runs everything:
  the embedding row (dequantized in C from the table's own bytes: the tied lm_head's tile layout or the
  untied table's GGUF rows of any kernels type, or float32/float16/bfloat16 rows; the same float products as
  `QuantizedEmbedding`), all layers (`pl_decode_step`), the final RMSNorm, lm_head on the kernels into a
  preallocated logits buffer, and for greedy decoding the argmax. What stays in Python per token: the
  position/cache checks, one ctypes call, and, in `engine.generate`'s loop, sampling at temperature > 0
  (torch's generator, so a seed gives the same ids as before), the repetition penalty and grammar masks, which
  read the logits buffer (`decode_logits`); greedy decoding without those gets the id from C (`decode_argmax`).
  Exceptions fall back per part: an embedding type C does not read -> the model's embedding fills C's input
  row (`python_embed_steps` counts them); an lm_head that is not on the kernels (float, or with a bias) -> C
  stops after the norm and the model's lm_head runs (`python_head_steps`); a final norm that is not an
  RMSNorm -> the older split below. `full_step = False` selects the older split (`pl_decode_step` for the
  layers, the embedding, final norm and lm_head in PyTorch), kept for comparison.
- The LongRoPE policy is the model's: the rotary rows come from `model.rotary_emb` (evaluated for blocks of
  ROPE_BLOCK positions per factor set and kept), and a cache whose keys were rotated with the other factor set
  raises `StaleCacheError` (the loop then re-prefills), as in model.py.

Threads: the kernels use `kernels.default_threads()` (the cores this process may use); PyTorch's own pool
(prompt path) is set to the same number once.
"""

from __future__ import annotations

import ctypes
import itertools

import torch

from pocketlm.errors import GenerationError, StaleCacheError
from pocketlm.kvcache import BLOCK_TYPES, QuantizedKV, check_head_dim
from pocketlm.quant import kernels
from pocketlm.quant.linear import ConcatQuantizedLinear, QuantizedLinear

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


class _Chunk(ctypes.Structure):
    """kernels.c's pl_chunk: a prompt chunk's positions, rotary rows and scratch for pl_prefill."""
    _fields_ = [("T", ctypes.c_int), ("start", ctypes.c_int), ("window", ctypes.c_int), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p)] + \
               [(n, ctypes.c_void_p) for n in ("xn", "qkv", "att", "gu", "hmid", "y", "qa", "da", "sa_f", "sa_i")]


class _Seg(ctypes.Structure):
    """kernels.c's pl_seg: one sequence's chunk in pl_prefill_segs (its cache view, positions, rotary rows)."""
    _fields_ = [("m", ctypes.c_void_p), ("T", ctypes.c_int), ("start", ctypes.c_int), ("window", ctypes.c_int),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]


class _Head(ctypes.Structure):
    """kernels.c's pl_head: the embedding table, the final norm, lm_head and the buffers of pl_decode_token."""
    _fields_ = [("embd", ctypes.c_void_p), ("embd_type", ctypes.c_int), ("embd_tiles", ctypes.c_int),
                ("vocab", ctypes.c_int), ("norm", ctypes.c_void_p), ("lm_head", _Mat), ("x", ctypes.c_void_p),
                ("h", ctypes.c_void_p), ("logits", ctypes.c_void_p), ("n_valid", ctypes.c_int)]


_KIND_PARTS = 64  # kernels.c KIND_PARTS: a pl_mat whose w is an array of pl_mat parts (rows stacked), ended by rows 0


def on_kernels(lin) -> bool:
    """Whether the C decode step can run linear `lin`: a QuantizedLinear on the kernels, or a
    ConcatQuantizedLinear (row blocks of different types) whose parts all are, every part but the last being
    whole 16-row tiles (kernels.c pl_mat_check)."""
    if isinstance(lin, QuantizedLinear):
        return lin.backend == "kernel"
    return isinstance(lin, ConcatQuantizedLinear) and lin.backend == "kernel" and \
        all(p.out_features % kernels.TILE == 0 for p in lin.parts[:-1])


def mat_of(lin, keep: list) -> _Mat:
    """kernels.c's pl_mat of a linear `on_kernels`: its tiles, or for a ConcatQuantizedLinear a KIND_PARTS mat
    over a ctypes array of its parts' pl_mats (appended to `keep`, which must live as long as the struct).
    Checked by pl_mat_check; a mat C would refuse raises GenerationError."""
    if isinstance(lin, ConcatQuantizedLinear):
        parts = (_Mat * (len(lin.parts) + 1))(*[mat_of(p, keep) for p in lin.parts])  # the last stays rows 0
        keep.append(parts)
        mat = _Mat(ctypes.addressof(parts), _KIND_PARTS, lin.out_features, lin.in_features)
    else:
        mat = _Mat(lin.packed.data_ptr(), kernels.KINDS[lin.type_name], lin.out_features, lin.in_features)
    lib = kernels._load()
    lib.pl_mat_check.argtypes = [ctypes.c_void_p]
    lib.pl_mat_check.restype = ctypes.c_int
    if lib.pl_mat_check(ctypes.addressof(mat)) != 0:
        raise GenerationError(f"the C decode step cannot run a {getattr(lin, 'type_name', '?')} linear of "
                              f"({lin.out_features}, {lin.in_features}) (parts of whole 16-row tiles only)")
    return mat


_FLOAT_TABLE_TYPES = {torch.float32: 100, torch.float16: 101, torch.bfloat16: 102}  # kernels.c EMB_F32/F16/BF16
_TOKEN_X_GIVEN, _TOKEN_ARGMAX = 1, 2  # pl_decode_token's flags
ROPE_BLOCK = 256
"""Positions per cached cos/sin table block (`model.rotary_emb` over 256 positions at a time, per LongRoPE mode)."""


def pad_tiles(n: int) -> int:
    """n rounded up to whole 16-row kernel tiles (the width a kernels matrix product writes)."""
    return -(-n // kernels.TILE) * kernels.TILE


def layer_scratch(config, *rows: int) -> dict[str, torch.Tensor]:
    """The buffers every C step (one token, a batch of rows, a prompt chunk) uses for a decoder layer's work on
    `rows` rows (none: one token): the normed input, the fused qkv and gate_up outputs (whole tiles), the attention
    and SwiGLU outputs, and the activation codes of the widest input. Callers add their own y, scores, ..."""
    c = config
    H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    widest = max(c.hidden_size, c.intermediate_size, H * hd)
    return {"xn": torch.empty(*rows, c.hidden_size), "qkv": torch.empty(*rows, pad_tiles((H + 2 * KV) * hd)),
            "att": torch.empty(*rows, H * hd), "gu": torch.empty(*rows, pad_tiles(2 * c.intermediate_size)),
            "hmid": torch.empty(*rows, c.intermediate_size), "qa": torch.empty(*rows, widest, dtype=torch.int8),
            "da": torch.empty(*rows, widest // 32), "sa_f": torch.empty(*rows, widest // 32),
            "sa_i": torch.empty(*rows, widest // 32, dtype=torch.int32)}


def embedding_table(embed) -> tuple[torch.Tensor, int, int] | None:
    """(table, kernels.c type code, 1 if in the kernels' tile layout else 0) for an embedding module that
    pl_decode_token reads in C: a QuantizedEmbedding of a kernels type (its own GGUF rows, or the tile layout of
    the tied lm_head it reads from) or an nn.Embedding in float32/float16/bfloat16. None otherwise."""
    from pocketlm.quant.linear import QuantizedEmbedding
    if isinstance(embed, QuantizedEmbedding):
        if embed.type_name not in kernels.KINDS:
            return None
        source = embed.__dict__.get("source")
        if source is not None:
            return source[0].packed, kernels.KINDS[embed.type_name], 1
        return embed.qweight.contiguous(), kernels.KINDS[embed.type_name], 0
    if isinstance(embed, torch.nn.Embedding) and embed.weight.dtype in _FLOAT_TABLE_TYPES and \
            embed.weight.device.type == "cpu":
        return embed.weight.detach().contiguous(), _FLOAT_TABLE_TYPES[embed.weight.dtype], 0
    return None


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
            if not on_kernels(lin):
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
                setattr(layers[i], field, mat_of(lin, self._keep))
        self._layers = layers
        self._struct: _Model | None = None
        self._struct_cache: FastKVCache | None = None
        self._init_head()
        self._init_prefill()

    def _init_prefill(self) -> None:
        """Whether prompt chunks run in C (pl_prefill): every layer's norms are RMSNorms (the C arithmetic);
        `c_prefill = False` keeps the PyTorch path (kept for comparison)."""
        from pocketlm.model import RMSNorm
        self.c_prefill = all(type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm
                             for layer in self.model.model.layers)
        self._chunk_rows = 0  # rows the prefill scratch holds
        self._chunk_scratch: dict[str, torch.Tensor] = {}

    def _init_head(self) -> None:
        """The per-token parts pl_decode_token runs in C: the embedding table (None: Python looks the row up),
        the final RMSNorm weight (None: the model's norm is not an RMSNorm, the whole tail stays in Python) and
        lm_head on the kernels (None: Python runs lm_head on the normed hidden state C returns)."""
        from pocketlm.model import RMSNorm
        from pocketlm.quant.linear import QuantizedLinear as QL
        model = self.model
        # True: pl_decode_token (embedding to logits in C); False: the older split (pl_decode_step in C, the
        # embedding, final norm and lm_head in PyTorch), kept for comparison
        self.full_step = True
        self.python_embed_steps = 0  # tokens whose embedding row / lm_head ran in Python (pl_decode_token path)
        self.python_head_steps = 0
        norm = model.model.norm
        self._norm = norm.weight.detach().float().contiguous() if type(norm) is RMSNorm else None
        self._table = embedding_table(model.model.embed_tokens)
        head = model.lm_head
        self._lm_head = head if isinstance(head, QL) and head.backend == "kernel" and head.bias is None and \
            head.in_features == self.config.hidden_size else None
        self.vocab = head.out_features if isinstance(head, QL) else head.weight.shape[0]
        self._rope: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        hidden = self.config.hidden_size
        self._xbuf, self._hbuf = torch.empty(hidden), torch.empty(hidden)  # the residual stream, the normed h
        padded = -(-self.vocab // kernels.TILE) * kernels.TILE
        self._logits_full = torch.empty(padded)  # the kernels write 16 * tiles rows
        self._logits = self._logits_full[:self.vocab]
        table = self._table
        lm = self._lm_head
        self._head = _Head(embd=table[0].data_ptr() if table else None, embd_type=table[1] if table else -1,
                           embd_tiles=table[2] if table else 0,
                           vocab=min(self.config.vocab_size, model.model.embed_tokens.num_embeddings),
                           norm=self._norm.data_ptr() if self._norm is not None else None,
                           lm_head=_Mat(lm.packed.data_ptr(), kernels.KINDS[lm.type_name], lm.out_features,
                                        lm.in_features) if lm is not None else _Mat(None, 0, 0, 0),
                           x=self._xbuf.data_ptr(), h=self._hbuf.data_ptr(), logits=self._logits_full.data_ptr(),
                           n_valid=self.vocab)
        self._addr_head = ctypes.addressof(self._head)

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
        if input_ids.dim() == 2 and input_ids.shape[0] == 1 and input_ids.shape[1] > 1 and self.c_prefill and \
                cache_view(cache) is not None:
            return self.prefill_chunk(input_ids, cache, last_only=last_only, rope_mode=rope_mode)
        if not (isinstance(cache, FastKVCache) and tuple(input_ids.shape) == (1, 1)):
            return self.model(input_ids, cache, last_only=last_only, rope_mode=rope_mode)
        if not self.full_step or self._norm is None:
            return self._decode(int(input_ids[0, 0]), cache, rope_mode)
        logits = self.decode_logits(int(input_ids[0, 0]), cache, rope_mode)
        dtype = self.model.model.norm.weight.dtype  # the PyTorch path's logits dtype
        if dtype != torch.float32:
            return logits.to(dtype).reshape(1, 1, -1)
        # a copy through numpy: one memcpy on this thread (torch's clone of 32K+ values wakes its thread pool,
        # which then waits on the kernels' spinning workers on a busy machine)
        return torch.from_numpy(logits.numpy().copy()).reshape(1, 1, -1)

    # ---- one whole token in C (pl_decode_token), for the decode loop -------------------------------------------
    def decode_logits(self, token: int, cache: FastKVCache, rope_mode: str | None = None) -> torch.Tensor:
        """Append `token` to `cache`; return its logits (vocab,) float32. The tensor is this decoder's buffer:
        valid until the next decode call (copy it to keep it)."""
        if not self.full_step or self._norm is None:
            return self._decode(token, cache, rope_mode)[0, -1]
        self._run_token(token, cache, rope_mode, 0)
        if self._lm_head is None:
            self.python_head_steps += 1
            with torch.inference_mode():
                h = self._hbuf.to(self.model.model.norm.weight.dtype).reshape(1, 1, -1)
                return self.model.lm_head(h)[0, -1].float()
        return self._logits

    def decode_argmax(self, token: int, cache: FastKVCache, n_valid: int | None = None,
                      rope_mode: str | None = None) -> int:
        """Append `token` to `cache`; return the greedy next id: the first index of the largest logit among ids
        [0, n_valid) (default: all), as torch.argmax over the logits with ids >= n_valid set to -inf."""
        n_valid = self.vocab if n_valid is None else max(1, min(int(n_valid), self.vocab))
        if not self.full_step or self._norm is None or self._lm_head is None:
            logits = self.decode_logits(token, cache, rope_mode)
            return int(torch.argmax(logits[:n_valid]))
        self._bind(cache)
        self._head.n_valid = n_valid
        return self._run_token(token, cache, rope_mode, _TOKEN_ARGMAX)

    def _rope_rows(self, mode: str, pos: int) -> tuple[int, int]:
        """Addresses of the cos and sin rows (rotary_dim f32) of `pos`, from blocks of model.rotary_emb output."""
        key = (mode, pos // ROPE_BLOCK)
        block = self._rope.get(key)
        if block is None:
            start = key[1] * ROPE_BLOCK
            with torch.inference_mode():
                cos, sin = self.model.rotary_emb(torch.arange(start, start + ROPE_BLOCK), mode, torch.float32)
            cos, sin = cos.contiguous(), sin.contiguous()  # (ROPE_BLOCK, rotary_dim)
            assert cos.shape == (ROPE_BLOCK, self.config.rotary_dim), cos.shape
            block = self._rope[key] = (cos, sin, cos.data_ptr(), sin.data_ptr())
        off = (pos % ROPE_BLOCK) * self.config.rotary_dim * 4
        return block[2] + off, block[3] + off

    def _run_token(self, token: int, cache: FastKVCache, rope_mode: str | None, flags: int) -> int:
        """pl_decode_token for `token` at position cache.length; returns its result (argmax or 0)."""
        if not isinstance(cache, FastKVCache):
            raise GenerationError(f"the C decode step needs a FastKVCache (make_cache(1, n)), not "
                                  f"{type(cache).__name__}")
        pos = cache.length
        L = pos + 1
        if L > cache.capacity:
            raise GenerationError(f"{L} tokens do not fit the KV cache of capacity {cache.capacity}")
        mode = self.model.rope_mode_for(L) if rope_mode is None else rope_mode
        if pos > 0 and cache.rope_mode != mode:
            raise StaleCacheError(f"the KV cache holds {pos} keys rotated with the {cache.rope_mode!r} LongRoPE "
                                  f"factors but a {L}-token sequence needs {mode!r}: reset the cache and prefill")
        if not 0 <= token < self.config.vocab_size:
            raise GenerationError(f"token id {token} is outside the vocabulary [0, {self.config.vocab_size})")
        self._bind(cache)
        window = self.config.attention_window
        lo = max(0, L - window) if window is not None else 0
        cos, sin = self._rope_rows(mode, pos)
        if self._table is None:  # an embedding type C does not read: the row comes from the model
            self.python_embed_steps += 1
            with torch.inference_mode():
                self._xbuf.copy_(self.model.model.embed_tokens(torch.tensor([token])).reshape(-1))
            flags |= _TOKEN_X_GIVEN
        rc = self._lib.pl_decode_token(self._addr_m, self._addr_head, token, pos, lo, cos, sin, flags)
        if rc < 0:
            raise GenerationError(f"the C decode step refused token {token} at position {pos} "
                                  f"(capacity {cache.capacity})")
        cache.length, cache.rope_mode = L, mode
        return rc

    # ---- a prompt chunk in C (pl_prefill) ---------------------------------------------------------------------
    def _prefill_scratch(self, T: int) -> dict[str, torch.Tensor]:
        """pl_prefill's scratch for chunks of up to T rows (kept and reused: a chunk's buffers, tens of MB for
        phi-3-mini at 512 rows, are not paged in again for every chunk)."""
        if T <= self._chunk_rows:
            return self._chunk_scratch
        c = self.config
        self._chunk_scratch = layer_scratch(c, T)
        self._chunk_scratch["y"] = torch.empty(T, pad_tiles(max(c.hidden_size, c.num_attention_heads * c.head_dim)))
        self._chunk_rows = T
        return self._chunk_scratch

    @torch.inference_mode()
    def prefill_chunk(self, input_ids: torch.Tensor, cache, *, last_only: bool = False,
                      rope_mode: str | None = None) -> torch.Tensor:
        """Run T prompt tokens (1, T) after the cached ones through every layer in one C call (pl_prefill: the
        keys/values stored in `cache`, a FastKVCache or a batch-1 model.KVCache of a type C stores, see
        `cache_view`; another cache goes through the model), then the model's final norm and lm_head on the last
        row (`last_only`) or all rows; returns logits (1, T or 1, vocab) as the PyTorch path does. The checks
        (context, capacity, LongRoPE factor set of the cached keys) are model.py's `sequence_span`."""
        if cache_view(cache) is None or not self.c_prefill:
            return self.model(input_ids, cache, last_only=last_only, rope_mode=rope_mode)
        return self.prefill_chunks([(input_ids, cache, rope_mode)], last_only=last_only)[0]

    @torch.inference_mode()
    def prefill_chunks(self, items: list[tuple[torch.Tensor, object, str | None]], *,
                       last_only: bool = True) -> list[torch.Tensor]:
        """Prompt chunks of several sequences in one C call (pl_prefill_segs): item i is (input_ids (1, T_i), its
        batch-1 cache, its LongRoPE mode or None), every cache one that `cache_view` accepts. The rows of all
        chunks share each matrix product; RoPE, the cache stores and attention are per sequence, and each row's
        arithmetic is the one-chunk call's, so a sequence's keys, values and logits do not depend on the others.
        Returns each item's logits, (1, 1 or T_i, vocab), as `prefill_chunk` would one at a time. The checks of
        every item come first: a refused item raises before any cache is written."""
        from pocketlm.model import sequence_span
        model, c = self.model, self.config
        if not self.c_prefill:
            raise GenerationError("this model's prompt chunks do not run in C (a norm other than RMSNorm)")
        spans, views, xs, rot = [], [], [], []
        for input_ids, cache, rope_mode in items:
            view = cache_view(cache)
            if view is None:
                raise GenerationError(f"the C prefill cannot store into a {type(cache).__name__}")
            T = input_ids.shape[1]
            start, L, mode = sequence_span(model, T, cache, rope_mode)
            bad = input_ids[(input_ids < 0) | (input_ids >= c.vocab_size)]
            if bad.numel():
                raise GenerationError(f"token ids {bad[:5].tolist()} are outside the vocabulary [0, {c.vocab_size})")
            cos, sin = model.rotary_emb(torch.arange(start, L), mode, torch.float32)  # (T, rotary_dim)
            spans.append((T, start, L, mode))
            views.append(self._view(cache, view))
            rot += [cos.contiguous(), sin.contiguous()]
            xs.append(input_ids[0])
        x = model.model.embed_tokens(torch.cat(xs)).float().contiguous()  # (sum T, hidden), a new tensor
        n = len(items)
        segs = (_Seg * n)()
        for i, (T, start, _, _) in enumerate(spans):
            segs[i] = _Seg(m=ctypes.addressof(views[i]), T=T, start=start, window=c.attention_window or 0,
                           cos=rot[2 * i].data_ptr(), sin=rot[2 * i + 1].data_ptr())
        rows = x.shape[0]
        buf = self._prefill_scratch(rows)
        chunk = _Chunk(T=rows, start=0, window=0, **{name: t.data_ptr() for name, t in buf.items()})
        rc = self._lib.pl_prefill_segs(segs, n, ctypes.addressof(chunk), x.data_ptr())
        if rc != 0:
            raise GenerationError(f"the C prefill refused {n} chunk(s) of {[s[0] for s in spans]} tokens at "
                                  f"positions {[s[1] for s in spans]} (code {rc})")
        for (_, cache, _), (_, _, L, mode) in zip(items, spans):
            cache.length, cache.rope_mode = L, mode
        dtype = model.model.norm.weight.dtype
        ends = [T for T, _, _, _ in spans]
        bounds = list(itertools.accumulate(ends))  # each chunk's end row in x
        if not last_only:
            return [model.lm_head(model.model.norm(x[b - T:b].to(dtype)[None])) for b, T in zip(bounds, ends)]
        h = x[[b - 1 for b in bounds]]  # (n, hidden): each chunk's last row
        if n > 1 and not on_kernels(model.lm_head):  # a float head: one product per row, as one chunk alone
            return [model.lm_head(model.model.norm(h[i:i + 1].to(dtype)[None])) for i in range(n)]
        logits = model.lm_head(model.model.norm(h.to(dtype)[None]))[0]  # (n, vocab): rows on the kernels
        return [logits[i:i + 1][None] for i in range(n)]

    def _view(self, cache, view) -> _Model:
        """The C view of the weights + one cache (`view`: its `cache_view`), without scratch buffers
        (pl_prefill_segs uses its chunk's; `_bind` adds the decode step's)."""
        code, k, v, k_scale, v_scale = view
        c = self.config
        return _Model(n_layers=c.num_hidden_layers, hidden=c.hidden_size, n_heads=c.num_attention_heads,
                      n_kv=c.num_key_value_heads, head_dim=c.head_dim, inter=c.intermediate_size,
                      rotary_dim=c.rotary_dim, capacity=cache.capacity, kv_type=code, eps=c.rms_norm_eps,
                      layers=ctypes.cast(self._layers, ctypes.POINTER(_Layer)), k=k.data_ptr(), v=v.data_ptr(),
                      k_scale=k_scale.data_ptr() if k_scale is not None else None,
                      v_scale=v_scale.data_ptr() if v_scale is not None else None)

    # ---- one token in C ---------------------------------------------------------------------------------------
    def _bind(self, cache) -> _Model:
        """The C view of the model + this FastKVCache (`_view`) with the decode step's scratch buffers (rebuilt
        when the cache changes)."""
        if self._struct is not None and self._struct_cache is cache:
            return self._struct
        c = self.config
        scratch = layer_scratch(c)
        scratch["y"] = torch.empty(pad_tiles(max(c.hidden_size, c.num_attention_heads * c.head_dim)))
        scratch["scores"] = torch.empty(c.num_attention_heads * cache.capacity)
        m = self._view(cache, cache_view(cache))
        for name, t in scratch.items():
            setattr(m, name, t.data_ptr())
        self._scratch = scratch
        self._struct, self._struct_cache = m, cache
        self._addr_m = ctypes.addressof(m)
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


def cache_view(cache):
    """(kernels.c kv_type code, keys, values, key scales, value scales) of a cache whose memory has pl_model's
    layout (layers, n_kv, capacity, head_dim [/2 for q4_0]): a FastKVCache, or a model.KVCache of batch 1 in
    f32, f16, int8, q8_0 or q4_0 (what the serving engine prefills into). None for any other cache."""
    if isinstance(cache, FastKVCache):
        return _KV_TYPE_CODES[cache.kv_dtype], _codes(cache.k), _codes(cache.v), cache.k_scale, cache.v_scale
    from pocketlm.model import KVCache
    if not isinstance(cache, KVCache) or isinstance(cache.k, torch.Tensor) and cache.k.device.type != "cpu":
        return None
    k, v = cache.k, cache.v
    if isinstance(k, QuantizedKV):
        if k.codes.shape[1] != 1 or not (k.codes.is_contiguous() and v.codes.is_contiguous() and
                                         k.scales.is_contiguous() and v.scales.is_contiguous()) or \
                k.codes.device.type != "cpu":
            return None
        code = {"int8": 2, "q8_0": 3, "q4_0": 4}[k.kv_type]
        return code, k.codes, v.codes, k.scales, v.scales
    code = {torch.float32: 0, torch.float16: 1}.get(k.dtype)
    if code is None or k.shape[1] != 1 or not (k.is_contiguous() and v.is_contiguous()):
        return None
    return code, k, v, None, None


def _codes(store) -> torch.Tensor:
    return store.codes if isinstance(store, QuantizedKV) else store


def kv_cache_bytes(config, n_tokens: int, kv_dtype: str = "f16") -> int:
    """Bytes the cache needs for n_tokens (for memory planning and the CLI's report)."""
    from pocketlm.kvcache import kv_cache_bytes as plan
    return plan(config, n_tokens, kv_dtype)


__all__ = ["FastDecoder", "FastKVCache", "accelerate", "eligible", "kv_cache_bytes", "KV_DTYPES"]
