"""Phi-3-small configuration (config.json `model_type` "phi3small"): the Phi-3 fields plus block-sparse attention,
GEGELU and muP.

Field names follow `Phi3Config` where the meaning is the same, and config.json's own names are kept as read-only
aliases: `rope_theta` = `rope_embedding_base`, `rms_norm_eps` = `layer_norm_epsilon` (a LayerNorm epsilon here),
`intermediate_size` = `ff_intermediate_size`. The released values are the defaults: a config.json of
microsoft/Phi-3-small-8k-instruct reads back as `Phi3SmallConfig()` plus its name.

Reference: the released `configuration_phi3_small.py` / `modeling_phi3_small.py` (HF repo
microsoft/Phi-3-small-8k-instruct) and vLLM's `phi3_small.py`; the maths each field controls is in model_small.py.
This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from pocketlm.config import Phi3Config, _parse_rope_scaling
from pocketlm.errors import ConfigError

# config.json keys that only matter to training with the reference code (dropout rates, padding for the Triton
# kernel's backward pass) or to the Hugging Face loader; kept so a config reads back and writes out unchanged.
_PASSTHROUGH = ("embedding_dropout_prob", "attention_dropout_prob", "ffn_dropout_prob",
                "pad_sequence_to_multiple_of_64", "reorder_and_upcast_attn")


def _next_multiple(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class Phi3SmallConfig(Phi3Config):
    model_type: ClassVar[str] = "phi3small"
    # --- the released Phi-3-small shape (8k config.json) ---
    vocab_size: int = 100352  # cl100k_base (100256 ranks) + Phi-3-small's special and dummy ids, padded to 100352
    hidden_size: int = 4096
    intermediate_size: int = 14336  # config.json: ff_intermediate_size
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 8192
    original_max_position_embeddings: int = 8192
    rope_theta: float = 1000000.0  # config.json: rope_embedding_base
    rms_norm_eps: float = 1e-5  # config.json: layer_norm_epsilon (LayerNorm, with bias)
    tie_word_embeddings: bool = True  # absent from config.json: PretrainedConfig's default; vLLM copies the embedding
    bos_token_id: int | None = 100257  # <|endoftext|>
    eos_token_id: int | tuple[int, ...] | None = 100257
    pad_token_id: int | None = None
    chat_format: str = "phi3-small"
    # --- block-sparse attention ---
    dense_attention_every_n_layers: int | None = 2
    """Layer i (0-based) is dense iff (i + 1) % n == 0; 0/None: every layer block-sparse."""
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    blocksparse_triton_kernel_block_size: int = 64  # must equal blocksparse_block_size (vLLM asserts the same)
    # --- GEGELU MLP ---
    gegelu_limit: float | None = 20.0
    gegelu_pad_to_256: bool = True  # only used when ff_intermediate_size is absent (with ff_dim_multiplier)
    ff_dim_multiplier: int | None = None
    # --- muP ---
    mup_attn_multiplier: float = 1.0
    mup_embedding_multiplier: float | None = 10.0
    mup_use_scaling: bool = True
    mup_width_multiplier: float | None = 8.0
    rope_position_scale: float = 1.0
    # --- reference-training keys, carried through unchanged ---
    embedding_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.0
    ffn_dropout_prob: float = 0.1
    pad_sequence_to_multiple_of_64: bool = True
    reorder_and_upcast_attn: bool = False

    def __post_init__(self) -> None:
        if self.rope_scaling is None and self.original_max_position_embeddings != self.max_position_embeddings:
            # without LongRoPE there is no switch point; config.json then has no such key and reads back as this
            object.__setattr__(self, "original_max_position_embeddings", self.max_position_embeddings)
        super().__post_init__()
        for key in ("blocksparse_block_size", "blocksparse_num_local_blocks", "blocksparse_vert_stride",
                    "blocksparse_triton_kernel_block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 20:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if self.blocksparse_triton_kernel_block_size != self.blocksparse_block_size:
            raise ConfigError(f"blocksparse_triton_kernel_block_size {self.blocksparse_triton_kernel_block_size} "
                              f"differs from blocksparse_block_size {self.blocksparse_block_size}; the reference "
                              "only defines the layout when they are equal")
        n = self.dense_attention_every_n_layers
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ConfigError(f"dense_attention_every_n_layers must be a non-negative integer or null, got {n!r}")
        for key in ("mup_attn_multiplier", "rope_position_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        for key in ("gegelu_limit", "mup_embedding_multiplier", "mup_width_multiplier"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{key} must be a number >= 0 or null, got {value!r}")
        if self.sliding_window is not None:
            raise ConfigError(f"sliding_window {self.sliding_window} is not part of Phi-3-small (its sparsity is "
                              "the block-sparse layout)")

    # ---- config.json's own names -------------------------------------------------------------------------
    @property
    def rope_embedding_base(self) -> float:
        return self.rope_theta

    @property
    def layer_norm_epsilon(self) -> float:
        return self.rms_norm_eps

    @property
    def ff_intermediate_size(self) -> int:
        return self.intermediate_size

    @property
    def attention_scale(self) -> float:
        """Softmax scale: mup_attn_multiplier / head_dim with muP scaling (1/128 for the release), else
        1/sqrt(head_dim)."""
        if self.mup_use_scaling:
            return self.mup_attn_multiplier / self.head_dim
        return self.head_dim ** -0.5

    def is_dense_layer(self, layer_idx: int) -> bool:
        n = self.dense_attention_every_n_layers
        return bool(n) and (layer_idx + 1) % n == 0

    def dummy_token_ids(self) -> tuple[int, ...]:
        """Vocabulary ids whose logits the reference sets to the dtype's minimum: the `<|dummy_id_N|>` tokens,
        the FIM tokens and `<|endofprompt|>` (tokenization_phi3_small.py `dummy_token_indices`), those inside
        this vocabulary. Empty for a vocabulary that is not Phi-3-small's (e.g. a tiny test vocabulary)."""
        from pocketlm.tokenizer_small import DUMMY_TOKEN_IDS
        return tuple(i for i in DUMMY_TOKEN_IDS if i < self.vocab_size) if self.vocab_size == 100352 else ()

    def num_parameters(self, *, active: bool = False) -> int:
        """Every parameter (all are active: no experts): biased fused QKV / dense / up / down projections, two LayerNorms (weight and bias)
        per layer, the final LayerNorm, the embedding, and the head unless tied."""
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        qkv_rows = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd
        per_layer = (qkv_rows * h + qkv_rows) + (h * h + h) + (2 * i * h + 2 * i) + (i * h + h) + 4 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + 2 * h + head

    # ---- Hugging Face config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> Phi3SmallConfig:
        """Read a released Phi-3-small config.json (model_type "phi3small")."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "phi3small":
            raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not 'phi3small'")
        act = d.get("hidden_act", "gegelu")
        if act != "gegelu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Phi-3-small uses 'gegelu')")
        defaults = cls()

        def get(key: str, kind: type | tuple[type, ...], default: Any, *, nullable: bool = False) -> Any:
            value = d.get(key, default)
            if value is None and nullable:
                return None
            if isinstance(value, bool) and kind not in (bool, (bool,)) or not isinstance(value, kind):
                raise ConfigError(f"{source}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
            return value

        def number(key: str, default: Any, *, nullable: bool = False) -> float | None:
            value = get(key, (int, float), default, nullable=nullable)
            return None if value is None else float(value)

        hidden = get("hidden_size", int, defaults.hidden_size)
        ff = d.get("ff_intermediate_size")
        multiplier = d.get("ff_dim_multiplier")
        pad256 = get("gegelu_pad_to_256", bool, True)
        if ff is None:  # the reference's intermediate_size property
            if not isinstance(multiplier, int) or isinstance(multiplier, bool) or multiplier <= 0:
                raise ConfigError(f"{source}: neither ff_intermediate_size nor a positive ff_dim_multiplier "
                                  f"(got {multiplier!r})")
            ff = multiplier * (hidden // 3) * 2
            ff = _next_multiple(ff, 256) if pad256 else ff
        elif not isinstance(ff, int) or isinstance(ff, bool):
            raise ConfigError(f"{source}: ff_intermediate_size must be int, got {ff!r}")
        elif multiplier is not None:
            raise ConfigError(f"{source}: both ff_dim_multiplier {multiplier!r} and ff_intermediate_size {ff!r} "
                              "are set; the reference refuses that")
        heads = get("num_attention_heads", int, defaults.num_attention_heads)
        kv = d.get("num_key_value_heads")
        kv = heads if kv is None else get("num_key_value_heads", int, heads)
        max_pos = get("max_position_embeddings", int, defaults.max_position_embeddings)
        scaling = d.get("rope_scaling")
        original = d.get("original_max_position_embeddings")
        if isinstance(scaling, dict) and scaling.get("original_max_position_embeddings") is not None:
            original = original or scaling["original_max_position_embeddings"]
        if original is not None and (isinstance(original, bool) or not isinstance(original, int)):
            raise ConfigError(f"{source}: original_max_position_embeddings must be int, got {original!r}")
        eos = d.get("eos_token_id", defaults.eos_token_id)
        if isinstance(eos, list):
            eos = tuple(eos)
        passthrough = {k: d[k] for k in _PASSTHROUGH if k in d}
        try:
            return cls(
                vocab_size=get("vocab_size", int, defaults.vocab_size),
                hidden_size=hidden,
                intermediate_size=ff,
                num_hidden_layers=get("num_hidden_layers", int, defaults.num_hidden_layers),
                num_attention_heads=heads,
                num_key_value_heads=kv,
                max_position_embeddings=max_pos,
                original_max_position_embeddings=original or max_pos,
                rope_theta=number("rope_embedding_base", defaults.rope_theta),
                rope_scaling=_parse_rope_scaling(scaling, source),
                rms_norm_eps=number("layer_norm_epsilon", defaults.rms_norm_eps),
                tie_word_embeddings=get("tie_word_embeddings", bool, True),
                bos_token_id=get("bos_token_id", int, None, nullable=True),
                eos_token_id=eos,
                pad_token_id=get("pad_token_id", int, None, nullable=True),
                initializer_range=number("initializer_range", 0.02),
                torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16")) or "bfloat16"),
                dense_attention_every_n_layers=get("dense_attention_every_n_layers", int, 0, nullable=True),
                blocksparse_block_size=get("blocksparse_block_size", int, 64),
                blocksparse_num_local_blocks=get("blocksparse_num_local_blocks", int, 16),
                blocksparse_vert_stride=get("blocksparse_vert_stride", int, 8),
                blocksparse_homo_head_pattern=get("blocksparse_homo_head_pattern", bool, False),
                blocksparse_triton_kernel_block_size=get("blocksparse_triton_kernel_block_size", int,
                                                         d.get("blocksparse_block_size", 64)),
                gegelu_limit=number("gegelu_limit", 20.0, nullable=True),
                gegelu_pad_to_256=pad256,
                ff_dim_multiplier=multiplier,
                mup_attn_multiplier=number("mup_attn_multiplier", 1.0),
                mup_embedding_multiplier=number("mup_embedding_multiplier", 10.0, nullable=True),
                mup_use_scaling=get("mup_use_scaling", bool, True),
                mup_width_multiplier=number("mup_width_multiplier", 8.0, nullable=True),
                rope_position_scale=number("rope_position_scale", 1.0),
                name=d.get("_name_or_path") if isinstance(d.get("_name_or_path"), str) else None,
                **passthrough,
            )
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(f"{source}: ") else f"{source}: {e}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of the released layout (the keys of microsoft/Phi-3-small-*-instruct's file, less
        `auto_map`, which names remote-code files pocketlm does not write)."""
        d: dict[str, Any] = {
            "architectures": ["Phi3SmallForCausalLM"],
            "model_type": "phi3small",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "ff_intermediate_size": self.intermediate_size,
            "ff_dim_multiplier": self.ff_dim_multiplier,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "gegelu",
            "gegelu_limit": self.gegelu_limit,
            "gegelu_pad_to_256": self.gegelu_pad_to_256,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_embedding_base": _int_if_whole(self.rope_theta),
            "rope_position_scale": self.rope_position_scale,
            "layer_norm_epsilon": self.rms_norm_eps,
            "dense_attention_every_n_layers": self.dense_attention_every_n_layers,
            "blocksparse_block_size": self.blocksparse_block_size,
            "blocksparse_num_local_blocks": self.blocksparse_num_local_blocks,
            "blocksparse_vert_stride": self.blocksparse_vert_stride,
            "blocksparse_homo_head_pattern": self.blocksparse_homo_head_pattern,
            "blocksparse_triton_kernel_block_size": self.blocksparse_triton_kernel_block_size,
            "mup_attn_multiplier": self.mup_attn_multiplier,
            "mup_embedding_multiplier": self.mup_embedding_multiplier,
            "mup_use_scaling": self.mup_use_scaling,
            "mup_width_multiplier": self.mup_width_multiplier,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        d.update({k: getattr(self, k) for k in _PASSTHROUGH})
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if not self.tie_word_embeddings:
            d["tie_word_embeddings"] = False
        rs = self.rope_scaling
        if rs is not None:
            d["rope_scaling"] = {"type": "su", "short_factor": list(rs.short_factor),
                                 "long_factor": list(rs.long_factor),
                                 "original_max_position_embeddings": self.original_max_position_embeddings}
            for key in ("attention_factor", "short_mscale", "long_mscale"):
                if getattr(rs, key) is not None:
                    d["rope_scaling"][key] = getattr(rs, key)
        if self.name:
            d["_name_or_path"] = self.name
        return d


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x

