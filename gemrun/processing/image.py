"""Images in: safe decoding of untrusted sources, and Gemma 3's preprocessing (resize to 896x896 bilinear, rescale,
normalise to [-1, 1], optional Pan & Scan crops), equal to transformers' `Gemma3ImageProcessorPil`."""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_BYTES = 20 << 20  # encoded image size
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


def _decode_data_url(url: str) -> bytes:
    head, _, data = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64") or not data:
        raise InputError("image data: URL must be data:<type>;base64,<data>")
    if len(data) > MAX_BYTES * 4 // 3 + 4:
        raise InputError(f"image is larger than {MAX_BYTES} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image data: URL is not valid base64") from None


def read_image_bytes(source: str | bytes | Path, allowed_dir: Path | None = None) -> bytes:
    """Bytes of an image given as raw bytes, a `data:` URL or a local path (inside `allowed_dir` when set).
    Remote URLs are refused: nothing is downloaded."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, str) and source.startswith("data:"):
        data = _decode_data_url(source)
    elif isinstance(source, str) and source.split(":", 1)[0].lower() in ("http", "https", "ftp", "file"):
        raise InputError("remote image URLs are not fetched; pass a file, bytes or a data: URL")
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser().resolve()
        if allowed_dir is not None and Path(allowed_dir).resolve() not in path.parents:
            raise InputError(f"image path {source} is outside the allowed directory")
        if not path.is_file():
            raise InputError(f"image file {source} does not exist or is not a regular file")
        if path.stat().st_size > MAX_BYTES:
            raise InputError(f"image file {source} is larger than {MAX_BYTES} bytes")
        data = path.read_bytes()
    else:
        raise InputError(f"unsupported image source of type {type(source).__name__}")
    if len(data) > MAX_BYTES:
        raise InputError(f"image is larger than {MAX_BYTES} bytes")
    if not data:
        raise InputError("image is empty")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source, allowed_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from bytes, a data: URL, a path or a PIL image. The pixel count is checked from the
    header before decoding; truncated files, bombs and odd sizes fail with InputError. EXIF orientation is
    applied (as transformers' load_image); GIFs give their first frame."""
    if isinstance(source, Image.Image):
        img = source
        w, h = img.size
        if w < 1 or h < 1 or w * h > MAX_PIXELS:
            raise InputError(f"image of {w}x{h} pixels is outside 1..{MAX_PIXELS} pixels")
        return to_rgb(img)
    data = read_image_bytes(source, allowed_dir)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w < 1 or h < 1 or w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
            raise InputError(f"image of {w}x{h} pixels is refused (at most {MAX_PIXELS} pixels, sides "
                             f"1..{MAX_SIDE})")
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
    """Crops of the original image along its long axis (facts 2.6); [] when the image is not elongated enough
    or the crops would be smaller than the minimum crop size."""
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
