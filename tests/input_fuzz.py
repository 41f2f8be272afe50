"""Mutation fuzz of the untrusted inputs other than GGUF files, in a child process with a memory cap and a per-mutant
alarm (the harness and its outcomes: tests/fuzz.py).

    python tests/input_fuzz.py FAMILY COUNT SEED [DIR]  ->  one JSON line of counts
    options: --start I (begin at mutant I of the same sequence), --progress (a JSON line per mutant: fuzz.supervise)

FAMILY is `safetensors` (a tiny HF directory DIR, `tiny.write_hf_dir`), an image format (png jpeg webp gif bmp),
an audio format (wav flac ogg mp3) or a video container (mp4 webm avi).

safetensors: each mutant is a copy of DIR with one change: the 8-byte header length, the JSON header (a tensor's
dtype, shape or data offsets, a duplicated or renamed tensor, the metadata, the whole value), its raw bytes, the file
cut short, a shard index (names leaving the directory, absolute, missing, not strings, a link outside), config.json
values (extremes, NaN, wrong types, removed keys) or the tokenizer files; loaded with `gemrun.load` (any GemrunError
is a clean refusal). A mutant that loads is checked against an independent reading of the safetensors header
(dtypes allowed, offsets inside the data, not overlapping, as long as the shape and dtype say, unique names) and
by a 3-token forward (finite logits, token ids inside the embedding).

Media: a small valid file of the format (two variants each) mutated in one of its header fields (dimensions,
counts, sizes, rates, channels, bit depths: extremes, zero, off by one; CRCs recomputed most of the time, so that
the decoder reads the lie), or its bytes flipped, inserted, deleted or cut. Images go through `load_image` +
`preprocess` (Gemma 3, Pan & Scan) and `process_image` (Gemma 4), audio through `process_audio`, video through
`process_video` (with its audio track); any InputError is a clean refusal, a result must be finite, of the expected
shape and within the limits.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

from fuzz import EXTREMES, fuzz, limit_memory, main_args, model_problems

IMAGES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
AUDIO = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}
VIDEO = {"mp4": ("mp4", "libx264", "aac"), "webm": ("webm", "libvpx", "libopus"), "avi": ("avi", "mpeg4", "mp3")}
FAMILIES = ["safetensors", *IMAGES, *AUDIO, *VIDEO]
MEDIA_MEMORY = 2 << 30


# --- fields: (position, width, byte order, bits) -----------------------------------------------------------------
# `bits` = (lowest bit, count) for a value packed inside the field, else None.

def _u(data: bytes, at: int, width: int, order: str) -> int:
    return int.from_bytes(data[at:at + width], order) if at + width <= len(data) else 0


def _new_int(old: int, nbits: int, rng) -> int:
    r = rng.random()
    if r < 0.35:
        v = old + rng.choice([-1, 1, -2, 2, -8, 8])
    elif r < 0.55:
        v = rng.choice([0, 1, old * 2, old // 2, -1, old * 1000])
    else:
        v = rng.choice(EXTREMES + [(1 << nbits) - 1, 1 << (nbits - 1), (1 << (nbits - 1)) - 1])
    return v % (1 << nbits)


def set_field(m: bytearray, field: tuple, rng) -> None:
    at, width, order, bits = field
    if at + width > len(m):
        return
    word = int.from_bytes(m[at:at + width], order)
    if bits is None:
        word = _new_int(word, 8 * width, rng)
    else:
        lo, n = bits
        old = (word >> lo) & ((1 << n) - 1)
        word = (word & ~(((1 << n) - 1) << lo)) | (_new_int(old, n, rng) << lo)
    m[at:at + width] = word.to_bytes(width, order)


def _chunks(data: bytes, start: int, end: int, order: str = "little", pad: bool = True):
    """RIFF-style chunks (fourcc, size) between start and end: (position, fourcc, size)."""
    at = start
    while at + 8 <= end:
        size = _u(data, at + 4, 4, order)
        yield at, data[at:at + 4], size
        at += 8 + size + (size & 1 if pad else 0)


def png_fields(data: bytes) -> list[tuple]:
    out, at = [], 8
    while at + 12 <= len(data):
        size, kind = _u(data, at, 4, "big"), data[at + 4:at + 8]
        out.append((at, 4, "big", None))
        if kind == b"IHDR":
            out += [(at + 8, 4, "big", None), (at + 12, 4, "big", None)] + [(at + k, 1, "big", None)
                                                                             for k in range(16, 21)]
        at += 12 + size
    return out


def png_fix(m: bytearray) -> None:
    """Recompute every chunk's CRC."""
    at = 8
    while at + 12 <= len(m):
        size = _u(m, at, 4, "big")
        if at + 12 + size > len(m):
            return
        m[at + 8 + size:at + 12 + size] = zlib.crc32(bytes(m[at + 4:at + 8 + size])).to_bytes(4, "big")
        at += 12 + size


def jpeg_fields(data: bytes) -> list[tuple]:
    out, at = [], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, size = data[at + 1], _u(data, at + 2, 2, "big")
        out.append((at + 2, 2, "big", None))
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width, components and their sampling
            out += [(at + 4, 1, "big", None), (at + 5, 2, "big", None), (at + 7, 2, "big", None),
                    (at + 9, 1, "big", None), (at + 11, 1, "big", None), (at + 12, 1, "big", None)]
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            out.append((at + 4, 1, "big", None))
            break
        at += 2 + size
    return out


def gif_fields(data: bytes) -> list[tuple]:
    out = [(6, 2, "little", None), (8, 2, "little", None), (10, 1, "little", None)]
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while at < len(data):
        if data[at] == 0x21:  # extension: label, sub-blocks
            at += 2
            while at < len(data) and data[at]:
                out.append((at, 1, "little", None))
                at += data[at] + 1
            at += 1
        elif data[at] == 0x2C:  # image descriptor: position, size, flags; LZW code size; sub-blocks
            out += [(at + k, 2, "little", None) for k in (1, 3, 5, 7)] + [(at + 9, 1, "little", None)]
            flags = data[at + 9] if at + 9 < len(data) else 0
            at += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            out.append((at, 1, "little", None))
            at += 1
            while at < len(data) and data[at]:
                out.append((at, 1, "little", None))
                at += data[at] + 1
            at += 1
        else:
            break
    return out


def bmp_fields(data: bytes) -> list[tuple]:
    return [(at, w, "little", None) for at, w in ((2, 4), (10, 4), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2),
                                                  (30, 4), (34, 4), (46, 4), (50, 4))]


def webp_fields(data: bytes) -> list[tuple]:
    out = [(4, 4, "little", None)]
    for at, kind, _ in _chunks(data, 12, len(data)):
        out.append((at + 4, 4, "little", None))
        d = at + 8
        if kind == b"VP8 ":  # frame tag, then 14-bit width and height (+2 scale bits)
            out += [(d, 3, "little", None), (d + 6, 2, "little", None), (d + 8, 2, "little", None)]
        elif kind == b"VP8L":  # 14-bit width - 1 and height - 1, alpha, version
            out += [(d + 1, 4, "little", (0, 14)), (d + 1, 4, "little", (14, 14)), (d + 1, 4, "little", (29, 3))]
        elif kind == b"VP8X":
            out += [(d, 1, "little", None), (d + 4, 3, "little", None), (d + 7, 3, "little", None)]
    return out


def wav_fields(data: bytes) -> list[tuple]:
    out = [(4, 4, "little", None)]
    for at, kind, _ in _chunks(data, 12, len(data)):
        out.append((at + 4, 4, "little", None))
        if kind == b"fmt ":
            out += [(at + 8 + k, w, "little", None) for k, w in ((0, 2), (2, 2), (4, 4), (8, 4), (12, 2), (14, 2))]
    return out


def flac_fields(data: bytes) -> list[tuple]:
    out, at = [], 4
    while at + 4 <= len(data):
        head, size = data[at], _u(data, at + 1, 3, "big")
        out.append((at + 1, 3, "big", None))
        if head & 0x7F == 0:  # STREAMINFO: block sizes, frame sizes, then rate/channels/bits/total in 64 bits
            s = at + 4
            out += [(s, 2, "big", None), (s + 2, 2, "big", None), (s + 4, 3, "big", None), (s + 7, 3, "big", None)]
            out += [(s + 10, 8, "big", b) for b in ((44, 20), (41, 3), (36, 5), (0, 36))]
        at += 4 + size
        if head & 0x80:
            break
    return out


def ogg_fields(data: bytes) -> list[tuple]:
    out, at = [], 0
    while at + 27 <= len(data) and data[at:at + 4] == b"OggS":
        out += [(at + 5, 1, "little", None), (at + 6, 8, "little", None), (at + 26, 1, "little", None)]
        nseg = data[at + 26]
        body = at + 27 + nseg
        if data[body:body + 7] == b"\x01vorbis":  # identification: version, channels, rate, bitrates, block sizes
            out += [(body + 7, 4, "little", None), (body + 11, 1, "little", None), (body + 12, 4, "little", None),
                    (body + 20, 4, "little", None), (body + 28, 1, "little", None)]
        out += [(at + 27 + k, 1, "little", None) for k in range(min(nseg, 4))]
        at = body + sum(data[at + 27:at + 27 + nseg])
    return out


_OGG_TABLE = []
for _i in range(256):
    _r = _i << 24
    for _ in range(8):
        _r = ((_r << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if _r & 0x80000000 else (_r << 1) & 0xFFFFFFFF
    _OGG_TABLE.append(_r)


def ogg_fix(m: bytearray) -> None:
    """Recompute every page's CRC (Ogg's: polynomial 0x04C11DB7, not reflected, over the page with the CRC 0)."""
    at = 0
    while at + 27 <= len(m) and m[at:at + 4] == b"OggS":
        end = at + 27 + m[at + 26] + sum(m[at + 27:at + 27 + m[at + 26]])
        if end > len(m):
            return
        m[at + 22:at + 26] = bytes(4)
        crc = 0
        for b in m[at:end]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_TABLE[(crc >> 24) ^ b]
        m[at + 22:at + 26] = crc.to_bytes(4, "little")
        at = end


def mp3_fields(data: bytes) -> list[tuple]:
    out, at = [], 0
    if data[:3] == b"ID3":
        out.append((6, 4, "big", None))
        at = 10 + sum((data[6 + k] & 0x7F) << (7 * (3 - k)) for k in range(4))
    frames = 0
    while at + 4 <= len(data) and frames < 6:
        if data[at] == 0xFF and data[at + 1] & 0xE0 == 0xE0:  # frame header: version, layer, rate, sampling, mode
            out += [(at, 4, "big", b) for b in ((19, 2), (17, 2), (12, 4), (10, 2), (6, 2))]
            frames += 1
            at += 4
        else:
            at += 1
    for tag in (b"Xing", b"Info"):
        t = data.find(tag)
        if t >= 0:
            out += [(t + 4, 4, "big", None), (t + 8, 4, "big", None), (t + 12, 4, "big", None)]
    return out


MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"mvex"}
MP4_FULL = {b"stts": 12, b"stsz": 12, b"stsc": 12, b"stco": 12, b"co64": 12, b"ctts": 12, b"stss": 12, b"elst": 12,
            b"stsd": 12}


def mp4_fields(data: bytes, start: int = 0, end: int | None = None) -> list[tuple]:
    out, at, end = [], start, len(data) if end is None else end
    while at + 8 <= end:
        size, kind = _u(data, at, 4, "big"), data[at + 4:at + 8]
        out.append((at, 4, "big", None))
        if size < 8:
            break
        if kind in MP4_CONTAINERS:
            out += mp4_fields(data, at + 8, at + size)
        elif kind in (b"mvhd", b"mdhd"):  # version 0: timescale, duration
            out += [(at + 20, 4, "big", None), (at + 24, 4, "big", None)]
        elif kind == b"tkhd":  # version 0: duration, width, height (16.16)
            out += [(at + 28, 4, "big", None), (at + 84, 4, "big", None), (at + 88, 4, "big", None)]
        elif kind in MP4_FULL:
            out += [(at + 12, 4, "big", None), (at + 16, 4, "big", None), (at + 20, 4, "big", None)]
            if kind == b"stsd":  # the sample entry: video width/height, or audio channels/sample size/rate
                e = at + 16
                if data[e + 4:e + 8] == b"avc1" or data[e + 4:e + 8] == b"mp4v":
                    out += [(e + 32, 2, "big", None), (e + 34, 2, "big", None), (e + 50, 2, "big", None)]
                elif data[e + 4:e + 8] == b"mp4a":
                    out += [(e + 24, 2, "big", None), (e + 26, 2, "big", None), (e + 32, 4, "big", None)]
        at += size
    return out


EBML_MASTERS = {0x1A45DFA3, 0x18538067, 0x114D9B74, 0x4DBB, 0x1549A966, 0x1654AE6B, 0xAE, 0xE0, 0xE1, 0x1F43B675,
                0xA0, 0x1C53BB6B, 0xBB, 0xB7, 0x1254C367, 0x7373, 0x63C0, 0x67C8}
EBML_VALUES = {0xB0, 0xBA, 0xB5, 0x9F, 0x2AD7B1, 0x4489, 0x23E383, 0xD7, 0x83, 0x6264, 0xE7, 0x54B0, 0x54BA}


def _vint(data: bytes, at: int) -> tuple[int, int, int]:
    """(value with the marker kept, value without it, length) of an EBML variable-size integer."""
    first = data[at] if at < len(data) else 0
    n = 1
    while n <= 8 and not first & (0x80 >> (n - 1)):
        n += 1
    raw = _u(data, at, n, "big")
    return raw, raw & ((1 << (7 * n)) - 1), n


def webm_fields(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list[tuple]:
    out, at, end = [], start, len(data) if end is None else end
    while at + 2 <= end and len(out) < 400:
        eid, _, idn = _vint(data, at)
        if idn > 4:
            break
        _, size, sn = _vint(data, at + idn)
        if sn > 8:
            break
        out.append((at + idn, sn, "big", (0, 7 * sn)))
        body = at + idn + sn
        if eid in EBML_MASTERS and depth < 6:
            out += webm_fields(data, body, min(end, body + size), depth + 1)
        elif eid in EBML_VALUES and 0 < size <= 8:
            out.append((body, size, "big", None))
        if eid == 0x1F43B675 and depth == 1 and sum(1 for f in out if f[3] is None) > 40:
            break  # enough clusters
        at = body + size
    return out


def avi_fields(data: bytes, start: int = 12, end: int | None = None) -> list[tuple]:
    out = [(4, 4, "little", None)] if start == 12 else []
    end = len(data) if end is None else end
    for at, kind, size in _chunks(data, start, end):
        out.append((at + 4, 4, "little", None))
        d = at + 8
        if kind == b"LIST":
            out += avi_fields(data, d + 4, min(end, d + size))
        elif kind == b"avih":  # microseconds per frame, total frames, streams, buffer, width, height
            out += [(d + k, 4, "little", None) for k in (0, 16, 24, 28, 32, 36)]
        elif kind == b"strh":  # scale, rate, start, length, buffer, sample size
            out += [(d + k, 4, "little", None) for k in (20, 24, 28, 32, 36, 44)]
        elif kind == b"strf":  # BITMAPINFOHEADER (width, height, bit count, size) or WAVEFORMATEX
            out += [(d + k, w, "little", None) for k, w in ((0, 4), (2, 2), (4, 4), (8, 4), (12, 2), (14, 2))]
        elif kind == b"idx1":
            out += [(d + 16 * k + j, 4, "little", None) for k in range(3) for j in (8, 12)]
        if len(out) > 400:
            break
    return out


FIELDS = {"png": png_fields, "jpeg": jpeg_fields, "gif": gif_fields, "bmp": bmp_fields, "webp": webp_fields,
          "wav": wav_fields, "flac": flac_fields, "ogg": ogg_fields, "mp3": mp3_fields, "mp4": mp4_fields,
          "webm": webm_fields, "avi": avi_fields}
FIXES = {"png": png_fix, "ogg": ogg_fix}


# --- media samples and checks -----------------------------------------------------------------------------------

def media_samples(family: str) -> list[bytes]:
    """Two small valid files of the family."""
    import numpy as np
    from media_samples import encode_audio, make_video, stereo
    from PIL import Image

    if family in IMAGES:
        y, x = np.mgrid[0:48, 0:64]
        img = Image.fromarray(np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 3 % 256], -1).astype(np.uint8))
        fmt, out = IMAGES[family], []
        for variant in (0, 1):
            buf = io.BytesIO()
            if fmt == "PNG":
                (img.convert("RGBA") if variant else img.convert("P")).save(buf, "PNG")
            elif fmt == "JPEG":
                exif = Image.Exif()
                exif[0x0112] = 6
                img.save(buf, "JPEG", quality=85, progressive=bool(variant), exif=exif if variant else b"")
            elif fmt == "WEBP":
                img.save(buf, "WEBP", lossless=bool(variant))
            elif fmt == "GIF":
                frames = [img.convert("P"), img.rotate(90).convert("P")]
                frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], transparency=0 if variant else None)
            else:
                (img.convert("P") if variant else img).save(buf, "BMP")
            out.append(buf.getvalue())
        return out
    if family in AUDIO:
        fmt = AUDIO[family]
        subtypes = {"WAV": ("PCM_16", "FLOAT"), "FLAC": ("PCM_16", "PCM_24"), "OGG": ("VORBIS", "OPUS"),
                    "MP3": (None, None)}[fmt]
        return [encode_audio(stereo(0.4, 22_050) if i == 0 else stereo(0.3, 48_000)[:, :1], 22_050 if i == 0 else
                             48_000, fmt, sub) for i, sub in enumerate(subtypes)]
    container, codec, audio_codec = VIDEO[family]
    return [make_video(n=12, fps=10, container=container, codec=codec, audio_rate=48_000 if family == "webm" else
                       44_100, audio_codec=audio_codec),
            make_video(n=8, fps=5, width=48, height=32, container=container, codec=codec, audio_rate=None)]


def media_check(family: str):
    import numpy as np
    import torch

    from gemrun.processing.audio import AudioLimits, process_audio
    from gemrun.processing.gemma4 import VideoLimits, process_image, process_video
    from gemrun.processing.image import MAX_PIXELS, MAX_SIDE, ImageConfig, load_image, preprocess

    def finite(t) -> bool:
        return bool(torch.isfinite(torch.as_tensor(t)).all())

    def check(data: bytes) -> str | None:
        if family in IMAGES:
            img = load_image(data)
            w, h = img.size
            if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE and w * h <= MAX_PIXELS) or img.mode != "RGB":
                return f"decoded a {w}x{h} {img.mode} image"
            pixels = preprocess(img, ImageConfig(size=224), True)
            if pixels.shape[1:] != (3, 224, 224) or not np.isfinite(pixels).all():
                return f"Gemma 3 pixels of shape {pixels.shape}, finite: {np.isfinite(pixels).all()}"
            out = process_image(data, 70)
            if out.pixel_values.shape[-1] != 6912 or not finite(out.pixel_values) or out.num_soft_tokens > 70:
                return f"Gemma 4 patches {tuple(out.pixel_values.shape)}"
        elif family in AUDIO:
            out = process_audio(data)
            n = out.features.shape[0]
            if out.features.shape[1:] != (640,) or not 1 <= n <= AudioLimits().max_tokens or not finite(out.features):
                return f"audio frames {tuple(out.features.shape)}"
        else:
            out = process_video(data)
            shape = tuple(out.pixel_values.shape)
            if not 1 <= shape[0] <= VideoLimits().max_frames or shape[-1] != 6912 or not finite(out.pixel_values):
                return f"video patches {shape}"
            if out.audio is not None and (not finite(out.audio.features) or
                                          out.audio.features.shape[0] > AudioLimits().max_tokens):
                return f"video audio frames {tuple(out.audio.features.shape)}"
        return None

    return check


def media_mutations(family: str):
    samples = media_samples(family)
    fields = [FIELDS[family](s) for s in samples]
    fix = FIXES.get(family)

    def make(rng) -> bytes:
        k = rng.randrange(len(samples))
        data, m = samples[k], bytearray(samples[k])
        r = rng.random()
        if r < 0.45 and fields[k]:
            for _ in range(1 if rng.random() < 0.8 else 2):
                set_field(m, rng.choice(fields[k]), rng)
            if fix and rng.random() < 0.8:
                fix(m)
        elif r < 0.65:  # bytes flipped, most often in the first 512
            span = min(len(m), 512) if rng.random() < 0.6 else len(m)
            for _ in range(rng.randint(1, 6)):
                m[rng.randrange(span)] = rng.randrange(256)
            if fix and rng.random() < 0.5:
                fix(m)
        elif r < 0.8:  # cut short
            m = m[:rng.randrange(len(m))]
        elif r < 0.92:  # bytes deleted or inserted
            at = rng.randrange(len(m))
            if rng.random() < 0.5:
                del m[at:at + rng.randint(1, 64)]
            else:
                m[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:  # a stretch repeated (chunks, frames, boxes twice)
            a = rng.randrange(len(data))
            b = min(len(data), a + rng.randint(8, 2048))
            m[b:b] = data[a:b] * rng.randint(1, 4)
        return bytes(m)

    return make


# --- safetensors directories ------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3",
          "F8_E5M2", "", "f32", "F4", "C64"]
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
              "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ODD_VALUES = [float("nan"), float("inf"), float("-inf"), -1, 0, 1, 2**31, 2**63, 1e308, 1e-45, -1e30, "1", "",
              None, True, False, [], [1], {}, {"a": 1}, "../../etc/passwd", "\u202e\x00", 1.5, "gemma4_text",
              "gemma3", "gemma3_text", "llama", "float8_e4m3fn"]


def header(data: bytes) -> tuple[int, list[tuple[str, object]]]:
    (n,) = struct.unpack_from("<Q", data, 0)
    return n, json.loads(data[8:8 + n], object_pairs_hook=lambda pairs: pairs)


def safetensors_problems(data: bytes) -> str | None:
    """An independent reading of a safetensors file: what the loader must have refused in it (None: nothing)."""
    from gemrun.weights.safetensors import ALLOWED_DTYPES

    try:
        n, pairs = header(data)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        return f"unreadable header ({e})"
    if not isinstance(pairs, list):
        return "header is not an object"
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        return "duplicate tensor names"
    size, spans = len(data) - 8 - n, []
    for name, info in pairs:
        if name == "__metadata__":
            continue
        try:
            info = dict(info)
        except (TypeError, ValueError):
            return f"tensor {name!r} entry {info!r}"[:200]
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ALLOWED_DTYPES:
            return f"tensor {name!r} dtype {dtype!r}"
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"tensor {name!r} shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"tensor {name!r} offsets {offsets!r}"
        count = 1
        for d in shape:
            count *= d
        a, b = offsets
        if not 0 <= a <= b <= size or b - a != count * DTYPE_SIZE[dtype]:
            return f"tensor {name!r} offsets {offsets} for {shape} {dtype} in {size} bytes"
        spans.append((a, b))
    spans.sort()
    if any(a < prev_b for (_, prev_b), (a, _) in zip(spans, spans[1:])):
        return "tensor data overlaps"
    return None


def _set_json_value(obj, rng) -> None:
    """One value somewhere in a JSON object (nested included) changed or removed."""
    path, node = [], obj
    while isinstance(node, dict) and node:
        key = rng.choice(list(node))
        path.append((node, key))
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
            break
        node = node[key] if isinstance(node[key], dict) else node
        if not isinstance(node, dict):
            break
    if not path:
        return
    parent, key = path[-1]
    old = parent[key]
    r = rng.random()
    if r < 0.15:
        del parent[key]
    elif isinstance(old, (int, float)) and not isinstance(old, bool) and r < 0.5:
        parent[key] = rng.choice([old + 1, old - 1, old * 2, -old, old * 1000, 0, old / 3])
    elif isinstance(old, list) and old and r < 0.5:
        parent[key] = rng.choice([old[:-1], old + old[-1:], old[::-1], [rng.choice(ODD_VALUES)] + old[1:]])
    else:
        parent[key] = rng.choice(ODD_VALUES)


def mutate_header(data: bytes, rng) -> bytes:
    n, pairs = header(data)
    entries = [[k, dict(v)] for k, v in pairs]
    tensors = [e for e in entries if e[0] != "__metadata__"]
    t = rng.choice(tensors)
    r = rng.random()
    if r < 0.2:
        t[1]["dtype"] = rng.choice(DTYPES)
    elif r < 0.4:
        shape = list(t[1]["shape"])
        t[1]["shape"] = rng.choice([[], [0], shape[::-1], shape + [1], shape[:-1], [d * 2 for d in shape],
                                    [-1] + shape[1:], [2**40] + shape[1:], [1.5], ["4"], None,
                                    [shape[0] + 1] + shape[1:]])
    elif r < 0.65:
        a, b = t[1]["data_offsets"]
        other = rng.choice(tensors)[1]["data_offsets"]
        t[1]["data_offsets"] = rng.choice([[a + 1, b + 1], [a, b - 1], [a, b + 1], [b, a], list(other), [-1, b],
                                           [a, 2**64], [a + 2, b + 2], [a], [str(a), b], [a, b, b],
                                           [other[0], other[0] + b - a]])
    elif r < 0.75:  # a second entry of the same name, or a rename onto another tensor
        if rng.random() < 0.5:
            entries.append([t[0], dict(rng.choice(tensors)[1])])
        else:
            t[0] = rng.choice(tensors)[0]
    elif r < 0.82:
        entries.remove(t)
    elif r < 0.9:
        entries = [e for e in entries if e[0] != "__metadata__"] + [["__metadata__", rng.choice(
            [{"format": "tf"}, [], "x", {"a": 1}, {"format": "pt" * 1000}, None])]]
    else:
        body = rng.choice(["[]", "null", "1", '"x"', "{" * 2000 + "}" * 2000, '{"a": {"dtype": "F32"}}'])
        text = body.encode()
    if r < 0.9:
        text = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}").encode()
    text += b" " * (-len(text) % 8)
    new_n = len(text) if rng.random() < 0.9 else len(text) + rng.choice([-1, 1, 8, -8])
    return struct.pack("<Q", new_n % 2**64) + text + data[8 + n:]


def hf_mutations(root: Path):
    """make(rng) -> {relative name: bytes | None (removed) | ("link", target)}: the files of a mutant directory."""
    files = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    weights = files["model.safetensors"]

    def make(rng) -> dict:
        out = dict(files)
        kind = rng.random()
        if kind < 0.1:  # the header length
            m = bytearray(weights)
            (n,) = struct.unpack_from("<Q", m, 0)
            struct.pack_into("<Q", m, 0, rng.choice(EXTREMES + [n + 1, n - 1, n + 8, n - 8, len(m), len(m) - 8, 0]))
            out["model.safetensors"] = bytes(m)
        elif kind < 0.4:
            out["model.safetensors"] = mutate_header(weights, rng)
        elif kind < 0.5:  # raw bytes of the header
            m = bytearray(weights)
            (n,) = struct.unpack_from("<Q", m, 0)
            for _ in range(rng.randint(1, 6)):
                m[8 + rng.randrange(n)] = rng.choice(b'{}[]",:0123456789-eE.x\x00\xff ')
            out["model.safetensors"] = bytes(m)
        elif kind < 0.58:  # cut short
            out["model.safetensors"] = weights[:rng.randrange(len(weights))]
        elif kind < 0.72:  # a shard index
            names = list(dict(header(weights)[1]))
            weight_map = {k: "model.safetensors" for k in names if k != "__metadata__"}
            bad = rng.choice(["../model.safetensors", "/etc/hostname", "missing.safetensors", 7, None, "",
                              "sub/../model.safetensors", "link.safetensors", "model.safetensors\x00x", "."])
            r = rng.random()
            if r < 0.5:
                weight_map[rng.choice(list(weight_map))] = bad
                index = {"weight_map": weight_map}
            else:
                index = rng.choice([{"weight_map": []}, {"weight_map": "x"}, {}, [], {"weight_map": {"a": bad}},
                                    {"weight_map": weight_map | {"not.a.tensor": "model.safetensors"}}])
            out["model.safetensors.index.json"] = json.dumps(index).encode()
            if bad == "link.safetensors":
                out["link.safetensors"] = ("link", "/etc/hostname")
        elif kind < 0.92:  # config.json values
            cfg = json.loads(files["config.json"])
            for _ in range(rng.randint(1, 2)):
                _set_json_value(cfg, rng)
            out["config.json"] = json.dumps(cfg).encode()
        else:  # the tokenizer's files
            name = rng.choice([n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
                               if n in files])
            if rng.random() < 0.5:
                m = bytearray(files[name])
                for _ in range(rng.randint(1, 4)):
                    m[rng.randrange(len(m))] = rng.choice(b'{}[]",:0123456789-x\x00 ')
                out[name] = bytes(m)
            else:
                obj = json.loads(files[name])
                _set_json_value(obj, rng)
                out[name] = json.dumps(obj).encode()
        return out

    return make


def hf_check(tmp: Path):
    import gemrun

    def check(files: dict) -> str | None:
        d = tmp / "m"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for name, content in files.items():
            if isinstance(content, tuple):
                (d / name).symlink_to(content[1])
            elif content is not None:
                (d / name).write_bytes(content)
        m = gemrun.load(d, device="cpu", dtype="float32")
        return safetensors_problems(files["model.safetensors"]) or model_problems(m)

    return check


def run(family: str, count: int, seed: int, root: str | None, start: int = 0, progress: bool = False) -> dict:
    from gemrun.errors import GemrunError, InputError

    if family == "safetensors":
        limit_memory(6 << 30)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["GEMRUN_CACHE"] = tmp
            check = hf_check(Path(tmp))
            baseline = check({p.name: p.read_bytes() for p in Path(root).iterdir() if p.is_file()})
            if baseline:
                raise SystemExit(f"the unmutated directory fails the checks: {baseline}")
            return fuzz(count, seed, hf_mutations(Path(root)), check, GemrunError, 30, start, progress)
    limit_memory(MEDIA_MEMORY)
    check = media_check(family)
    for sample in media_samples(family):
        problem = check(sample)
        if problem:
            raise SystemExit(f"a valid {family} sample fails the checks: {problem}")
    return fuzz(count, seed, media_mutations(family), check, InputError, 20, start, progress)


if __name__ == "__main__":
    args, start, progress = main_args(sys.argv[1:])
    if args[0] not in FAMILIES:
        sys.exit(f"family must be one of {', '.join(FAMILIES)}")
    stats = run(args[0], int(args[1]), int(args[2]), args[3] if len(args) > 3 else None, start, progress)
    print(json.dumps(stats), flush=True)
