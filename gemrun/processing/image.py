"""Images in: safe decoding of untrusted sources, and Gemma 3's preprocessing (resize to 896x896 bilinear, rescale,
normalise to [-1, 1], optional Pan & Scan crops), equal to transformers' `Gemma3ImageProcessorPil`."""

from __future__ import annotations

import hashlib
import io
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ..formats.messages import MediaSlot
from .source import LOCAL, MediaRequest, Sources, read_source

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_PIXELS = 50_000_000  # checked from the header, before decoding
MAX_SIDE = 65_535


@dataclass(frozen=True)
class ImageConfig:
    """Gemma 3 preprocessor values (preprocessor_config.json / Gemma3Processor defaults)."""

    size: int = 896
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pan_and_scan: bool = False  # the official preprocessor leaves it off
    pas_min_crop_size: int = 256
    pas_max_num_crops: int = 4
    pas_min_ratio: float = 1.2


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source, sources: Sources = LOCAL, request: MediaRequest | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image or any source `source.read_source` takes. The pixel count is checked from the
    header before decoding (and taken from `request`'s budget); truncated files, bombs and odd sizes fail with
    InputError. EXIF orientation is applied (as transformers' load_image); GIFs give their first frame."""
    if isinstance(source, Image.Image):
        img = source
        w, h = img.size
        if w < 1 or h < 1 or w * h > MAX_PIXELS:
            raise InputError(f"image of {w}x{h} pixels is outside 1..{MAX_PIXELS} pixels")
        if request is not None:
            request.take_pixels(w * h, f"an image of {w}x{h}")
        return to_rgb(img)
    data = read_source(source, "image", sources=sources)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w < 1 or h < 1 or w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
            raise InputError(f"image of {w}x{h} pixels is refused (at most {MAX_PIXELS} pixels, sides "
                             f"1..{MAX_SIDE})")
        if request is not None:
            request.take_pixels(w * h, f"an image of {w}x{h}")
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"image refused: its header declares more than {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise InputError(f"not a supported image ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"image cannot be decoded: {e}") from None
    return to_rgb(img)


def pan_and_scan(img: Image.Image, cfg: ImageConfig) -> list[Image.Image]:
    """Crops of the original image along its long axis only (Gemma3ImageProcessorPil.pan_and_scan); [] when the
    image is not elongated enough or the crops would be smaller than the minimum crop size."""
    w, h = img.size
    long, short = (w, h) if w >= h else (h, w)
    if long / short < cfg.pas_min_ratio:
        return []
    n = int(math.floor(long / short + 0.5))
    n = min(int(math.floor(long / cfg.pas_min_crop_size)), n)
    n = min(cfg.pas_max_num_crops, max(2, n))
    nw, nh = (n, 1) if w >= h else (1, n)
    cw, ch = int(math.ceil(w / nw)), int(math.ceil(h / nh))
    if min(cw, ch) < cfg.pas_min_crop_size:
        return []
    return [img.crop((x, y, min(x + cw, w), min(y + ch, h))) for y in range(0, h, ch)[:nh]
            for x in range(0, w, cw)[:nw]]


def normalize(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """(3, size, size) float32: bilinear resize of the uint8 image, x/255 in float64, then (x - mean) / std."""
    resized = np.asarray(img.resize((cfg.size, cfg.size), resample=Image.Resampling.BILINEAR), dtype=np.uint8)
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def preprocess(img: Image.Image, cfg: ImageConfig, pan_scan: bool | None = None) -> np.ndarray:
    """(1 + crops, 3, size, size): the whole image first, then its Pan & Scan crops."""
    crops = pan_and_scan(img, cfg) if (cfg.pan_and_scan if pan_scan is None else pan_scan) else []
    return np.stack([normalize(i, cfg) for i in [img, *crops]])


IMAGE_CACHE = 16  # encoded images kept (a conversation re-sends its images every turn)


@dataclass
class Gemma3Image:
    pixels: np.ndarray  # (1 + crops, 3, size, size)
    slot: MediaSlot


class Gemma3Images:
    """How images reach a Gemma 3 model: preprocessed here, encoded by its SigLIP tower (`model.vision.
    Gemma3Vision`) into 256 soft tokens per image or crop. An image seen again is not encoded again."""

    kinds = ("image",)
    budgets: tuple[int, ...] = ()  # soft tokens per image are fixed

    def __init__(self, tower, config: ImageConfig | None = None):
        self.tower = tower
        self.config = replace(config or ImageConfig(), size=tower.config.image_size)  # 896 for the real models
        self.vision_ids = (tower.config.image_token_id,)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def prepare(self, kind: str, source, request: MediaRequest) -> Gemma3Image:
        pixels = preprocess(load_image(source, request.sources, request), self.config, request.pan_and_scan)
        return Gemma3Image(pixels, MediaSlot("image", self.tower.config.mm_tokens_per_image, len(pixels) - 1))

    def embed(self, items: list[Gemma3Image]) -> dict[int, torch.Tensor]:
        """Soft tokens (M, E) of the images in prompt order, by placeholder id."""
        soft = torch.cat([self.encode(item.pixels) for item in items]).flatten(0, 1)  # (images x 256, E)
        return {self.tower.config.image_token_id: soft}

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> torch.Tensor:
        """Soft tokens (crops, 256, E) of preprocessed pixels."""
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        w = self.tower.multi_modal_projector.mm_input_projection_weight
        soft = self.tower(torch.from_numpy(pixels).to(device=w.device, dtype=w.dtype))
        self._cache[key] = soft
        if len(self._cache) > IMAGE_CACHE:
            self._cache.popitem(last=False)
        return soft
