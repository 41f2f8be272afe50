"""Small media files made on the fly: audio clips (soundfile) and videos (PyAV), for the media tests and the media
fuzz (tests/input_fuzz.py)."""

from __future__ import annotations

import io

import numpy as np


def stereo(seconds: float, rate: int) -> np.ndarray:
    """(samples, 2) float32: a 440 Hz tone and noise."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.5 * np.stack([np.sin(2 * np.pi * 440 * t), 0.3 * noise], axis=1)).astype(np.float32)


def encode_audio(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_video(n: int = 40, fps: int = 10, width: int = 64, height: int = 48, container: str = "mp4",
               codec: str = "libx264", audio_rate: int | None = 44_100, audio_codec: str = "aac") -> bytes:
    """A small video of a moving square, with a stereo tone track when `audio_rate` is set."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as c:
        video = c.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if audio_rate:
            track = c.add_stream(audio_codec, rate=audio_rate)
            track.layout = "stereo"
        for i in range(n):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 2] = 40
            x = (i * 3) % (width - 12)
            img[10:22, x:x + 12] = (255, 200, 30)
            for p in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in video.encode():
            c.mux(p)
        if audio_rate:
            wave = stereo(n / fps, audio_rate).T.copy()
            size = track.codec_context.frame_size or 1024
            for s in range(0, wave.shape[1], size):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, s:s + size]), format="fltp",
                                               layout="stereo")
                f.sample_rate, f.pts = audio_rate, s
                for p in track.encode(f):
                    c.mux(p)
            for p in track.encode():
                c.mux(p)
    return buf.getvalue()
