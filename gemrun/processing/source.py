"""The one reader of media sources: raw bytes, `data:` URLs, OpenAI `input_audio` objects, local paths or bare
base64, turned into checked bytes before any decoder sees them. Remote URLs are never fetched."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

MAX_BYTES = {"image": 20 << 20, "audio": 50 << 20, "video": 256 << 20}  # encoded size of one item
MAX_REQUEST_PIXELS = 100_000_000  # decoded pixels of all the images and video frames of one prompt
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")  # OpenAI input_audio formats we decode
_REMOTE = ("http", "https", "ftp", "file")


@dataclass(frozen=True)
class Sources:
    """Where media may come from. Bytes and `data:` URLs always. `paths`: a string is a local file (inside
    `root`, when set); otherwise (a server's clients) a string is bare base64 and paths are refused."""

    paths: bool = True
    root: Path | None = None


LOCAL = Sources()
CLIENT = Sources(paths=False)


@dataclass
class MediaRequest:
    """One prompt's media: where sources may come from, each image's soft-token budget (models that take one),
    Pan & Scan (Gemma 3), and the decoded pixels left for all its images and video frames together (checked from
    headers, before decoding: 32 tiny lossless 7000x7000 WebPs are 4 KB of upload and 1.6 G pixels)."""

    sources: Sources = LOCAL
    image_tokens: int | None = None
    pan_and_scan: bool | None = None
    pixels: int = MAX_REQUEST_PIXELS

    def take_pixels(self, n: int, what: str) -> None:
        if n > self.pixels:
            raise InputError(f"{what} would pass this prompt's limit of {MAX_REQUEST_PIXELS} decoded pixels for all "
                             "its images and video frames")
        self.pixels -= n


def b64decode(data: str, what: str, max_bytes: int) -> bytes:
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InputError(f"{what} is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None


def input_audio_bytes(data: str, format: str, max_bytes: int = MAX_BYTES["audio"]) -> bytes:
    """Bytes of an OpenAI `input_audio` part: base64 `data` of a `format` among wav, mp3, flac, ogg."""
    if not isinstance(format, str) or format.lower() not in AUDIO_FORMATS:
        raise InputError(f"input_audio format {format!r} is not one of {', '.join(AUDIO_FORMATS)}")
    if not isinstance(data, str):
        raise InputError("input_audio data must be a base64 string")
    return b64decode(data, "audio", max_bytes)


def read_source(source: object, kind: str, max_bytes: int | None = None, sources: Sources = LOCAL) -> bytes:
    """Bytes of one image, audio clip or video (`kind` names it in errors), at most `max_bytes` (default: the
    kind's limit) and not empty."""
    limit = max_bytes or MAX_BYTES.get(kind, MAX_BYTES["video"])
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, dict) and "data" in source:  # OpenAI input_audio: {"data": base64, "format": "wav"}
        data = input_audio_bytes(source.get("data"), source.get("format"), limit)
    elif isinstance(source, str) and source.startswith("data:"):
        head, _, payload = source.partition(",")
        if not head.endswith(";base64") or not payload:
            raise InputError(f"{kind} data: URL must be data:<type>;base64,<data>")
        data = b64decode(payload, kind, limit)
    elif isinstance(source, str) and source.split(":", 1)[0].lower() in _REMOTE:
        raise InputError(f"remote {kind} URLs are not fetched; pass a file, bytes or a data: URL")
    elif isinstance(source, (str, Path)) and sources.paths:
        data = _read_file(Path(source), kind, limit, sources.root)
    elif isinstance(source, str):
        if "://" in source or source.startswith(("/", ".", "~")):
            raise InputError(f"{kind} must be a data: URL or base64; remote URLs and file paths are not accepted")
        data = b64decode(source, kind, limit)
    else:
        raise InputError(f"unsupported {kind} source of type {type(source).__name__}")
    if len(data) > limit:
        raise InputError(f"{kind} is larger than {limit} bytes")
    if not data:
        raise InputError(f"{kind} is empty")
    return data


def _read_file(given: Path, kind: str, limit: int, root: Path | None) -> bytes:
    path = given.expanduser().resolve()
    if root is not None and Path(root).resolve() not in path.parents:
        raise InputError(f"{kind} path {given} is outside the allowed directory")
    if not path.is_file():
        raise InputError(f"{kind} file {given} does not exist or is not a regular file")
    if path.stat().st_size > limit:
        raise InputError(f"{kind} file {given} is larger than {limit} bytes")
    return path.read_bytes()
