"""Phi-3 architecture configuration: one frozen dataclass, named presets looked up exactly, and the Hugging Face
`config.json` reader/writer.

The maths each field controls is in ../shared/phi3-spec.md (§1 variant table, §3.2-3.3 RoPE/LongRoPE, §3.8 the
sliding window). This module imports nothing heavy (no torch), so the CLI and the data pipeline can use it cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from pocketlm import longrope_factors
from pocketlm.errors import ConfigError

ROPE_POLICIES = ("dynamic", "long", "short")
MOE_TRAINING = ("deterministic", "sparsemixer")

# Upper bounds on every size field. They are far above any published checkpoint (largest public figures: ~256k
# vocabulary rows, hidden 16-25k, ~130 layers, FFN ~53k, 128 query heads, 10M positions) and exist so that a
# hostile or corrupt config.json / GGUF header cannot make pocketlm compute or allocate anything huge before the
# weight files are checked against it (a `block_count` of 10**12 used to allocate until MemoryError).
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "max_position_embeddings": 1 << 24,
    "original_max_position_embeddings": 1 << 24,
}
MAX_PARAMETERS = 1 << 42  # ~4.4 trillion: the parameter count a config may imply
MAX_WINDOW = 1 << 32  # sliding_window / window_keys (the 128k configs write 262144)
MAX_EXPERTS = 1 << 10  # experts per MoE layer (phi-3.5-MoE: 16)
MAX_CONFIG_JSON_BYTES = 1 << 20  # a real Phi-3 config.json is ~4 KB, even with 48 LongRoPE factors per set


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE ("su"/"longrope") per-frequency rescale factors (phi3-spec §3.3)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float | None = None  # explicit magnitude m; None = sqrt(1 + ln(s)/ln(orig)), s = max/orig
    short_mscale: float | None = None  # PhiMoE-style per-mode magnitude overrides (absent in Phi-3 configs)
    long_mscale: float | None = None


@dataclass(frozen=True)
class Phi3Config:
    model_type: ClassVar[str] = "phi3"  # config.json's model_type; subclasses for other architectures override it
    vocab_size: int = 32064  # embedding rows; the tokenizer defines 32011 ids, 32011-32063 are padding rows
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads: grouped-query attention (medium: 10)
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096  # the LongRoPE switch point
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (1.0 for every Phi-3 model)
    sliding_window: int | None = None  # as written in config.json (2047 for the 4k models)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    # --- phi-3.5-MoE (config.json model_type "phimoe"); num_local_experts = 0 is a dense Phi-3 model ---
    num_local_experts: int = 0  # experts per layer (16), replacing the dense MLP with `block_sparse_moe`
    num_experts_per_tok: int = 2  # SparseMixer routing selects exactly two experts
    router_jitter_noise: float = 0.0  # SparseMixer's jitter epsilon: experts within 2*eps (relative) of the max compete
    input_jitter_noise: float = 0.0  # training-time input noise (applied with moe_training = "sparsemixer")
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (the released config: 0.0)
    attention_bias: bool = False  # biases on q/k/v/o projections
    lm_head_bias: bool = False
    layer_norm: bool = False  # nn.LayerNorm (weight and bias, eps = rms_norm_eps) instead of RMSNorm
    # --- pocketlm runtime choices (not part of the checkpoint's architecture) ---
    chat_format: str = "phi3-mini-2024-07"
    longrope_policy: str = "dynamic"
    """How the LongRoPE factor set is chosen: "dynamic" is the reference rule (long factors iff the whole sequence
    is longer than original_max_position_embeddings; a KV cache built with short factors is rebuilt when a sequence
    crosses the boundary); "long" / "short" use one set for every length (what llama.cpp and vLLM do when they
    serve a context longer / not longer than original_max_position_embeddings)."""
    window_keys: int | None = None
    """Keys a query sees under the sliding window, itself included. None = sliding_window + 1: flash-attn
    semantics, which the 4k checkpoints were trained with (2047 -> 2048 keys; newer transformers SDPA masks
    show 2047). Ignored when sliding_window is None."""
    moe_training: str = "deterministic"
    """How phi-3.5-MoE routes in training mode: "deterministic" (the inference rule, gradients through the chosen
    experts' weights; FSDP ranks agree exactly) or "sparsemixer" (the reference's estimator: Gumbel-sampled
    experts, Heun's third-order gradient correction, input jitter; random, so runs differ by their RNG)."""
    name: str | None = None

    def __post_init__(self) -> None:
        for key, limit in SIZE_LIMITS.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
            if value > limit:
                raise ConfigError(f"{key} = {value} exceeds the limit of {limit}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        experts = self.num_local_experts
        if not isinstance(experts, int) or isinstance(experts, bool) or not 0 <= experts <= MAX_EXPERTS:
            raise ConfigError(f"num_local_experts must be an integer in [0, {MAX_EXPERTS}], got {experts!r}")
        if experts and (self.num_experts_per_tok != 2 or experts < 2):
            raise ConfigError(f"num_experts_per_tok = {self.num_experts_per_tok!r} with {experts} experts: "
                              "SparseMixer routing (phi-3.5-MoE) selects exactly 2 of at least 2 experts")
        for key in ("router_jitter_noise", "input_jitter_noise", "router_aux_loss_coef"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
        if experts and not self.layer_norm:
            raise ConfigError("a phi-3.5-MoE structure (num_local_experts > 0) uses LayerNorm: set layer_norm")
        if self.num_parameters() > MAX_PARAMETERS:
            raise ConfigError(f"the sizes imply {self.num_parameters():,} parameters, more than the limit of "
                              f"{MAX_PARAMETERS:,} (hidden_size {self.hidden_size}, intermediate_size "
                              f"{self.intermediate_size}, num_hidden_layers {self.num_hidden_layers}, "
                              f"vocab_size {self.vocab_size})")
        partial = self.partial_rotary_factor
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0.0 < partial <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be a number in (0, 1], got {partial!r}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(f"partial_rotary_factor {partial} gives an odd or empty rotary "
                              f"dimension {self.rotary_dim} for head_dim {self.head_dim}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value > 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        for key in ("sliding_window", "window_keys"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 < value <= MAX_WINDOW):
                raise ConfigError(f"{key} must be a positive integer up to {MAX_WINDOW} or null, got {value!r}")
        if not (isinstance(self.initializer_range, (int, float)) and math.isfinite(self.initializer_range)
                and self.initializer_range >= 0):
            raise ConfigError(f"initializer_range must be a finite number >= 0, got {self.initializer_range!r}")
        if self.moe_training not in MOE_TRAINING:
            raise ConfigError(f"moe_training {self.moe_training!r} is not one of {MOE_TRAINING}")
        if self.longrope_policy not in ROPE_POLICIES:
            raise ConfigError(f"longrope_policy {self.longrope_policy!r} is not one of {ROPE_POLICIES}")
        if self.torch_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not one of float32, float16, bfloat16")
        for key in ("bos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{key} {value!r} is outside the vocabulary [0, {self.vocab_size})")
        eos = self.eos_token_id
        eos_ids = eos if isinstance(eos, tuple) else () if eos is None else (eos,)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in eos_ids):
            raise ConfigError(f"eos_token_id must be a token id or a list of token ids, got {eos!r}")
        rs = self.rope_scaling
        if rs is not None:
            n = self.rotary_dim // 2
            for key in ("short_factor", "long_factor"):
                factors = getattr(rs, key)
                if len(factors) != n:
                    raise ConfigError(f"rope_scaling.{key} has {len(factors)} entries; rotary dimension "
                                      f"{self.rotary_dim} needs {n}")
                if not all(isinstance(f, (int, float)) and f > 0 and math.isfinite(f) for f in factors):
                    raise ConfigError(f"rope_scaling.{key} must hold positive finite numbers, got {list(factors)}")

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_window(self) -> int | None:
        """Number of keys (self included) a query attends to; None = unlimited (causal only)."""
        if self.sliding_window is None:
            return None
        return self.window_keys if self.window_keys is not None else self.sliding_window + 1

    @property
    def rope_attention_factor(self) -> float:
        """LongRoPE magnitude m applied to cos and sin in both modes (phi3-spec §3.3); 1.0 without scaling."""
        rs = self.rope_scaling
        if rs is None:
            return 1.0
        if rs.attention_factor is not None:
            return float(rs.attention_factor)
        s = self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    @property
    def is_moe(self) -> bool:
        """A phi-3.5-MoE structure: `block_sparse_moe` layers with SparseMixer top-2 routing."""
        return self.num_local_experts > 0

    def num_parameters(self, *, active: bool = False) -> int:
        """Parameters the shapes imply (tied embeddings counted once). `active`: those one token uses, i.e. only
        `num_experts_per_tok` of the experts of each MoE layer (the router itself is always active)."""
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q_rows, kv_rows = self.num_attention_heads * hd, self.num_key_value_heads * hd
        qkv = h * (q_rows + 2 * kv_rows) + (q_rows + 2 * kv_rows if self.attention_bias else 0)
        o = q_rows * h + (h if self.attention_bias else 0)
        norm = 2 * h if self.layer_norm else h  # LayerNorm: weight and bias
        if self.is_moe:
            experts = self.num_experts_per_tok if active else self.num_local_experts
            ffn = h * self.num_local_experts + experts * 3 * i * h  # router + w1/w3 (i, h) and w2 (h, i) each
        else:
            ffn = 3 * i * h
        per_layer = qkv + o + ffn + 2 * norm
        head = 0 if self.tie_word_embeddings else v * h
        head += v if self.lm_head_bias else 0
        return v * h + self.num_hidden_layers * per_layer + norm + head

    # ---- Hugging Face config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> Phi3Config:
        """Build a config from a parsed Hugging Face `config.json` (Phi3ForCausalLM, model_type "phi3")."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == "phi3small":  # Phi-3-small: block-sparse attention, GEGELU, muP (config_small.py)
            from pocketlm.config_small import Phi3SmallConfig
            return Phi3SmallConfig.from_hf_dict(d, source=source)
        if model_type not in ("phi3", "phimoe"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; pocketlm loads 'phi3' "
                              "checkpoints (Phi-3-mini, Phi-3-medium, Phi-3.5-mini) and 'phimoe' (Phi-3.5-MoE)")
        for key in ("mlp_bias",) if model_type == "phimoe" else ("attention_bias", "mlp_bias", "lm_head_bias"):
            if d.get(key):
                raise ConfigError(f"{source}: {key}=true is not part of the {model_type} architecture")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Phi-3 uses 'silu')")

        def get(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
            value = d.get(key, default)
            if value is None and default is None:
                return None
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise ConfigError(f"{source}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
            return value

        def number(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{source}: {key} is an integer of {len(str(value))} digits, too large") from None

        heads = get("num_attention_heads", int, 32)
        kv_heads = d.get("num_key_value_heads")  # null or absent: multi-head attention, as transformers reads it
        kv_heads = heads if kv_heads is None else get("num_key_value_heads", int, heads)
        rope_params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        scaling = d.get("rope_scaling") or rope_params or None
        theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        original = d.get("original_max_position_embeddings")
        if isinstance(scaling, dict) and scaling.get("original_max_position_embeddings") is not None:
            original = original or scaling["original_max_position_embeddings"]
        max_pos = get("max_position_embeddings", int, 4096)
        if original is not None and (isinstance(original, bool) or not isinstance(original, int)):
            raise ConfigError(f"{source}: original_max_position_embeddings must be int, got {original!r}")
        eos = d.get("eos_token_id", 32000)
        if isinstance(eos, list):
            eos = tuple(eos)
        partial = d.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
        dtype = d.get("torch_dtype", d.get("dtype", "bfloat16")) or "bfloat16"
        try:
            return cls(
                vocab_size=get("vocab_size", int, 32064),
                hidden_size=get("hidden_size", int, 3072),
                intermediate_size=get("intermediate_size", int, 8192),
                num_hidden_layers=get("num_hidden_layers", int, 32),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                max_position_embeddings=max_pos,
                original_max_position_embeddings=original or max_pos,
                rope_theta=number("rope_theta", theta),
                rope_scaling=_parse_rope_scaling(scaling, source),
                partial_rotary_factor=number("partial_rotary_factor", partial),
                sliding_window=get("sliding_window", int, None),
                rms_norm_eps=float(get("rms_norm_eps", (int, float), 1e-5)),
                tie_word_embeddings=get("tie_word_embeddings", bool, False),
                bos_token_id=get("bos_token_id", int, None),
                eos_token_id=eos,
                pad_token_id=get("pad_token_id", int, None),
                initializer_range=float(get("initializer_range", (int, float), 0.02)),
                torch_dtype=str(dtype),
                name=d.get("_name_or_path") if isinstance(d.get("_name_or_path"), str) else None,
                **(_phimoe_fields(d, get) if model_type == "phimoe" else {}),
            )
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(f"{source}: ") else f"{source}: {e}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> Phi3Config:
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_CONFIG_JSON_BYTES:
                raise ConfigError(f"{path}: config.json is {size} bytes, more than the limit of "
                                  f"{MAX_CONFIG_JSON_BYTES}")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config.json ({e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit conversion limit
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' Phi3ForCausalLM (and pocketlm) load."""
        d: dict[str, Any] = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "sliding_window": self.sliding_window,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = self.partial_rotary_factor
        rs = self.rope_scaling
        if rs is not None:
            d["rope_scaling"] = {"type": "longrope", "short_factor": list(rs.short_factor),
                                 "long_factor": list(rs.long_factor)}
            for key in ("attention_factor", "short_mscale", "long_mscale"):
                if getattr(rs, key) is not None:
                    d["rope_scaling"][key] = getattr(rs, key)
        if self.is_moe:  # the config.json transformers' PhimoeForCausalLM loads
            del d["embd_pdrop"], d["resid_pdrop"]
            d.update(architectures=["PhimoeForCausalLM"], model_type="phimoe", attention_bias=self.attention_bias,
                     lm_head_bias=self.lm_head_bias, num_local_experts=self.num_local_experts,
                     num_experts_per_tok=self.num_experts_per_tok, router_jitter_noise=self.router_jitter_noise,
                     input_jitter_noise=self.input_jitter_noise, router_aux_loss_coef=self.router_aux_loss_coef,
                     output_router_logits=False, hidden_dropout=0.0)
            if rs is not None:  # PhimoeConfig requires both magnitudes: the one in use when not overridden
                d["rope_scaling"]["original_max_position_embeddings"] = self.original_max_position_embeddings
                for key in ("short_mscale", "long_mscale"):
                    d["rope_scaling"].setdefault(key, self.rope_attention_factor)
        if self.name:
            d["_name_or_path"] = self.name
        return d

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")

    def replace(self, **changes: Any) -> Phi3Config:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _phimoe_fields(d: dict[str, Any], get) -> dict[str, Any]:
    """The phi-3.5-MoE fields of a `model_type: "phimoe"` config.json, with transformers' PhimoeConfig defaults
    for absent keys. Its norms are LayerNorm (eps = rms_norm_eps), as the reference builds them."""
    return dict(
        num_local_experts=get("num_local_experts", int, 16),
        num_experts_per_tok=get("num_experts_per_tok", int, 2),
        router_jitter_noise=float(get("router_jitter_noise", (int, float), 0.01)),
        input_jitter_noise=float(get("input_jitter_noise", (int, float), 0.0)),
        router_aux_loss_coef=float(get("router_aux_loss_coef", (int, float), 0.001)),
        attention_bias=get("attention_bias", bool, False),
        lm_head_bias=get("lm_head_bias", bool, False),
        layer_norm=True,
    )


def _parse_rope_scaling(scaling: Any, source: str) -> RopeScaling | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default") and "short_factor" not in scaling:
        return None
    if kind not in ("su", "longrope"):
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported; Phi-3 uses 'su' or 'longrope'")
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if isinstance(value, list) and len(value) > SIZE_LIMITS["hidden_size"] // 2:
            raise ConfigError(f"{source}: rope_scaling.{key} has {len(value)} entries, more than any head "
                              f"dimension allows ({SIZE_LIMITS['hidden_size'] // 2})")
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in value):
            raise ConfigError(f"{source}: rope_scaling.{key} must be a list of numbers, got {value!r}")
        factors[key] = tuple(float(x) for x in value)
    extras = {}
    for key in ("attention_factor", "short_mscale", "long_mscale"):
        value = scaling.get(key)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: rope_scaling.{key} must be a positive number, got {value!r}")
            extras[key] = float(value)
    return RopeScaling(**factors, **extras)


def _longrope(factors: dict[str, list[float]]) -> RopeScaling:
    return RopeScaling(short_factor=tuple(factors["short_factor"]), long_factor=tuple(factors["long_factor"]))


def _ramp(n: int, lo: float, hi: float) -> tuple[float, ...]:
    return tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))


_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32)
_MEDIUM = dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
               num_key_value_heads=10, chat_format="phi3-medium")

# phi-3.5-MoE's architecture constants (its config.json): 16 experts, top-2 SparseMixer with jitter eps 0.01
_PHIMOE = dict(num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.01, input_jitter_noise=0.01,
               router_aux_loss_coef=0.0, attention_bias=True, lm_head_bias=True, layer_norm=True,
               eos_token_id=32000)

PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json
    "phi-3-mini-4k": dict(**_MINI, max_position_embeddings=4096, sliding_window=2047),
    # https://huggingface.co/microsoft/Phi-3-mini-128k-instruct/blob/main/config.json (April 2024 factors)
    "phi-3-mini-128k": dict(**_MINI, max_position_embeddings=131072, sliding_window=262144,
                            rope_scaling=_longrope(longrope_factors.PHI3_MINI_128K_APRIL_2024)),
    # https://huggingface.co/microsoft/Phi-3-medium-4k-instruct/blob/main/config.json
    "phi-3-medium-4k": dict(**_MEDIUM, max_position_embeddings=4096, sliding_window=2047),
    # https://huggingface.co/microsoft/Phi-3-medium-128k-instruct/blob/main/config.json
    "phi-3-medium-128k": dict(**_MEDIUM, max_position_embeddings=131072, sliding_window=131072,
                              pad_token_id=None, rope_scaling=_longrope(longrope_factors.PHI3_MEDIUM_128K)),
    # https://huggingface.co/microsoft/Phi-3.5-mini-instruct/blob/main/config.json
    "phi-3.5-mini": dict(**_MINI, max_position_embeddings=131072, sliding_window=262144, chat_format="phi3.5",
                         rope_scaling=_longrope(longrope_factors.PHI35_MINI)),
    # https://huggingface.co/microsoft/Phi-3.5-MoE-instruct/blob/main/config.json: the exact shapes and routing
    # constants. Its 64 LongRoPE factors per set were not available offline: the preset keeps the released
    # per-mode magnitudes (1.243163121016122) with factors of 1.0; a real checkpoint's config.json carries its own.
    "phi-3.5-moe": dict(hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, max_position_embeddings=131072, sliding_window=131072,
                        pad_token_id=None, chat_format="phi3.5", **_PHIMOE,
                        rope_scaling=RopeScaling(short_factor=(1.0,) * 64, long_factor=(1.0,) * 64,
                                                 short_mscale=1.243163121016122, long_mscale=1.243163121016122)),
    # --- small structures for tests: the real 32064-row vocabulary so the real tokenizer works with them ---
    # mini-4k structure (MHA, sliding window 2047 -> 2048 keys)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=4096, sliding_window=2047, torch_dtype="float32"),
    # medium structure (GQA 2:1)
    "tiny-gqa": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=4096, sliding_window=2047,
                     chat_format="phi3-medium", torch_dtype="float32"),
    # 128k structure: LongRoPE switching at 4096, 32 factors per set for head_dim 64
    "tiny-longrope": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=131072, sliding_window=262144,
                          rope_scaling=RopeScaling(short_factor=_ramp(32, 1.0, 3.0), long_factor=_ramp(32, 1.0, 64.0)),
                          torch_dtype="float32"),
    # phi-3.5-MoE structure: 4 experts (SparseMixer top-2), GQA 2:1, LayerNorm, biases, LongRoPE with per-mode
    # magnitudes switching at 4096
    "tiny-moe": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=131072, sliding_window=131072,
                     pad_token_id=None, chat_format="phi3.5", **_PHIMOE,
                     rope_scaling=RopeScaling(short_factor=_ramp(16, 1.0, 2.0), long_factor=_ramp(16, 1.0, 32.0),
                                              short_mscale=1.1, long_mscale=1.2),
                     torch_dtype="float32") | dict(num_local_experts=4),
    # --- the small models we train ourselves (issue 8 sizes them for the CPU and GPU recipes) ---
    "nano": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
                 torch_dtype="float32"),
    "micro": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
                  torch_dtype="float32"),
    # --- Phi-3-small (model_type "phi3small", config_small.py / model_small.py) ---
    # https://huggingface.co/microsoft/Phi-3-small-8k-instruct/blob/main/config.json (every other field: the
    # Phi3SmallConfig defaults, which are that file's values)
    "phi-3-small-8k": dict(model_type="phi3small", max_position_embeddings=8192),
    # https://huggingface.co/microsoft/Phi-3-small-128k-instruct/blob/main/config.json: the 8K shapes with LongRoPE
    # switching at 8192 up to 131072. Its 64 factors per set (and mscales) were not available offline: the preset
    # (for shapes, parameter counts and memory plans) keeps factors of 1.0 with the default magnitude rule; a real
    # checkpoint's config.json carries its own factors and is what `load` reads.
    "phi-3-small-128k": dict(model_type="phi3small", max_position_embeddings=131072,
                             original_max_position_embeddings=8192,
                             rope_scaling=RopeScaling(short_factor=(1.0,) * 64, long_factor=(1.0,) * 64)),
    # Phi-3-small structure at test size: the real 100352-row vocabulary (tied), GQA 2:1, a block-sparse layer 0
    # and a dense layer 1, 16-token blocks with 2 local blocks and vertical stride 4 (per-head pattern)
    "tiny-small": dict(model_type="phi3small", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       blocksparse_block_size=16, blocksparse_triton_kernel_block_size=16,
                       blocksparse_num_local_blocks=2, blocksparse_vert_stride=4, torch_dtype="float32"),
}


def preset(name: str) -> Phi3Config:
    """The named preset, looked up exactly (no fuzzy matching)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{name!r} is not a preset; choose from {sorted(PRESETS)}")
    fields_ = dict(PRESETS[name])
    model_type = fields_.pop("model_type", "phi3")
    if model_type == "phi3small":
        from pocketlm.config_small import Phi3SmallConfig
        return Phi3SmallConfig(**fields_, name=name)
    return Phi3Config(**fields_, name=name)
