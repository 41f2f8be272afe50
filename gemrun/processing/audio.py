"""Audio in, for Gemma 4 Unified (encoder-free): decode WAV/FLAC/OGG/MP3 from untrusted sources, mix to mono, resample
to 16 kHz, and cut into 640-sample frames, one soft token per 40 ms, as transformers'
`Gemma4UnifiedAudioFeatureExtractor`."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..formats.messages import MediaSlot
from .source import LOCAL, Sources, read_source

__all__ = ["AudioLimits", "ProcessedAudio", "decode_audio", "waveform_frames", "process_audio"]

SAMPLE_RATE = 16_000
SAMPLES_PER_TOKEN = 640  # 40 ms at 16 kHz
FORMATS = ("WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3")  # soundfile's names; anything else libsndfile reads is refused
MAX_SAMPLE = float(2**31)  # the largest magnitude a sample may have (int32 PCM's scale; float audio is within 1)
_BLOCK = 1 << 16  # frames decoded at a time, so memory follows the real length, never a header's claim


@dataclass(frozen=True)
class AudioLimits:
    """What one audio input may be. 30 s is the processor's documented cap of 750 soft tokens (`audio_seq_length`)."""

    max_seconds: float = 30.0
    max_bytes: int = 50 << 20
    max_rate: int = 384_000
    max_channels: int = 32

    @property
    def max_tokens(self) -> int:
        return math.ceil(self.max_seconds * SAMPLE_RATE / SAMPLES_PER_TOKEN)


@dataclass(frozen=True)
class ProcessedAudio:
    """`features` (n, 640) float32 frames of the 16 kHz mono waveform (the last zero-padded); `mask` (n,) bool, all
    True for one input (the reference's `input_features_mask`, needed by its forward)."""

    features: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def slot(self) -> MediaSlot:
        return MediaSlot("audio", int(self.mask.sum()))


def decode_audio(data: bytes, limits: AudioLimits = AudioLimits()) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, sample rate) of encoded WAV/FLAC/OGG/MP3 bytes; channels are averaged. The declared
    and the decoded lengths are both checked against `limits.max_seconds`."""
    import soundfile as sf  # here, not at the top: a text-only process need not map libsndfile

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format not in FORMATS:
                raise InputError(f"audio format {f.format} is not one of {', '.join(FORMATS)}")
            rate, channels = f.samplerate, f.channels
            if not 1 <= rate <= limits.max_rate or not 1 <= channels <= limits.max_channels:
                raise InputError(f"audio with {channels} channels at {rate} Hz is refused (at most "
                                 f"{limits.max_channels} channels, 1..{limits.max_rate} Hz)")
            max_frames = int(limits.max_seconds * rate)
            if f.frames > max_frames:
                raise InputError(f"audio of {f.frames / rate:.1f} s is longer than the limit of "
                                 f"{limits.max_seconds:g} s")
            blocks, n = [], 0
            while block := len(chunk := f.read(_BLOCK, dtype="float32", always_2d=True)):
                n += block
                if n > max_frames:
                    raise InputError(f"audio is longer than the limit of {limits.max_seconds:g} s")
                blocks.append(chunk.mean(axis=1, dtype=np.float32))
    except InputError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError, OverflowError) as e:
        raise InputError(f"audio cannot be decoded (WAV, FLAC, OGG or MP3 expected): {e}") from None
    if n == 0:
        raise InputError("audio has no samples")
    return np.concatenate(blocks), rate


def waveform_frames(wave: np.ndarray, rate: int, limits: AudioLimits = AudioLimits()) -> ProcessedAudio:
    """Frames of a mono waveform at `rate` Hz: resampled to 16 kHz (soxr 'HQ'), zero-padded to a multiple of 640 and
    reshaped to (n, 640), as `Gemma4UnifiedAudioFeatureExtractor` does with a 16 kHz array. Non-finite samples
    become 0 (one NaN would otherwise poison the frame's RMSNorm); samples past any PCM scale (2^31: float data of a
    corrupt file, up to 3e38) are refused, as resampling and the RMSNorm would overflow on them."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise InputError("audio has no samples")
    if wave.size > limits.max_seconds * rate:
        raise InputError(f"audio of {wave.size / rate:.1f} s is longer than the limit of {limits.max_seconds:g} s")
    wave = np.nan_to_num(wave, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.abs(wave).max())
    if peak > MAX_SAMPLE:
        raise InputError(f"audio samples reach {peak:.3g}, past any PCM scale ({MAX_SAMPLE:.3g}): a corrupt file")
    if rate != SAMPLE_RATE:
        import soxr

        samples = wave.size
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
        # the length was checked at the source rate; resampling may round it up by a sample past the cap
        wave = wave[: int(limits.max_seconds * SAMPLE_RATE)]
        if wave.size == 0:  # one sample at 48 kHz is none at 16 kHz: no frame, no soft token to hold the audio
            raise InputError(f"audio of {samples} sample(s) at {rate} Hz is shorter than one sample at 16 kHz")
    n = -(-wave.size // SAMPLES_PER_TOKEN)
    padded = np.zeros(n * SAMPLES_PER_TOKEN, dtype=np.float32)
    padded[: wave.size] = wave
    return ProcessedAudio(torch.from_numpy(padded.reshape(n, SAMPLES_PER_TOKEN)), torch.ones(n, dtype=torch.bool))


def process_audio(source, limits: AudioLimits = AudioLimits(), sources: Sources = LOCAL) -> ProcessedAudio:
    """Frames of an audio clip from any source `source.read_source` takes (bytes, a `data:` URL, an OpenAI
    `input_audio` object, a path). Anything malformed, empty or past `limits` raises InputError."""
    wave, rate = decode_audio(read_source(source, "audio", limits.max_bytes, sources), limits)
    return waveform_frames(wave, rate, limits)
