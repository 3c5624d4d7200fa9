"""Image input for phi-3.5-vision: safe decoding with Pillow, then the released processor's maths.

Decoding (`load_image`, `decode_image`): files, base64 `data:` URLs and raw bytes. The encoded size is capped
(MAX_IMAGE_BYTES), the pixel count is read from the header and refused above MAX_IMAGE_PIXELS *before* any pixel
is decoded (decompression bombs), and truncated files, 0x0 images and non-images raise `ImageError` naming the
source. Transparency is composited onto white, as transformers' `convert_to_rgb` does.

Preprocessing (`preprocess`), as `Phi3VImageProcessor` (microsoft/Phi-3.5-vision-instruct,
`processing_phi3_v.py`) defines it, for crops of `crop` pixels (336 for the released model):
1. HD transform: transpose a portrait image to landscape; the largest `scale` with
   `scale * ceil(scale / ratio) <= num_crops` (ratio = width / height); resize (Pillow bilinear) to width
   `scale * crop` and height `int(width / ratio)`; pad the height with white to a multiple of `crop`, centred
   (top = floor(pad / 2)); transpose back.
2. To float32 in [0, 1] (uint8 / 255), normalise with the OpenAI CLIP mean and std.
3. The global image: the whole HD image bicubic-resized (torch, align_corners=False) to crop x crop.
4. Crops: the HD image cut into (h / crop) x (w / crop) tiles, row by row; [global, tiles...] zero-padded to
   num_crops + 1 images: pixel_values (num_crops + 1, 3, crop, crop).
The number of image tokens: ((h/crop)(w/crop) + 1) * m^2 + 1 + (h/crop + 1) * m, with m = crop / patch / 2 (12
for 336 px crops of 14 px patches): m x (m+1) tokens per crop row block (2x2-merged patches plus one `sub_GN`
row separator), the same for the global image, and one `glb_GN` between them.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketlm.errors import ImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_BYTES = 32 * 2**20  # encoded file / data URL payload
MAX_IMAGE_PIXELS = 40_000_000  # width * height from the header, checked before decoding (a 6324 x 6324 image)


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower."""

    pixel_values: torch.Tensor  # (num_crops + 1, 3, crop, crop) float32: [global, tiles..., zero padding]
    image_size: tuple[int, int]  # (height, width) of the padded HD image, multiples of crop
    num_tokens: int  # positions the image takes in the prompt
    source_size: tuple[int, int]  # (width, height) as decoded

    @property
    def crops(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        c = self.pixel_values.shape[-1]
        return self.image_size[0] // c, self.image_size[1] // c


def _pil():
    try:
        from PIL import Image, ImageFile
    except ImportError as e:  # pragma: no cover - Pillow is a dependency of the vision extra
        raise ImageError("images need Pillow: pip install 'pocketlm[vision]'") from e
    return Image, ImageFile


def decode_image(data: bytes, source: str = "image"):
    """A fully decoded RGB `PIL.Image` from encoded bytes; `ImageError` naming `source` for anything bad."""
    Image, _ = _pil()
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"{source}: expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError(f"{source}: empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{source}: {len(data)} bytes, more than the limit of {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))  # reads the header only
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageError(f"{source}: the image is {width}x{height} pixels (empty)")
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{source}: the header says {width}x{height} = {width * height} pixels, more than "
                                 f"the limit of {MAX_IMAGE_PIXELS} (refused before decoding)")
            im.seek(0)  # first frame of an animation
            im.load()  # decodes; raises on truncated data (unless the process set ImageFile.LOAD_TRUNCATED_IMAGES)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"{source}: not an image (Pillow recognises no image format in {len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{source}: refused before decoding: a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{source}: cannot decode the image ({e}); the file is truncated or corrupt") from None
    return to_rgb(im)


def to_rgb(im):
    """RGB, with any transparency composited onto white (transformers' `convert_to_rgb`)."""
    Image, _ = _pil()
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def image_from_data_url(url: str):
    """Decode a `data:image/...;base64,...` URL."""
    if not isinstance(url, str):
        raise ImageError(f"a data URL must be a string, got {type(url).__name__}")
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageError(f"not a data URL: {url[:60]!r}")
    if not m.group("b64"):
        raise ImageError(f"data URL {url[:40]!r}...: only base64 data URLs are accepted")
    mime = m.group("mime") or ""
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data URL has media type {mime!r}, not an image")
    payload = url[m.end():]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"data URL payload is {len(payload)} characters, more than the limit of "
                         f"{MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL ({mime or 'no media type'}): invalid base64 ({e})") from None
    return decode_image(data, source=f"data URL ({mime or 'no media type'}, {len(data)} bytes)")


def image_from_file(path: str | os.PathLike, *, allowed_dir: str | os.PathLike | None = None):
    """Decode an image file; with `allowed_dir`, the resolved path must lie inside it (symlinks resolved)."""
    p = Path(path).expanduser()
    if allowed_dir is not None:
        root = Path(allowed_dir).resolve()
        resolved = p.resolve()
        if resolved != root and root not in resolved.parents:
            raise ImageError(f"{path}: outside the allowed image directory {root}")
        p = resolved
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ImageError(f"{path}: not a file")
        if size > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {size} bytes, more than the limit of {MAX_IMAGE_BYTES}")
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, source=str(path))


def load_image(source, *, allowed_dir: str | os.PathLike | None = None):
    """An RGB `PIL.Image` from a path, a `data:` URL, raw bytes or a PIL image. Network URLs are refused."""
    Image, _ = _pil()
    if isinstance(source, Image.Image):
        if source.width <= 0 or source.height <= 0:
            raise ImageError(f"the image is {source.width}x{source.height} pixels (empty)")
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        return decode_image(source, source="image bytes")
    if isinstance(source, str) and source.startswith("data:"):
        return image_from_data_url(source)
    if isinstance(source, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        raise ImageError(f"{source[:80]!r}: images are never fetched from the network; send a data URL or a file")
    if isinstance(source, (str, os.PathLike)):
        return image_from_file(source, allowed_dir=allowed_dir)
    raise ImageError(f"an image must be a path, a data URL, bytes or a PIL image, got {type(source).__name__}")


# ---- the processor's maths ----------------------------------------------------------------------------------------

def hd_scale(width: int, height: int, num_crops: int) -> int:
    """Tiles across the long side: the largest scale with scale * ceil(scale / ratio) <= num_crops."""
    ratio = max(width, height) / min(width, height)
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_sizes(width: int, height: int, num_crops: int, crop: int = 336) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, resized height), (padded width, padded height)) of the HD transform, in the original
    orientation; `ImageError` when the aspect ratio is so extreme that the short side resizes to 0 pixels."""
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h
    new_w = int(hd_scale(width, height, num_crops) * crop)
    new_h = int(new_w / ratio)
    if new_h < 1:
        raise ImageError(f"a {width}x{height} image is too thin for the HD transform (its short side would "
                         "resize to 0 pixels)")
    padded_h = int(math.ceil(new_h / crop) * crop)
    if transposed:
        return (new_h, new_w), (padded_h, new_w)
    return (new_w, new_h), (new_w, padded_h)


def hd_transform(im, num_crops: int, crop: int = 336):
    """The HD image (PIL, RGB): resized and white-padded so both sides are multiples of `crop`."""
    Image, _ = _pil()
    transposed = im.width < im.height
    if transposed:
        im = im.transpose(Image.Transpose.TRANSPOSE)  # as the reference: resize and pad in landscape
    (new_w, new_h), (_, padded_h) = hd_sizes(im.width, im.height, num_crops, crop)
    im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int((padded_h - new_h) / 2)
    if padded_h != new_h:
        canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
        canvas.paste(im, (0, top))
        im = canvas
    if transposed:
        im = im.transpose(Image.Transpose.TRANSPOSE)
    return im


def num_image_tokens(image_size: tuple[int, int], crop: int = 336, merged: int = 12) -> int:
    """Prompt positions of an image whose HD size is (height, width); `merged` = crop / patch / 2."""
    rows, cols = image_size[0] // crop, image_size[1] // crop
    return (rows * cols + 1) * merged * merged + 1 + (rows + 1) * merged


def preprocess(image, *, num_crops: int = 4, crop: int = 336, patch: int = 14,
               mean: tuple[float, ...] = OPENAI_CLIP_MEAN, std: tuple[float, ...] = OPENAI_CLIP_STD,
               allowed_dir: str | os.PathLike | None = None) -> ProcessedImage:
    """`image` (anything `load_image` takes) -> pixel values, HD size and token count (see the module doc)."""
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or not 1 <= num_crops <= 64:
        raise ImageError(f"num_crops must be an integer in [1, 64], got {num_crops!r}")
    assert crop % patch == 0 and (crop // patch) % 2 == 0, "crops must hold an even number of patches"
    im = load_image(image, allowed_dir=allowed_dir)
    source_size = im.size
    hd = hd_transform(im, num_crops, crop)
    import numpy as np
    x = torch.from_numpy(np.asarray(hd, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    x = x.to(torch.float32).div(255)
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    x = x.sub(m[:, None, None]).div(s[:, None, None])  # torchvision's Normalize: (x - mean) / std
    _, H, W = x.shape
    glob = F.interpolate(x[None], size=(crop, crop), mode="bicubic")  # (1, 3, crop, crop)
    tiles = (x.reshape(1, 3, H // crop, crop, W // crop, crop).permute(0, 2, 4, 1, 3, 5)
             .reshape(-1, 3, crop, crop))  # (rows*cols, 3, crop, crop), row-major
    pixels = torch.cat([glob, tiles], dim=0)
    if pixels.shape[0] < num_crops + 1:
        pad = torch.zeros(num_crops + 1 - pixels.shape[0], 3, crop, crop, dtype=pixels.dtype)
        pixels = torch.cat([pixels, pad], dim=0)  # (num_crops + 1, 3, crop, crop)
    return ProcessedImage(pixels.contiguous(), (H, W), num_image_tokens((H, W), crop, crop // patch // 2),
                          source_size)
