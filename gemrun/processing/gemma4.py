"""Gemma 4 Unified (`gemma4_unified`) media processing: the model is encoder-free, so images and video frames become raw
48x48x3 patches and audio raw 640-sample frames. Equal to transformers' `Gemma4UnifiedImageProcessor`,
`Gemma4UnifiedVideoProcessor` and `Gemma4UnifiedAudioFeatureExtractor`, without torchvision or transformers; the
prompt text they expand to is `formats.gemma4.expand_media`'s."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..formats.messages import MediaSlot
from .audio import AudioLimits, ProcessedAudio, process_audio, waveform_frames
from .image import load_image
from .source import LOCAL, MediaRequest, Sources, read_source

__all__ = [
    "SOFT_TOKEN_BUDGETS", "ProcessedImage", "ProcessedVideo", "ProcessedAudio", "VideoLimits", "target_size",
    "process_image", "process_video", "mm_token_type_ids", "Gemma4Inputs",
]

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
PATCH = 16  # the reference's "teacher" patch; 3x3 of them merge into one 48-px model patch (the 12B's
POOL = 3  # vision_config.patch_size and pooling_kernel_size: a checkpoint's own values replace them)
IMAGE_TOKEN_ID, AUDIO_TOKEN_ID, VIDEO_TOKEN_ID = 258880, 258881, 258884


@dataclass(frozen=True)
class ProcessedImage:
    """`pixel_values` (n, 6912) float32 in [0, 1]: each row a 48x48x3 patch in HWC row-major order, patches in raster
    order; `positions` (n, 2) int64 = (x=column, y=row). n = the image's soft-token count."""

    pixel_values: torch.Tensor
    positions: torch.Tensor

    @property
    def num_soft_tokens(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def slot(self) -> MediaSlot:
        return MediaSlot("image", self.num_soft_tokens)

    def padded(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's layout: rows padded to `length` with zeros, their positions with -1."""
        return _pad(self.pixel_values, self.positions, length)


@dataclass(frozen=True)
class ProcessedVideo:
    """`pixel_values` (frames, k, 6912) and `positions` (frames, k, 2): each sampled frame processed as an image;
    `frame_indices` into the whole video at `fps`; `audio` is its first audio track, if any and asked for."""

    pixel_values: torch.Tensor
    positions: torch.Tensor
    frame_indices: tuple[int, ...]
    fps: float
    audio: ProcessedAudio | None = None

    @property
    def num_frames(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_soft_tokens(self) -> int:
        """Per frame."""
        return int(self.pixel_values.shape[1])

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.frame_indices]

    @property
    def timestamp_strings(self) -> list[str]:
        return [f"{int(s // 60):02d}:{int(s % 60):02d}" for s in self.timestamps]

    @property
    def slot(self) -> MediaSlot:
        """Frames only, as the reference: a video's audio track is not put into the prompt."""
        return MediaSlot("video", self.num_soft_tokens, timestamps=tuple(self.timestamp_strings))

    def padded(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad(self.pixel_values, self.positions, length)


@dataclass(frozen=True)
class VideoLimits:
    """Server-side caps on one video; a request can only ask for fewer frames."""

    max_bytes: int = 256 << 20
    max_seconds: float = 600.0
    max_fps: float = 240.0
    max_frames: int = 32  # sampled frames
    max_pixels: int = 4096 * 4096  # per decoded frame


def target_size(height: int, width: int, max_soft_tokens: int = 280, patch: int = PATCH,
                pool: int = POOL) -> tuple[int, int]:
    """(height, width) the image is resized to: the largest multiples of the model patch (patch x pool pixels,
    48) keeping the aspect ratio within `max_soft_tokens` model patches, as the reference's
    `get_aspect_ratio_preserving_size`."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise InputError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens}")
    side = patch * pool  # the model patch, 48 px on the 12B
    max_patches = max_soft_tokens * pool**2
    target_px = max_patches * patch**2
    factor = math.sqrt(target_px / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    # an extreme aspect ratio rounds one side to 0: it becomes one patch and the other side is capped
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, max_soft_tokens * side)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, max_soft_tokens * side), side
    if th * tw > target_px:  # unreachable for positive sides; kept as the reference's guard
        raise InputError(f"image of {width}x{height} cannot fit {max_soft_tokens} soft tokens")
    return th, tw


def _resize(pixels: torch.Tensor, max_soft_tokens: int, patch: int = PATCH, pool: int = POOL) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, 3, H', W') uint8. On the CPU torchvision hands uint8 straight to torch's bicubic
    antialiased kernel (it rounds internally), so calling that kernel the same way gives the same bytes."""
    h, w = target_size(pixels.shape[-2], pixels.shape[-1], max_soft_tokens, patch, pool)
    if (h, w) == tuple(pixels.shape[-2:]):
        return pixels
    return torch.nn.functional.interpolate(pixels, size=[h, w], mode="bicubic", align_corners=False, antialias=True)


def _patchify(pixels: torch.Tensor, side: int = PATCH * POOL) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, H, W) float -> patches (n, H/48 * W/48, 6912) in HWC order per patch, and positions (H/48 * W/48, 2)
    (48: the model patch's `side`). Equal to the reference's 16-px patchify followed by its 3x3 `patches_merge`."""
    n, c, height, width = pixels.shape
    h, w = height // side, width // side
    patches = pixels.reshape(n, c, h, side, w, side).permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, side * side * c)
    xs, ys = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    return patches, torch.stack([xs, ys], dim=-1).reshape(h * w, 2)


def _pad(values: torch.Tensor, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - values.shape[-2]
    if extra < 0:
        raise InputError(f"{values.shape[-2]} patches do not fit in {length}")
    pad_v = values.new_zeros(*values.shape[:-2], extra, values.shape[-1])
    pad_p = positions.new_full((*positions.shape[:-2], extra, 2), -1)
    return torch.cat([values, pad_v], dim=-2), torch.cat([positions, pad_p], dim=-2)


def process_image(source, max_soft_tokens: int = 280, sources: Sources = LOCAL,
                  request: MediaRequest | None = None, patch: int = PATCH, pool: int = POOL) -> ProcessedImage:
    """Patches of one image (a PIL image or any source `load_image` takes) for a soft-token budget among 70, 140,
    280, 560, 1120: resize bicubic with antialias, x/255, no normalisation. `patch` and `pool` are the
    checkpoint's `vision_config.patch_size` and `pooling_kernel_size`."""
    img = load_image(source, sources, request)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()[None]
    # x * (1/255) in float32, as the reference's rescale (its video path divides instead; see process_video)
    patches, positions = _patchify(_resize(pixels, max_soft_tokens, patch, pool) * (1 / 255), patch * pool)
    return ProcessedImage(patches[0], positions)


def _sniff_container(data: bytes) -> str:
    """The demuxer for MP4/MOV, Matroska/WebM or AVI bytes. Naming it stops FFmpeg probing every format it knows
    (playlists such as HLS or concat would open other files or URLs)."""
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"):
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    raise InputError("video container is not MP4/MOV, Matroska/WebM or AVI")


def _video_audio(data: bytes, fmt: str, limits: AudioLimits) -> ProcessedAudio | None:
    import av

    with av.open(io.BytesIO(data), format=fmt) as c:
        if not c.streams.audio:
            return None
        stream = c.streams.audio[0]
        if stream.codec_context is None:
            raise InputError("video audio track's codec cannot be decoded; pass audio=False to use only the frames")
        resampler = av.AudioResampler(format="fltp")  # planar float32; layout and rate kept, mixed down below
        chunks, n, rate = [], 0, 0
        for frame in c.decode(stream):
            for f in resampler.resample(frame):
                rate = rate or f.sample_rate
                if f.sample_rate != rate or not 1 <= len(f.layout.channels) <= limits.max_channels:
                    raise InputError("video audio changes sample rate or has too many channels")
                chunks.append(f.to_ndarray().mean(axis=0, dtype=np.float32))
                n += f.samples
                if n > limits.max_seconds * rate:
                    raise InputError(f"video audio is longer than the limit of {limits.max_seconds:g} s; "
                                     "pass audio=False to use only the frames")
        if n == 0:
            return None
    if not 1 <= rate <= limits.max_rate:
        raise InputError(f"video audio rate {rate} Hz is outside 1..{limits.max_rate}")
    return waveform_frames(np.concatenate(chunks), rate, limits)


def process_video(source, num_frames: int = 32, max_soft_tokens: int = 70, audio: bool = True,
                  limits: VideoLimits = VideoLimits(), audio_limits: AudioLimits = AudioLimits(),
                  sources: Sources = LOCAL, request: MediaRequest | None = None, patch: int = PATCH,
                  pool: int = POOL) -> ProcessedVideo:
    """`num_frames` frames sampled uniformly (`arange(n) * total // n`, as the reference) from an MP4/MOV, Matroska/
    WebM or AVI video (bytes, a data: URL or a path), each processed as an image with `max_soft_tokens`, plus the first
    audio track as 16 kHz frames when `audio`. A video with fewer frames uses them all (the reference refuses it)."""
    if not 1 <= num_frames <= limits.max_frames:
        raise InputError(f"num_frames must be in 1..{limits.max_frames}, got {num_frames}")
    target_size(patch * pool, patch * pool, max_soft_tokens, patch, pool)  # validates the budget before decoding
    data = read_source(source, "video", limits.max_bytes, sources)
    fmt = _sniff_container(data)
    import av  # here, not at the top: FFmpeg's libraries cost every process ~16 MB of RSS, most never see a video

    try:
        with av.open(io.BytesIO(data), format=fmt) as c:
            if not c.streams.video:
                raise InputError("video has no video stream")
            stream = c.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            if stream.codec_context is None:  # a codec id FFmpeg has no decoder for
                raise InputError("video stream's codec cannot be decoded")
            width, height = stream.codec_context.width, stream.codec_context.height
            if not 0 < fps <= limits.max_fps:
                raise InputError(f"video frame rate {fps:g} is outside (0, {limits.max_fps:g}]")
            if width < 1 or height < 1 or width * height > limits.max_pixels:
                raise InputError(f"video frames of {width}x{height} are refused (at most {limits.max_pixels} pixels)")
            max_total = int(limits.max_seconds * fps)
            total = stream.frames
            if total == 0:  # not in the header (Matroska, WebM): count packets, which needs no decoding
                total = sum(1 for p in c.demux(stream) if p.size)
                c.seek(0)
            if total > max_total:
                raise InputError(f"video of {total / fps:.1f} s is longer than the limit of {limits.max_seconds:g} s")
            if total == 0:
                raise InputError("video has no frames")
            n = min(num_frames, total)
            if request is not None:
                request.take_pixels(n * width * height, f"{n} video frames of {width}x{height}")
            wanted = set((np.arange(n) * total // n).tolist())
            last = max(wanted)
            kept, indices = [], []
            for i, frame in enumerate(c.decode(stream)):
                if i > last:
                    break
                if i in wanted:
                    if (frame.width, frame.height) != (width, height):
                        raise InputError("video frame size changes within the stream")
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
                    kept.append(_resize(rgb[None], max_soft_tokens, patch, pool)[0])
                    indices.append(i)
        track = _video_audio(data, fmt, audio_limits) if audio else None
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as e:
        raise InputError(f"video cannot be decoded: {e}") from None
    if not kept:
        raise InputError("video has no decodable frames")
    # the reference's video path fuses rescale into normalize (mean 0, std 255), so it divides: x / 255
    patches, positions = _patchify(torch.stack(kept).to(torch.float32) / 255.0, patch * pool)
    return ProcessedVideo(patches, positions.expand(len(kept), -1, -1).contiguous(), tuple(indices), fps, track)


def mm_token_type_ids(ids: torch.Tensor | Sequence[int], image_token_id: int = IMAGE_TOKEN_ID,
                      video_token_id: int = VIDEO_TOKEN_ID, audio_token_id: int = AUDIO_TOKEN_ID):
    """1 on image soft tokens, 2 on video soft tokens, 3 on audio soft tokens, 0 elsewhere (boi/eoi included), as the
    reference's `create_mm_token_type_ids`. A tensor gives an int64 tensor of its shape; a sequence gives a list."""
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)
    out = (t == image_token_id).long() + 2 * (t == video_token_id).long() + 3 * (t == audio_token_id).long()
    return out if isinstance(ids, torch.Tensor) else out.tolist()


class Gemma4Inputs:
    """How images, video and audio reach a Gemma 4 Unified model: processed here, projected into the text width by
    its encoder-free embedders (`model.gemma4.Gemma4Media`). Images take a soft-token budget per request."""

    budgets = SOFT_TOKEN_BUDGETS

    def __init__(self, media):
        self.media, cfg = media, media.config
        self.kinds = (("image", "video") if media.embed_vision is not None else ()) + (
            ("audio",) if media.embed_audio is not None else ())
        self.vision_ids = (cfg.image_token_id, cfg.video_token_id)  # runs of these attend to each other
        self.ids = {"image": cfg.image_token_id, "video": cfg.video_token_id, "audio": cfg.audio_token_id}
        self.patch = {"patch": cfg.patch_size, "pool": cfg.pooling_kernel_size}  # the checkpoint's geometry

    def prepare(self, kind: str, source, request: MediaRequest):
        if kind == "image":
            return process_image(source, request.image_tokens or 280, request.sources, request, **self.patch)
        if kind == "audio":
            return process_audio(source, sources=request.sources)
        return process_video(source, audio=False, sources=request.sources, request=request, **self.patch)

    @torch.inference_mode()
    def embed(self, items: list) -> dict[int, torch.Tensor]:
        """Soft tokens (M, E) by placeholder id, each kind's items in prompt order."""
        device = self.media.embed_vision.patch_dense.weight.device if self.media.embed_vision else None
        soft: dict[int, list[torch.Tensor]] = {}
        for item in items:
            if isinstance(item, ProcessedImage):
                out = self.media.image(item.pixel_values.to(device), item.positions.to(device))
            elif isinstance(item, ProcessedVideo):
                out = self.media.image(item.pixel_values.flatten(0, 1).to(device),
                                       item.positions.flatten(0, 1).to(device))
            else:
                weight = self.media.embed_audio.embedding_projection.weight
                out = self.media.audio(item.features[item.mask].to(weight.device))
            soft.setdefault(self.ids[item.slot.kind], []).append(out)
        return {token: torch.cat(parts) for token, parts in soft.items()}
