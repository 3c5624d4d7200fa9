"""phi-3.5-vision (`Phi3VForCausalLM`): a CLIP ViT-L/14-336 image tower, the HD crops' features merged 2x2, learned
separators, a 2-layer projector, and phi-3.5-mini reading the image features in place of the `<|image_N|>` tags.

As the released reference defines it (microsoft/Phi-3.5-vision-instruct: `modeling_phi3_v.py`,
`image_embedding_phi3_v.py`, `processing_phi3_v.py`; vLLM `phi3v.py` reads it the same way):
- the CLIP tower is transformers' CLIPVisionModel (quick_gelu, pre_layrnorm); the features are the hidden states
  *before the last layer* (`layer_idx` -2: the last layer and `post_layernorm` are in the checkpoint but never run)
  without the CLS position: (crops, 24*24, 1024) for 336 px crops;
- 2x2 merge: each 2x2 block of patches becomes one 4096-wide vector (channels ordered [row0 col0, row0 col1,
  row1 col0, row1 col1] x 1024), then the tiles of an image are laid out as one (rows*12, cols*12) grid;
- separators: `sub_GN` (1, 1, 1, 4096) is appended at the end of every row of that grid and of the global image's
  12x12 grid; the order is [sub-image rows, `glb_GN` (1, 1, 4096), global rows] ("sub_glb");
- projector `img_projection`: Linear(4096, 3072), GELU (erf), Linear(3072, 3072);
- the prompt: the text split at `<|image_N|>` tags, each chunk tokenized on its own (with BOS when the tokenizer
  adds one, as the released processor calls `tokenizer(chunk)`), each tag replaced by that image's
  `num_tokens` positions; the features go to those positions in order (the reference marks them with id -N and
  embeds id 0 there before overwriting).

Checkpoint names are the released ones: the language model's as in model.py, plus
`model.vision_embed_tokens.{img_processor.vision_model.*, glb_GN, sub_GN, img_projection.0, img_projection.2}`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import PRESETS, Phi3Config
from pocketlm.errors import ConfigError, GenerationError, ImageError, WeightFormatError
from pocketlm.model import Phi3ForCausalLM

CLIP_L14_336 = "openai/clip-vit-large-patch14-336"


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP vision tower's shape (defaults: ViT-L/14 at 336 px, `CLIP_VIT_LARGE_PATCH14_336_CONFIG`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65536:
                raise ConfigError(f"vision config: {key} must be an integer in [1, 65536], got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        grid, rem = divmod(self.image_size, self.patch_size)
        if rem or grid % 2:
            raise ConfigError(f"vision config: image_size {self.image_size} must be an even number of patches of "
                              f"{self.patch_size} px (the 2x2 merge)")

    @property
    def grid(self) -> int:
        """Patches per side of one crop (24)."""
        return self.image_size // self.patch_size

    @property
    def merged(self) -> int:
        """Merged positions per side of one crop (12)."""
        return self.grid // 2


@dataclass(frozen=True)
class Phi3VConfig:
    """phi-3.5-vision: the language model's Phi3Config plus the image side (config.json `img_processor`,
    `embd_layer`; preprocessor_config.json `num_crops`)."""

    text: Phi3Config
    clip: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    num_crops: int = 4  # preprocessor_config.json of Phi-3.5-vision-instruct (16 suits single large images)
    layer_idx: int = -2  # which CLIP hidden state: -2 = the input of the last layer
    model_name: str = CLIP_L14_336

    def __post_init__(self):
        n = self.clip.num_hidden_layers
        if isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int) or not -n - 1 <= self.layer_idx <= n:
            raise ConfigError(f"img_processor.layer_idx {self.layer_idx!r} is outside [-{n + 1}, {n}]")
        if isinstance(self.num_crops, bool) or not isinstance(self.num_crops, int) or not 1 <= self.num_crops <= 64:
            raise ConfigError(f"num_crops must be an integer in [1, 64], got {self.num_crops!r}")

    @property
    def layers_run(self) -> int:
        """CLIP layers computed: hidden_states[layer_idx] is the output of this many layers."""
        return self.layer_idx % (self.clip.num_hidden_layers + 1)

    @property
    def image_dim_out(self) -> int:
        return self.clip.hidden_size

    def to_hf_dict(self) -> dict[str, Any]:
        d = self.text.to_hf_dict()
        d.update(architectures=["Phi3VForCausalLM"], model_type="phi3_v")
        d["img_processor"] = {"image_dim_out": self.clip.hidden_size, "model_name": self.model_name,
                              "name": "clip_vision_model", "num_img_tokens": self.clip.merged ** 2,
                              "layer_idx": self.layer_idx, "type_feature": "patch"}
        if self.clip != CLIPVisionConfig():  # pocketlm extension: the shape of a tower other than ViT-L/14-336
            d["img_processor"]["vision_config"] = asdict(self.clip)
        d["embd_layer"] = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True}
        return d

    def preprocessor_dict(self) -> dict[str, Any]:
        from pocketlm.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        return {"do_convert_rgb": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
                "image_processor_type": "Phi3VImageProcessor", "num_crops": self.num_crops,
                "num_img_tokens": self.clip.merged ** 2, "processor_class": "Phi3VProcessor"}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json",
                     num_crops: int | None = None) -> Phi3VConfig:
        if d.get("model_type") != "phi3_v":
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, not 'phi3_v'")
        text = Phi3Config.from_hf_dict({**d, "model_type": "phi3"}, source=source)  # the language model's keys
        ip = d.get("img_processor")
        if not isinstance(ip, dict) or ip.get("name") != "clip_vision_model":
            raise ConfigError(f"{source}: img_processor must be {{'name': 'clip_vision_model', ...}}, got {ip!r:.120}")
        embd = d.get("embd_layer") or {}
        expected = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                    "use_hd_transform": True, "with_learnable_separator": True}
        for key, value in expected.items():
            if embd.get(key, value) != value:
                raise ConfigError(f"{source}: embd_layer.{key} = {embd.get(key)!r}; only {value!r} is supported "
                                  "(the released phi-3.5-vision)")
        vc = ip.get("vision_config")
        if vc is not None:
            if not isinstance(vc, dict):
                raise ConfigError(f"{source}: img_processor.vision_config must be an object, got {vc!r:.80}")
            unknown = set(vc) - set(CLIPVisionConfig.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"{source}: img_processor.vision_config has unknown keys {sorted(unknown)}")
            clip = CLIPVisionConfig(**vc)
        elif ip.get("model_name") == CLIP_L14_336:
            clip = CLIPVisionConfig()
        else:
            raise ConfigError(f"{source}: img_processor.model_name {ip.get('model_name')!r} is not {CLIP_L14_336!r}")
        if ip.get("image_dim_out", clip.hidden_size) != clip.hidden_size:
            raise ConfigError(f"{source}: img_processor.image_dim_out {ip.get('image_dim_out')!r} != CLIP hidden "
                              f"size {clip.hidden_size}")
        if ip.get("num_img_tokens", clip.merged ** 2) != clip.merged ** 2:
            raise ConfigError(f"{source}: img_processor.num_img_tokens {ip.get('num_img_tokens')!r} != "
                              f"{clip.merged ** 2} (({clip.image_size} / {clip.patch_size} / 2)^2)")
        if ip.get("type_feature", "patch") != "patch":
            raise ConfigError(f"{source}: img_processor.type_feature {ip.get('type_feature')!r} is not 'patch'")
        kwargs = {"layer_idx": ip.get("layer_idx", -2), "model_name": ip.get("model_name", CLIP_L14_336)}
        if num_crops is not None:
            kwargs["num_crops"] = num_crops
        return cls(text=text, clip=clip, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Phi3VConfig:
        """config.json plus preprocessor_config.json's num_crops (when the file is there)."""
        folder = Path(folder)
        d = _read_json(folder / "config.json")
        num_crops = None
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            num_crops = _read_json(pre).get("num_crops")
        return cls.from_hf_dict(d, source=str(folder / "config.json"), num_crops=num_crops)


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > 16 * 2**20:
            raise ConfigError(f"{path}: larger than 16 MiB")
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return d


# The released shape: the language model is phi-3.5-mini's (LongRoPE 128k).
# https://huggingface.co/microsoft/Phi-3.5-vision-instruct/blob/main/config.json, preprocessor_config.json
# The preset's LongRoPE factors are phi-3.5-mini's (not checked against that config.json here: a checkpoint's own
# config.json always brings its factors; the preset fixes the shape, for `expected_shapes` and random models).
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "phi-3.5-vision": dict(text=dict(PRESETS["phi-3.5-mini"], eos_token_id=2, pad_token_id=32000),
                           clip={}, num_crops=4),
    # tests: the tiny language model, a 3-layer CLIP on 56 px crops of 14 px patches (2x2 merged positions each)
    "tiny-vision": dict(text=dict(PRESETS["tiny"], sliding_window=262144, chat_format="phi3.5"),
                        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=56, patch_size=14), num_crops=4),
}


def vision_preset(name: str) -> Phi3VConfig:
    if name not in VISION_PRESETS:
        raise ConfigError(f"{name!r} is not a vision preset; choose from {sorted(VISION_PRESETS)}")
    p = VISION_PRESETS[name]
    return Phi3VConfig(text=Phi3Config(**p["text"], name=name), clip=CLIPVisionConfig(**p["clip"]),
                       num_crops=p["num_crops"])


# ---- the CLIP tower (names as transformers' CLIPVisionModel) -------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.grid ** 2 + 1, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, C), row-major patches
        cls = self.class_embedding.expand(B, 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + grid*grid, C)


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def hidden_state(self, pixel_values: torch.Tensor, layers: int) -> torch.Tensor:
        """transformers' `hidden_states[layers]`: the output of the first `layers` encoder layers (0: the
        embeddings after pre_layrnorm). (B, 1 + grid*grid, C)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:layers]:
            x = layer(x)
        return x


class CLIPVisionModel(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(c)


# ---- image embedding: features -> HD layout with separators -> projector -------------------------------------------

class Phi3ImageEmbedding(nn.Module):
    """`model.vision_embed_tokens`: pixel values of HD crops -> one (num_tokens, hidden) block per image."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.config = config
        c4 = 4 * config.image_dim_out
        h = config.text.hidden_size
        self.img_processor = CLIPVisionModel(config.clip)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, c4))  # between the sub-images and the global image
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, c4))  # at the end of every row
        self.img_projection = nn.Sequential(nn.Linear(c4, h), nn.GELU(), nn.Linear(h, h))

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) crops -> (N, grid*grid, C): the chosen hidden state without the CLS position."""
        x = self.img_processor.vision_model.hidden_state(pixel_values, self.config.layers_run)
        return x[:, 1:]

    def merge_2x2(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(rows*cols, g*g, C) tile features, row-major -> (rows*g/2, cols*g/2, 4C), one grid for the image."""
        N, L, C = features.shape
        g = self.config.clip.grid
        assert L == g * g and N == rows * cols
        m = g // 2
        x = features.reshape(N, m, 2, m, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(N, m, m, 4 * C)  # 2x2 -> channels
        x = x.reshape(rows, cols, m, m, 4 * C).permute(0, 2, 1, 3, 4)  # (rows, m, cols, m, 4C)
        return x.reshape(rows * m, cols * m, 4 * C)

    def with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """(H, W, 4C) -> (H * (W + 1), 4C): sub_GN after every row."""
        H, W, C4 = grid.shape
        sep = self.sub_GN.reshape(1, 1, C4).expand(H, 1, C4).to(grid.dtype)
        return torch.cat([grid, sep], dim=1).reshape(H * (W + 1), C4)

    def forward(self, pixel_values: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """pixel_values (n_images, num_crops + 1, 3, S, S), image_sizes [(h, w)] of the HD images ->
        [(num_tokens_i, hidden)] per image, in the projector's dtype."""
        n, crops1 = pixel_values.shape[:2]
        S = self.config.clip.image_size
        dtype = self.img_projection[0].weight.dtype
        out = []
        for i in range(n):
            h, w = image_sizes[i]
            rows, cols = int(h) // S, int(w) // S
            if not 1 <= rows * cols <= crops1 - 1:
                raise ImageError(f"image {i + 1}: HD size {h}x{w} needs {rows * cols} crops but the pixel values hold "
                                 f"{crops1 - 1}")
            feats = self.patch_features(pixel_values[i, :1 + rows * cols])  # padding crops are never encoded
            glb = self.with_row_separators(self.merge_2x2(feats[:1], 1, 1))
            sub = self.with_row_separators(self.merge_2x2(feats[1:], rows, cols))
            tokens = torch.cat([sub, self.glb_GN.reshape(1, -1).to(sub.dtype), glb], dim=0)  # "sub_glb" order
            out.append(self.img_projection(tokens.to(dtype)))  # (num_tokens, hidden)
        return out


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi3ForCausalLM with `model.vision_embed_tokens`; `self.config` is the language model's Phi3Config (so the
    text engine runs it unchanged) and `self.vision_config` the whole Phi3VConfig."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config.text)
        self.vision_config = config
        self.model.vision_embed_tokens = Phi3ImageEmbedding(config)

    def preprocess(self, image, *, allowed_dir=None):
        """One image (path, data URL, bytes, PIL) -> `pocketlm.image.ProcessedImage` for this model."""
        from pocketlm.image import preprocess
        c = self.vision_config
        return preprocess(image, num_crops=c.num_crops, crop=c.clip.image_size, patch=c.clip.patch_size,
                          allowed_dir=allowed_dir)

    @torch.inference_mode()
    def encode_images(self, images: Sequence) -> list[torch.Tensor]:
        """ProcessedImage list -> [(num_tokens, hidden)], one forward of the tower per image."""
        emb = self.model.vision_embed_tokens
        device = emb.glb_GN.device
        out = []
        for im in images:
            px = im.pixel_values.to(device, emb.img_processor.vision_model.embeddings.patch_embedding.weight.dtype)
            feats = emb(px[None], [im.image_size])[0]
            assert feats.shape[0] == im.num_tokens, (feats.shape, im.num_tokens)
            out.append(feats)
        return out

    def embed_with_images(self, input_ids: torch.Tensor, image_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """input_ids (1, T) with image k's positions marked -k (as the reference) -> inputs_embeds (1, T, hidden):
        the token embeddings with the image features written at the marked positions, images in order."""
        marked = input_ids < 0
        x = self.model.embed_tokens(input_ids.clamp_min(0))  # (1, T, hidden)
        feats = torch.cat(list(image_features), dim=0) if image_features else x.new_zeros(0, x.shape[-1])
        if int(marked.sum()) != feats.shape[0]:
            raise GenerationError(f"the prompt has {int(marked.sum())} image positions but the images give "
                                  f"{feats.shape[0]} feature vectors")
        x = x.clone()
        x[marked] = feats.to(x.dtype)
        return x

    def forward_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                            image_sizes: Sequence[tuple[int, int]] = (), **kwargs) -> torch.Tensor:
        """The reference's call: `input_ids` (1, T) with image k's positions marked -k, pixel_values
        (n_images, num_crops + 1, 3, S, S) -> logits (1, T, vocab)."""
        feats = self.model.vision_embed_tokens(pixel_values, image_sizes) if pixel_values is not None else []
        x = self.embed_with_images(input_ids, feats)
        return self(input_ids.clamp_min(0), inputs_embeds=x, **kwargs)


# ---- weights -------------------------------------------------------------------------------------------------------

def _meta_model(config: Phi3VConfig) -> Phi3VForCausalLM:
    with torch.device("meta"):
        return Phi3VForCausalLM(config)


def expected_shapes(config: Phi3VConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a phi-3.5-vision checkpoint with its shape."""
    model = _meta_model(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if config.text.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def empty_model(config: Phi3VConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> Phi3VForCausalLM:
    with torch.device("meta"):
        model = Phi3VForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    model.rotary_emb = type(model.rotary_emb)(config.text).to(device)  # non-persistent tables, lost on meta
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def init_weights(model: Phi3VForCausalLM, seed: int = 0) -> Phi3VForCausalLM:
    """Seeded random weights: the language model as `hf.init_weights`; in the vision part N(0, 0.02) for
    everything but LayerNorm weights (ones) and the separators (N(0, 1), so that tests see them)."""
    from pocketlm.formats import hf
    hf.init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.model.vision_embed_tokens.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.02)
        for name in ("glb_GN", "sub_GN"):
            p = getattr(model.model.vision_embed_tokens, name)
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def load(spec: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         seed: int = 0, quantize: str | None = None) -> Phi3VForCausalLM:
    """A vision preset (random weights) or a phi3_v checkpoint folder (or a .safetensors file inside one).

    With `quantize` (a `pocketlm.api.QUANTIZE_SCHEMES` scheme), the language model's linears and embedding are
    quantized after loading and run on the CPU kernels, computing in float32 unless `dtype` says otherwise; the
    image tower and projector stay float (the whole float model is held once while loading)."""
    if quantize is not None:
        model = load(spec, dtype=dtype if dtype is not None else "float32", device=device, seed=seed)
        return quantize_language_model(model, quantize)
    from pocketlm.formats import hf
    from pocketlm.formats.safetensors_io import CheckpointReader
    spec_s = os.fspath(spec)
    if spec_s in VISION_PRESETS and not Path(spec_s).exists():
        config = vision_preset(spec_s)
        return init_weights(empty_model(config, hf.resolve_dtype(dtype, config.text), device), seed)
    path = Path(spec_s)
    folder = path.parent if path.is_file() else path
    config = Phi3VConfig.from_folder(folder)
    config = replace(config, text=config.text.replace(
        chat_format=hf.chat_format_of(folder, default="phi3.5")))
    target = hf.resolve_dtype(dtype, config.text)
    expected = expected_shapes(config)
    with CheckpointReader(path) as reader:
        names = set(reader.keys())
        ignorable = {n for n in names if n.endswith("embeddings.position_ids") or ".vision_embed_tokens.wte." in n}
        if config.text.tie_word_embeddings:
            ignorable.add("lm_head.weight")
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected) - ignorable)
        bad = [f"{n} has shape {tuple(reader.shape(n))}, expected {s}" for n, s in expected.items()
               if n in names and tuple(reader.shape(n)) != s]
        if missing or extra or bad:
            raise WeightFormatError(f"{path}: checkpoint does not match config.json: "
                                    + "; ".join(filter(None, [
                                        f"missing {len(missing)} tensors: {missing[:6]}" if missing else "",
                                        f"unexpected {len(extra)} tensors: {extra[:6]}" if extra else "",
                                        *bad[:6]])))
        model = empty_model(config, target, device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in expected:
                params[n].copy_(reader.get(n))
    return model


def quantize_language_model(model: Phi3VForCausalLM, scheme: str) -> Phi3VForCausalLM:
    """Quantize the language model in place (`quant.linear.quantize_model`); the vision part stays float."""
    from pocketlm.quant.linear import quantize_model
    tower = model.model.vision_embed_tokens
    del model.model.vision_embed_tokens  # out of quantize_model's reach
    try:
        quantize_model(model, scheme)
    finally:
        model.model.vision_embed_tokens = tower
    return model


def save(model: Phi3VForCausalLM, folder: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
         tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """config.json (model_type phi3_v), preprocessor_config.json, generation_config.json and safetensors in the
    released layout."""
    from pocketlm.formats import hf
    from pocketlm.formats.safetensors_io import write_checkpoint
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.vision_config
    target = hf.resolve_dtype(dtype, config.text) if dtype is not None else next(model.parameters()).dtype
    dtype_name = {v: k for k, v in hf.DTYPES.items()}[target]
    d = replace(config, text=config.text.replace(torch_dtype=dtype_name)).to_hf_dict()
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(config.preprocessor_dict(), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(hf.GENERATION_CONFIG, indent=2) + "\n")
    params = dict(model.named_parameters())
    write_checkpoint(folder, ((n, params[n].detach().to("cpu", target)) for n in expected_shapes(config)),
                     max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    if tokenizer is not None:
        from pocketlm.chat import TEMPLATES
        tokenizer.save_pretrained(folder, chat_template=TEMPLATES[config.text.chat_format].replace("\\n", "\n"))
    return folder


def describe(spec) -> dict[str, Any]:
    """`pocketlm info` for a vision preset or checkpoint folder: both halves' shapes and parameter counts."""
    import math as _math
    s = os.fspath(spec)
    p = Path(s)
    config = vision_preset(s) if s in VISION_PRESETS and not p.exists() else \
        Phi3VConfig.from_folder(p if p.is_dir() else p.parent)
    shapes = expected_shapes(config)
    n_vision = sum(_math.prod(v) for k, v in shapes.items() if ".vision_embed_tokens." in k)
    c, t = config.clip, config.text
    return {"model": s, "architecture": "Phi3VForCausalLM (phi3_v)",
            "parameters": sum(_math.prod(v) for v in shapes.values()), "vision_parameters": n_vision,
            "language_model": f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, heads "
                              f"{t.num_attention_heads}/{t.num_key_value_heads}, context {t.max_position_embeddings}",
            "image_tower": f"CLIP {c.num_hidden_layers} layers (runs {config.layers_run}), hidden {c.hidden_size}, "
                           f"{c.image_size} px crops of {c.patch_size} px patches",
            "num_crops": config.num_crops,
            "tokens_per_image": f"{(1 + 1) * c.merged ** 2 + 1 + 2 * c.merged} (one tile) to "
                                f"{(config.num_crops + 1) * c.merged ** 2 + 1 + (config.num_crops + 1) * c.merged} "
                                f"({config.num_crops} tiles in a column)"}


def is_vision_model(spec) -> bool:
    """True for a vision preset name or a checkpoint folder (or file in one) whose config.json says phi3_v."""
    if spec is None:
        return False
    s = os.fspath(spec)
    p = Path(s)
    if not p.exists():
        return s in VISION_PRESETS
    folder = p if p.is_dir() else p.parent
    cfg = folder / "config.json"
    if p.suffix == ".gguf" or not cfg.is_file():
        return False
    try:  # a hostile or broken file is not a vision model here: the text path's reader names what is wrong
        if cfg.stat().st_size > 16 * 2**20:
            return False
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "phi3_v"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return False


# ---- prompts with images -------------------------------------------------------------------------------------------

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def split_image_parts(messages: Any) -> tuple[list[dict], list[Any]]:
    """OpenAI-style messages whose content may hold `{"type": "image_url", "image_url": {"url": ...}}` parts ->
    (messages with text content, where each image became `<|image_N|>\\n` at its place, [image sources])."""
    from pocketlm.errors import ChatFormatError
    if not isinstance(messages, list):
        return messages, []
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        text = []
        for j, part in enumerate(m["content"]):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ChatFormatError(f"messages[{i}].content[{j}].image_url must be {{'url': str}}, got "
                                          f"{part.get('image_url')!r:.80}")
                if m.get("role") != "user":
                    raise ChatFormatError(f"messages[{i}]: images are accepted in user messages only, not "
                                          f"{m.get('role')!r}")
                images.append(url)
                text.append(f"<|image_{len(images)}|>\n")
            else:
                raise ChatFormatError(f"messages[{i}].content[{j}] is neither a text nor an image_url part: "
                                      f"{part!r:.80}")
        out.append({**m, "content": "".join(text)})
    return out, images


def prompt_ids(tokenizer, prompt_or_messages, num_tokens: Sequence[int], *,
               chat_format: str | None = None) -> tuple[list[int], list[int]]:
    """(ids with image k's positions marked -k, default stop ids). The prompt (raw text or messages with text
    content) names the images as `<|image_1|>` .. `<|image_n|>`, each once and in order."""
    from pocketlm import chat
    if isinstance(prompt_or_messages, str):
        parts: list = [prompt_or_messages]
        stops = [tokenizer.eos_id]
    else:
        parts = chat.render_parts(prompt_or_messages, tokenizer, add_generation_prompt=True, format=chat_format)
        stops = list(chat.stop_token_ids(tokenizer))
        if tokenizer.eos_id not in stops:
            stops.append(tokenizer.eos_id)
    chunks: list[list] = [[]]
    tags: list[int] = []
    for part in parts:
        if not isinstance(part, str):
            chunks[-1].append(part)
            continue
        pos = 0
        for m in IMAGE_TAG.finditer(part):
            chunks[-1].append(part[pos:m.start()])
            tags.append(int(m.group(1)) if len(m.group(1)) < 7 else 10 ** 7)
            chunks.append([])
            pos = m.end()
        chunks[-1].append(part[pos:])
    if tags != list(range(1, len(num_tokens) + 1)):
        raise GenerationError(f"the prompt names images {tags[:10]} but {len(num_tokens)} image(s) were given: "
                              f"name each as <|image_1|> .. <|image_{len(num_tokens)}|>, once and in order")
    bos = [tokenizer.bos_id] if tokenizer.add_bos_default and tokenizer.bos_id is not None else []
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        ids += bos + tokenizer.encode_parts([p for p in chunk if p != ""])  # the processor's tokenizer(chunk)
        if i < len(tags):
            ids += [-tags[i]] * num_tokens[tags[i] - 1]
    return ids, stops


def with_image_tags(prompt: str, n_images: int) -> str:
    """`prompt` with `<|image_1|>\\n .. <|image_n|>\\n` in front, unless it names its images itself."""
    if n_images == 0 or IMAGE_TAG.search(prompt):
        return prompt
    return "".join(f"<|image_{k}|>\n" for k in range(1, n_images + 1)) + prompt


# ---- generation ----------------------------------------------------------------------------------------------------

@dataclass
class ImageStats:
    """What encoding the images cost (for `-v`)."""

    images: int = 0
    image_tokens: int = 0
    preprocess_seconds: float = 0.0
    encode_seconds: float = 0.0


def _generate_ids(model: Phi3VForCausalLM, ids: list[int], features: list[torch.Tensor], params, stops: frozenset,
                  vocab_limit: int, chunk_size: int) -> Iterator[int]:
    from pocketlm.engine import generate as g
    n_ctx = model.config.max_position_embeddings
    marked = torch.tensor([ids], dtype=torch.long)
    sequence = [max(i, 0) for i in ids]  # id 0 at image positions, as the reference embeds them
    budget = min(params.max_tokens, n_ctx - len(sequence))
    cache = model.make_cache(1, min(len(sequence) + params.max_tokens, n_ctx))
    generator = None if params.greedy else g.make_generator(params, g._device(model))

    @torch.inference_mode()
    def prefill(seq: list[int]) -> torch.Tensor:
        device = g._device(model)
        full = torch.cat([marked, torch.tensor([seq[marked.shape[1]:]], dtype=torch.long)], dim=1).to(device)
        x = model.embed_with_images(full, features)  # (1, T, hidden)
        tokens = full.clamp_min(0)
        mode = model.rope_mode_for(len(seq))
        for start in range(0, len(seq), chunk_size):
            logits = model(tokens[:, start:start + chunk_size], cache, last_only=True, rope_mode=mode,
                           inputs_embeds=x[:, start:start + chunk_size])
        return logits[0, -1]

    logits = prefill(sequence)
    for step in range(budget):
        token = g._pick(logits, params, generator, sequence, vocab_limit)
        sequence.append(token)
        yield token
        if token in stops or step == budget - 1:
            return
        if cache.rope_mode != model.rope_mode_for(len(sequence)):
            cache.reset()  # the LongRoPE switch: recompute everything, images included
            logits = prefill(sequence)
        else:
            logits = g.decode_one_token(model, cache, token)


def stream_events(model: Phi3VForCausalLM, tokenizer, prompt_or_messages, images: Sequence = (), *,
                  chat_format: str | None = None, allowed_dir=None, stats: ImageStats | None = None,
                  prefill_chunk_size: int = 512, params=None, **sampling):
    """As `engine.generate.stream_events`, with images: `images` are sources for `<|image_1|>` .. (paths, data
    URLs, bytes, PIL images); OpenAI `image_url` parts in the messages are added after them. A prompt without
    tags gets them in front of the (last) user message. `stats` is filled with the image timings."""
    from pocketlm.engine import generate as g
    if not isinstance(model, Phi3VForCausalLM):
        raise GenerationError("images need a vision model (phi-3.5-vision); this model reads text only")
    stats = stats if stats is not None else ImageStats()
    params = g.make_params(params, **sampling)
    messages, part_images = split_image_parts(prompt_or_messages)
    sources = list(images) + part_images
    if images and not isinstance(messages, str):
        tagged = sum(len(IMAGE_TAG.findall(m["content"])) for m in messages
                     if isinstance(m, dict) and isinstance(m.get("content"), str))
        if tagged == len(part_images):  # the given images are not named in the text: in front of the last turn
            messages = _tag_last_user(messages, len(images), len(part_images))
    elif isinstance(messages, str):
        messages = with_image_tags(messages, len(sources))
    t0 = time.perf_counter()
    processed = [model.preprocess(s, allowed_dir=allowed_dir) for s in sources]
    t1 = time.perf_counter()
    features = model.encode_images(processed)
    t2 = time.perf_counter()
    stats.images, stats.image_tokens = len(processed), sum(p.num_tokens for p in processed)
    stats.preprocess_seconds, stats.encode_seconds = t1 - t0, t2 - t1
    ids, default_stops = prompt_ids(tokenizer, messages, [p.num_tokens for p in processed], chat_format=chat_format)
    n_ctx = model.config.max_position_embeddings
    if len(ids) >= n_ctx:
        raise GenerationError(f"the prompt with its images has {len(ids)} positions but the context holds {n_ctx}")
    bad = [i for i in ids if i >= model.config.vocab_size]
    if bad:
        raise GenerationError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {model.config.vocab_size})")
    stops = frozenset(default_stops) | frozenset(params.stop_token_ids)
    t_start = time.perf_counter()
    token_ids = _generate_ids(model, ids, features, params, stops, min(len(tokenizer), model.config.vocab_size),
                              prefill_chunk_size)
    return g._text_events(token_ids, tokenizer, params, stops, len(ids), t_start)


def _tag_last_user(messages: list, n_front: int, n_parts: int) -> list:
    """Put `<|image_1|>` .. `<|image_{n_front}|>` in front of the last user message, renumbering the tags that
    image parts got (they come after)."""
    out = [dict(m) if isinstance(m, dict) else m for m in messages]
    if n_parts:
        for m in out:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                m["content"] = IMAGE_TAG.sub(lambda t: f"<|image_{int(t.group(1)) + n_front}|>", m["content"])
    for m in reversed(out):
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] = "".join(f"<|image_{k}|>\n" for k in range(1, n_front + 1)) + m["content"]
            return out
    raise GenerationError("images were given but the conversation has no user message to attach them to")


def print_image_stats(stats: ImageStats, file=None) -> None:
    import sys
    file = file if file is not None else sys.stderr
    print(f"image count:          {stats.images} image(s), {stats.image_tokens} position(s)\n"
          f"image preprocess:     {stats.preprocess_seconds * 1000:.1f} ms\n"
          f"image encode:         {stats.encode_seconds * 1000:.1f} ms", file=file)


def run_with_images(model, tokenizer, prompt, args, chat_format: str | None, sampling: dict, print_stats) -> int:
    """`pocketlm run MODEL --image PATH ... PROMPT`: stream the reply; with -v, the image timings too."""
    import sys
    from pocketlm.engine.generate import GenerationResult
    if getattr(args, "json_schema", None):
        raise GenerationError("--json-schema cannot be combined with --image yet")
    stats = ImageStats()
    result = None
    for event in stream_events(model, tokenizer, prompt, list(args.image), chat_format=chat_format, stats=stats,
                               **sampling):
        if isinstance(event, GenerationResult):
            result = event
        else:
            sys.stdout.write(event)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print_image_stats(stats)
        print_stats(result)
    return 0


def attach_image(model, path: str, file=None):
    """`/image PATH` in `pocketlm chat`: the decoded image (checked now, so a bad file is reported at once)."""
    from pocketlm.image import load_image
    if not isinstance(model, Phi3VForCausalLM):
        raise ImageError("/image: this model reads text only; images need a vision model (phi-3.5-vision)")
    if not path:
        raise ImageError("usage: /image PATH")
    im = load_image(path.strip().strip("'\""))
    if file is not None:
        print(f"Added image {path} ({im.width}x{im.height}); it goes with your next message.", file=file)
    return im


def generate_full(model, tokenizer, prompt_or_messages, images: Sequence = (), **kwargs):
    """Generate to the end; the `GenerationResult`."""
    from pocketlm.engine.generate import GenerationResult
    for event in stream_events(model, tokenizer, prompt_or_messages, images, **kwargs):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("stream_events always ends with a GenerationResult")
