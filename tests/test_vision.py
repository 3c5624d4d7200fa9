"""phi-3.5-vision: config and checkpoint layout, image decoding and preprocessing against the released processor's
maths, the CLIP tower against transformers' CLIPVisionModel, and the image embedding + language model logits
against an independent reference written here from the published `image_embedding_phi3_v.py`.

All on the tiny random `tiny-vision` preset (56 px crops, 3 CLIP layers), fp32 on the CPU, except the
preprocessing parity, which runs the real 336 px maths on small pictures.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from pocketlm import image as imagelib
from pocketlm import vision
from pocketlm.errors import ConfigError, GenerationError, ImageError, WeightFormatError
from pocketlm.tokenizer import Tokenizer

Image = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vision.load("tiny-vision", seed=3)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def picture(w, h, seed=0, mode="RGB"):
    rs = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray((rs.rand(h, w, channels) * 255).astype("uint8"), mode)


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---- config and checkpoint layout ----------------------------------------------------------------------------------

def test_released_shape_and_names():
    config = vision.vision_preset("phi-3.5-vision")
    shapes = vision.expected_shapes(config)
    p = "model.vision_embed_tokens."
    clip = p + "img_processor.vision_model."
    assert shapes[p + "glb_GN"] == (1, 1, 4096)
    assert shapes[p + "sub_GN"] == (1, 1, 1, 4096)
    assert shapes[p + "img_projection.0.weight"] == (3072, 4096)
    assert shapes[p + "img_projection.2.weight"] == (3072, 3072)
    assert shapes[clip + "embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes[clip + "embeddings.position_embedding.weight"] == (577, 1024)  # 24*24 + CLS
    assert shapes[clip + "encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert clip + "post_layernorm.weight" in shapes and clip + "pre_layrnorm.bias" in shapes
    assert not any(".wte." in n for n in shapes)
    assert shapes["model.embed_tokens.weight"] == (32064, 3072) and shapes["lm_head.weight"] == (32064, 3072)
    # 4.15B parameters, as the model card says (phi-3.5-mini 3.82B + CLIP ViT-L/14 0.30B + projector 0.02B)
    assert sum(math.prod(s) for s in shapes.values()) == 4_146_621_440
    d = config.to_hf_dict()
    assert d["model_type"] == "phi3_v" and d["architectures"] == ["Phi3VForCausalLM"]
    assert d["img_processor"]["num_img_tokens"] == 144 and d["img_processor"]["image_dim_out"] == 1024
    assert "vision_config" not in d["img_processor"]  # the released tower is named, not spelled out
    back = vision.Phi3VConfig.from_hf_dict(d, num_crops=4)
    assert back.clip == config.clip and back.num_crops == 4 and back.to_hf_dict() == d
    assert config.layers_run == 23  # hidden_states[-2]


def test_config_errors():
    d = vision.vision_preset("tiny-vision").to_hf_dict()
    with pytest.raises(ConfigError, match="hd_transform_order"):
        vision.Phi3VConfig.from_hf_dict({**d, "embd_layer": {**d["embd_layer"], "hd_transform_order": "glb_sub"}})
    with pytest.raises(ConfigError, match="num_img_tokens"):
        vision.Phi3VConfig.from_hf_dict({**d, "img_processor": {**d["img_processor"], "num_img_tokens": 5}})
    with pytest.raises(ConfigError, match="model_type"):
        vision.Phi3VConfig.from_hf_dict({**d, "model_type": "phi3"})
    with pytest.raises(ConfigError, match="image_size 50"):
        vision.CLIPVisionConfig(image_size=50, patch_size=14)


def test_checkpoint_round_trip(model, tmp_path, tok):
    folder = vision.save(model, tmp_path / "m", tokenizer=tok)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert json.loads((folder / "preprocessor_config.json").read_text())["num_crops"] == 4
    assert vision.is_vision_model(folder) and not vision.is_vision_model(tmp_path)
    loaded = vision.load(folder)
    assert loaded.vision_config == model.vision_config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a missing separator is named
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.vision_embed_tokens.sub_GN"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightFormatError, match="sub_GN"):
        vision.load(folder)


def test_pocketlm_load_dispatches_to_vision(model, tmp_path):
    import pocketlm
    m = pocketlm.load("tiny-vision")
    assert isinstance(m, vision.Phi3VForCausalLM)


# ---- preprocessing against the released processor's maths ----------------------------------------------------------

def reference_processor(im, num_crops):
    """`Phi3VImageProcessor.preprocess` as published (processing_phi3_v.py), with torchvision's PIL paths
    spelled out: F.resize(img, [h, w]) is img.resize((w, h), BILINEAR); F.pad(..., fill=white) is ImageOps.expand;
    ToTensor is uint8 / 255 in float32; Normalize is (x - mean) / std."""
    from PIL import ImageOps
    im = im.convert("RGB")
    width, height = im.size
    trans = False
    if width < height:
        im = im.transpose(Image.TRANSPOSE)
        trans = True
        width, height = im.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    im = im.resize((new_w, new_h), Image.BILINEAR)
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    im = ImageOps.expand(im, border=(0, top, 0, tar - new_h - top), fill=(255, 255, 255))
    if trans:
        im = im.transpose(Image.TRANSPOSE)
    arr = np.asarray(im).astype(np.float32) / np.float32(255)  # (H, W, 3)
    arr = (arr - MEAN) / STD
    hd = torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (3, H, W)
    h, w = hd.shape[1:]
    glob = torch.nn.functional.interpolate(hd[None].float(), size=(336, 336), mode="bicubic")
    crops = [hd[:, r * 336:(r + 1) * 336, c * 336:(c + 1) * 336] for r in range(h // 336) for c in range(w // 336)]
    out = torch.cat([glob, torch.stack(crops)], dim=0)
    if out.shape[0] < num_crops + 1:
        out = torch.cat([out, torch.zeros(num_crops + 1 - out.shape[0], 3, 336, 336)], dim=0)
    num_tokens = int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12)
    return out, (h, w), num_tokens


@pytest.mark.parametrize("w,h,num_crops", [(500, 300, 4), (300, 700, 4), (50, 40, 4), (336, 336, 1),
                                           (1000, 200, 16), (120, 500, 16)])
def test_preprocess_equals_reference_processor(w, h, num_crops):
    im = picture(w, h, seed=w + h)
    ours = imagelib.preprocess(png_bytes(im), num_crops=num_crops)
    ref_px, ref_size, ref_tokens = reference_processor(im, num_crops)
    assert ours.image_size == ref_size
    assert ours.num_tokens == ref_tokens
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref_px.shape == (num_crops + 1, 3, 336, 336)
    assert torch.equal(ours.pixel_values, ref_px)
    assert ours.source_size == (w, h)


def test_preprocess_sizes_and_token_counts():
    # 500x300 landscape, 4 crops: scale 2 (2 * ceil(2 / 1.667) = 4), 672x403 -> padded 672x672
    assert imagelib.hd_sizes(500, 300, 4) == ((672, 403), (672, 672))
    assert imagelib.num_image_tokens((672, 672)) == (4 + 1) * 144 + 1 + 3 * 12 == 757
    # one crop: 336x336 -> (1+1)*144 + 1 + 2*12 = 313
    assert imagelib.num_image_tokens((336, 336)) == 313
    # portrait mirrors landscape
    assert imagelib.hd_sizes(300, 500, 4) == ((403, 672), (672, 672))


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (40, 30), (10, 200, 30, 0))  # fully transparent
    rgb = imagelib.load_image(png_bytes(im))
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255)


# ---- bad images ----------------------------------------------------------------------------------------------------

def _png_header(width, height):
    """A PNG signature, an IHDR chunk claiming width x height and an IDAT chunk of 64 compressed zero bytes."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))


def test_bad_images_raise_typed_errors(tmp_path):
    good = png_bytes(picture(64, 48))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        imagelib.decode_image(good[: len(good) // 2], source="half.png")
    with pytest.raises(ImageError, match="not an image"):
        imagelib.decode_image(b"hello, not a picture", source="hello.txt")
    with pytest.raises(ImageError, match="empty"):
        imagelib.decode_image(b"", source="nothing.png")
    with pytest.raises(ImageError, match="empty|cannot decode|not an image"):
        imagelib.decode_image(_png_header(0, 0), source="zero.png")
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels.*refused before decoding"):
        imagelib.decode_image(_png_header(8000, 8000), source="big.png")  # over our limit, under Pillow's
    with pytest.raises(ImageError, match="bomb.png: refused before decoding: a decompression bomb"):
        imagelib.decode_image(_png_header(1_000_000, 1_000_000), source="bomb.png")  # Pillow's own check
    with pytest.raises(ImageError, match="no such image file"):
        imagelib.load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="too thin"):
        imagelib.hd_sizes(10_000, 1, 16)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    """A real, valid image whose header exceeds the pixel limit: refused without decoding a single pixel."""
    data = png_bytes(Image.new("RGB", (300, 200), (0, 0, 0)))  # compresses to a few hundred bytes
    monkeypatch.setattr(imagelib, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    calls = []
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1))
    with pytest.raises(ImageError, match="300x200 = 60000 pixels"):
        imagelib.decode_image(data, source="bomb.png")
    assert calls == []


def test_data_urls_and_sources(tmp_path):
    im = picture(30, 20, seed=5)
    data = png_bytes(im)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert np.array_equal(np.asarray(imagelib.load_image(url)), np.asarray(im))
    (tmp_path / "a.png").write_bytes(data)
    assert np.array_equal(np.asarray(imagelib.load_image(str(tmp_path / "a.png"))), np.asarray(im))
    with pytest.raises(ImageError, match="invalid base64"):
        imagelib.load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="not an image"):
        imagelib.load_image("data:text/plain;base64," + base64.b64encode(b"hi").decode())
    with pytest.raises(ImageError, match="never fetched from the network"):
        imagelib.load_image("https://example.com/cat.png")
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "b.png").write_bytes(data)
    assert imagelib.load_image(str(inside / "b.png"), allowed_dir=inside).size == (30, 20)
    with pytest.raises(ImageError, match="outside the allowed image directory"):
        imagelib.load_image(str(inside / ".." / "a.png"), allowed_dir=inside)
    (inside / "link.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(ImageError, match="outside the allowed image directory"):
        imagelib.load_image(str(inside / "link.png"), allowed_dir=inside)


# ---- the CLIP tower against transformers ---------------------------------------------------------------------------

def hf_clip(model):
    c = model.vision_config.clip
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=c.layer_norm_eps, projection_dim=16)).eval()
    sd = model.model.vision_embed_tokens.img_processor.state_dict()  # the released names: vision_model.*
    if not any(k.startswith("vision_model.") for k in ref.state_dict()):  # transformers 5 dropped the prefix
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("embeddings.position_ids")]
    return ref


def test_clip_tower_matches_transformers(model):
    ref = hf_clip(model)
    px = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        hs = ref(px, output_hidden_states=True).hidden_states
        tower = model.model.vision_embed_tokens.img_processor.vision_model
        for k in range(len(hs)):
            torch.testing.assert_close(tower.hidden_state(px, k), hs[k], atol=1e-4, rtol=0)
        feats = model.model.vision_embed_tokens.patch_features(px)
    torch.testing.assert_close(feats, hs[-2][:, 1:], atol=1e-4, rtol=0)  # layer -2, CLS dropped
    assert not torch.allclose(hs[-1][:, 1:], hs[-2][:, 1:], atol=1e-3)  # the choice of layer is visible


# ---- image embedding + logits against an independent reference -----------------------------------------------------

def reference_image_embeds(model, pixel_values, image_sizes):
    """`Phi3ImageEmbedding.hd_feature_transform` from the published code, generalised from 24x24 patches to
    g x g, with the 2x2 merge written position by position."""
    emb = model.model.vision_embed_tokens
    ref = hf_clip(model)
    S = model.vision_config.clip.image_size
    n, crops1 = pixel_values.shape[:2]
    with torch.no_grad():
        feats = ref(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = feats.reshape(n, crops1, feats.shape[1], feats.shape[2])  # (n, crops+1, g*g, C)
        g = int(math.isqrt(feats.shape[2]))
        m = g // 2
        sub_gn, glb_gn = emb.sub_GN.reshape(-1), emb.glb_GN.reshape(-1)

        def hd_grid(tiles, rows, cols):  # tiles (rows*cols, g*g, C) -> rows of merged vectors, sub_GN per row
            out = []
            for R in range(rows * m):
                for Ccol in range(cols * m):
                    t = (R // m) * cols + (Ccol // m)
                    i, j = R % m, Ccol % m
                    f = tiles[t].reshape(g, g, -1)
                    out.append(torch.cat([f[2 * i, 2 * j], f[2 * i, 2 * j + 1], f[2 * i + 1, 2 * j],
                                          f[2 * i + 1, 2 * j + 1]]))
                out.append(sub_gn)
            return out

        all_rows = []
        for k, (h, w) in enumerate(image_sizes):
            rows, cols = h // S, w // S
            all_rows += hd_grid(feats[k, 1:1 + rows * cols], rows, cols) + [glb_gn] + hd_grid(feats[k, :1], 1, 1)
        x = torch.stack(all_rows)
        p = emb.img_projection
        x = torch.nn.functional.linear(x, p[0].weight, p[0].bias)
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        return torch.nn.functional.linear(x, p[2].weight, p[2].bias)


def reference_input_ids(tok, text, num_tokens):
    """`Phi3VProcessor._convert_images_texts_to_inputs`: split at the tags, tokenizer(chunk) (transformers' fast
    tokenizer over the same vocabulary: BOS and the leading "▁" on each chunk), each tag -> [-id] *
    num_img_tokens[id - 1]."""
    import re

    import tokenizers
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok.to_tokenizer_json()),
                                              bos_token="<s>", eos_token="<|endoftext|>")
    chunks = [hf(c).input_ids for c in re.split(r"<\|image_\d+\|>", text)]
    assert all(c[0] == tok.bos_id for c in chunks)
    tags = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(r"<\|image_\d+\|>", text)]
    pads = [[-t] * num_tokens[t - 1] for t in tags] + [[]]
    return [i for chunk, pad in zip(chunks, pads) for i in chunk + pad]


def hf_lm(model):
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**model.config.to_hf_dict())).eval()
    sd = {k: v for k, v in model.state_dict().items() if "vision_embed_tokens" not in k}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    return ref


@pytest.mark.parametrize("sizes", [[(150, 90)], [(60, 140), (200, 50)]], ids=["one-image", "two-images"])
def test_image_embedding_and_logits_match_reference(model, tok, sizes):
    images = [picture(w, h, seed=i + 7) for i, (w, h) in enumerate(sizes)]
    processed = [model.preprocess(im) for im in images]
    pixel_values = torch.stack([p.pixel_values for p in processed])
    image_sizes = [p.image_size for p in processed]
    ours = model.model.vision_embed_tokens(pixel_values, image_sizes)
    ref = reference_image_embeds(model, pixel_values, image_sizes)
    assert sum(p.num_tokens for p in processed) == ref.shape[0] == sum(o.shape[0] for o in ours)
    torch.testing.assert_close(torch.cat(ours), ref, atol=1e-4, rtol=0)

    tags = "".join(f"<|image_{k + 1}|>\n" for k in range(len(images)))
    messages = [{"role": "user", "content": tags + "What is in these pictures?"}]
    ids, _ = vision.prompt_ids(tok, messages, [p.num_tokens for p in processed], chat_format="phi3.5")
    text = f"<|user|>\n{tags}What is in these pictures?<|end|>\n<|assistant|>\n"
    assert ids == reference_input_ids(tok, text, [p.num_tokens for p in processed])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model.forward_with_images(input_ids, pixel_values, image_sizes)
        lm = hf_lm(model)
        x = lm.model.embed_tokens(input_ids.clamp_min(0))
        x = x.index_put(torch.nonzero(input_ids < 0, as_tuple=True), ref)
        ref_logits = lm(inputs_embeds=x).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    # the images matter: other pixels give other logits
    with torch.no_grad():
        other = model.forward_with_images(input_ids, torch.flip(pixel_values, dims=[-1]), image_sizes)
    assert (other - logits).abs().max() > 1e-3


def test_prompt_tag_errors(tok):
    with pytest.raises(GenerationError, match=r"names images \[2\] but 1 image"):
        vision.prompt_ids(tok, "<|image_2|> hi", [5])
    with pytest.raises(GenerationError, match=r"names images \[\] but 1 image"):
        vision.prompt_ids(tok, "no tag", [5])
    with pytest.raises(GenerationError, match=r"names images \[1, 1\]"):
        vision.prompt_ids(tok, "<|image_1|><|image_1|>", [5])
    ids, _ = vision.prompt_ids(tok, "<|image_1|>\nhi", [3])
    assert ids[:4] == [tok.bos_id, -1, -1, -1] and ids[4] == tok.bos_id


# ---- generation ----------------------------------------------------------------------------------------------------

def test_generation_with_cache_equals_full_forwards(model, tok):
    """Greedy tokens from the cached loop (prefill with image features, then one token at a time) equal argmax
    over full no-cache forwards of the reference-style call."""
    im = picture(120, 80, seed=11)
    stats = vision.ImageStats()
    result = vision.generate_full(model, tok, [{"role": "user", "content": "Describe."}], [im], max_tokens=4,
                                  temperature=0.0, stats=stats)
    processed = model.preprocess(im)
    assert stats.images == 1 and stats.image_tokens == processed.num_tokens and stats.encode_seconds > 0
    ids, _ = vision.prompt_ids(tok, [{"role": "user", "content": "<|image_1|>\nDescribe."}],
                               [processed.num_tokens])
    assert result.prompt_tokens == len(ids)
    seq = list(ids)
    expected = []
    with torch.no_grad():
        for _ in range(len(result.token_ids)):
            logits = model.forward_with_images(torch.tensor([seq]), processed.pixel_values[None],
                                               [processed.image_size])
            nxt = int(logits[0, -1, :len(tok)].argmax())
            expected.append(nxt)
            seq.append(nxt)
    assert result.token_ids == expected


def test_image_url_parts_become_tags(model, tok):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(picture(40, 40))).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                             {"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is it?"}]}]
    out, images = vision.split_image_parts(messages)
    assert out[0]["content"] == "Look: <|image_1|>\nwhat is it?" and images == [url]
    r = vision.generate_full(model, tok, messages, max_tokens=2)
    assert r.completion_tokens >= 1
    with pytest.raises(GenerationError, match="vision model"):
        vision.stream_events(object(), tok, messages)


def test_quantize_keeps_the_tower_float(model):
    """--quantize: the language model's linears and embedding on the quantized kernels, the image tower and
    projector untouched (same features bit for bit), logits near the float model's."""
    import pocketlm
    from pocketlm.quant.linear import QuantizedLinear
    q = pocketlm.load("tiny-vision", quantize="q8_0", seed=3)
    assert isinstance(q.model.layers[0].self_attn.qkv_proj, QuantizedLinear) and isinstance(q.lm_head, QuantizedLinear)
    assert not any(isinstance(m, QuantizedLinear) for m in q.model.vision_embed_tokens.modules())
    p = model.preprocess(picture(100, 70, seed=21))
    fa, fb = model.encode_images([p]), q.encode_images([p])
    assert torch.equal(fa[0], fb[0])
    ids = torch.tensor([vision.prompt_ids(Tokenizer.default(), "<|image_1|>\nWhat is it?", [p.num_tokens])[0]])
    with torch.no_grad():
        a = model.forward_with_images(ids, p.pixel_values[None], [p.image_size])
        b = q.forward_with_images(ids, p.pixel_values[None], [p.image_size])
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # q8_0 rounding only


def test_info_describes_both_halves(tmp_path, capsys, model):
    from pocketlm import cli
    assert cli.main(["info", "phi-3.5-vision", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 4_146_621_440 and info["vision_parameters"] == 325_541_888  # CLIP 303M + projector
    assert info["tokens_per_image"].startswith("313 (one tile) to 781")
    folder = vision.save(model, tmp_path / "m")
    assert cli.main(["info", str(folder)]) == 0
    assert "Phi3VForCausalLM" in capsys.readouterr().out
