"""Gemma 4 Unified media processing against transformers' reference processors: images at every soft-token budget,
audio frames from WAV/FLAC/OGG/MP3, sampled video frames with timestamps and audio, prompt expansion and
mm_token_type_ids; and untrusted inputs failing with InputError."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision")  # the reference processors need it (conftest.py lets it import beside this torch)

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from media_samples import encode_audio, make_video, stereo  # noqa: E402
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (  # noqa: E402
    Gemma4UnifiedAudioFeatureExtractor,
)
from transformers.models.gemma4_unified.image_processing_gemma4_unified import (  # noqa: E402
    Gemma4UnifiedImageProcessor,
    get_aspect_ratio_preserving_size,
)
from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor  # noqa: E402
from transformers.models.gemma4_unified.video_processing_gemma4_unified import (  # noqa: E402
    Gemma4UnifiedVideoProcessor,
)
from transformers.video_utils import VideoMetadata, load_video  # noqa: E402

from gemrun.errors import InputError  # noqa: E402
from gemrun.formats.gemma4 import expand_media  # noqa: E402
from gemrun.processing.audio import AudioLimits, process_audio  # noqa: E402
from gemrun.processing.gemma4 import (  # noqa: E402
    SOFT_TOKEN_BUDGETS,
    VideoLimits,
    mm_token_type_ids,
    process_image,
    process_video,
    target_size,
)
from gemrun.processing.source import Sources, input_audio_bytes  # noqa: E402

BUDGETS = SOFT_TOKEN_BUDGETS


# ---------------------------------------------------------------------------------------------------------- images
def _noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_ref():
    return Gemma4UnifiedImageProcessor()


# (height, width): square, landscape, portrait, tiny, extreme both ways, one row, and one already at its target size
SIZES = [(64, 64), (480, 640), (640, 480), (5, 3), (100, 2000), (2000, 100), (1, 300), (384, 384)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_matches_reference(image_ref, size, budget):
    img = _noise_image(*size)
    ref = image_ref(img, max_soft_tokens=budget, return_tensors="pt")
    ours = process_image(img, max_soft_tokens=budget)
    assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_values.shape[1] == 48 * 48 * 3
    values, positions = ours.padded(budget)
    # bit-equal: the same uint8 bicubic-antialias kernel and the same float32 rescale as the reference
    assert torch.equal(values, ref["pixel_values"][0])
    assert torch.equal(positions, ref["image_position_ids"][0])


def test_target_size_matches_reference_and_facts():
    for h in (1, 7, 48, 100, 333, 480, 896, 1080, 4000):
        for w in (1, 9, 64, 300, 640, 1024, 1920, 2000, 65535):
            for budget in BUDGETS:
                assert target_size(h, w, budget) == get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3)
    assert target_size(896, 896) == (768, 768)
    assert target_size(1080, 1920) == (576, 1056)
    assert target_size(1080, 1920, 1120) == (1200, 2112)
    assert target_size(100, 2000) == (144, 3552)
    assert target_size(480, 640, 70) == (336, 432)  # 7 x 9 = 63 soft tokens
    with pytest.raises(InputError, match="max_soft_tokens"):
        target_size(64, 64, 100)


@pytest.mark.parametrize("size, budget", [((64, 64), 70), ((480, 640), 140), ((90, 40), 280), ((1, 300), 70)])
def test_image_geometry_comes_from_the_checkpoint(size, budget):
    """A checkpoint whose vision_config has other patch_size / pooling_kernel_size (the tiny reference's 4 and 2:
    8-px model patches of 192 values) is processed with them, equal to the reference processor set up the same way
    (before: 48-px patches of 6912 values whatever the checkpoint, then a RuntimeError in its first LayerNorm)."""
    from gemrun.model.gemma4 import Gemma4Media, MediaConfig
    from gemrun.processing.gemma4 import Gemma4Inputs
    from gemrun.processing.source import MediaRequest

    media = Gemma4Media(MediaConfig(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=1120), 64)
    inputs = Gemma4Inputs(media)
    img = _noise_image(*size, seed=5)
    ref = Gemma4UnifiedImageProcessor(patch_size=4, pooling_kernel_size=2)(img, max_soft_tokens=budget,
                                                                            return_tensors="pt")
    ours = inputs.prepare("image", img, MediaRequest(image_tokens=budget))
    assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
    values, positions = ours.padded(budget)
    assert torch.equal(values, ref["pixel_values"][0]) and values.shape[-1] == 8 * 8 * 3
    assert torch.equal(positions, ref["image_position_ids"][0])
    assert inputs.embed([ours])[258880].shape == (ours.num_soft_tokens, 64)


def test_image_patches_are_48px_hwc_blocks_in_raster_order():
    # an image already at its target size (336 x 432 at 70 tokens) is not resized: patches are its exact blocks
    img = _noise_image(336, 432, seed=3)
    ours = process_image(img, max_soft_tokens=70)
    assert ours.num_soft_tokens == 7 * 9
    pixels = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    for k, (x, y) in enumerate(ours.positions.tolist()):
        assert (x, y) == (k % 9, k // 9)
        block = pixels[y * 48:(y + 1) * 48, x * 48:(x + 1) * 48]
        np.testing.assert_array_equal(ours.pixel_values[k].numpy(), block.reshape(-1))


def test_image_sources_and_bad_images(tmp_path):
    img = _noise_image(50, 70, seed=1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    path = tmp_path / "a.png"
    path.write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    expected = process_image(img, 140).pixel_values
    for source in (png, path, str(path), url):
        assert torch.equal(process_image(source, 140).pixel_values, expected)
    with pytest.raises(InputError, match="max_soft_tokens"):
        process_image(img, 300)
    with pytest.raises(InputError):
        process_image(png[: len(png) // 2])
    with pytest.raises(InputError):
        process_image(b"not an image at all")
    with pytest.raises(InputError, match="remote"):
        process_image("https://example.com/a.png")


# ----------------------------------------------------------------------------------------------------------- audio
@pytest.fixture(scope="module")
def audio_ref():
    return Gemma4UnifiedAudioFeatureExtractor()


def _reference_frames(audio_ref, data: bytes) -> torch.Tensor:
    """The reference feature extractor fed the same 16 kHz mono array (mixdown and soxr are our choice)."""
    x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = x.mean(axis=1, dtype=np.float32)
    if rate != 16_000:
        mono = soxr.resample(mono, rate, 16_000, quality="HQ")
    out = audio_ref(mono, return_tensors="pt")
    assert bool(out["input_features_mask"].all())
    return out["input_features"][0]


@pytest.mark.parametrize("fmt,subtype", [("WAV", "FLOAT"), ("WAV", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"),
                                         ("MP3", None)])
def test_audio_44k_stereo_matches_reference(audio_ref, fmt, subtype):
    data = encode_audio(stereo(1.37, 44_100), 44_100, fmt, subtype)
    ours = process_audio(data)
    ref = _reference_frames(audio_ref, data)
    assert ours.features.shape == ref.shape and ours.num_tokens == ref.shape[0]
    assert torch.equal(ours.features, ref)
    assert ours.mask.dtype == torch.bool and bool(ours.mask.all())


def test_audio_16k_mono_is_framed_without_resampling(audio_ref, tmp_path):
    wave = stereo(0.5, 16_000)[:, 0]  # 8000 samples: 12.5 frames -> 13, the last zero-padded
    data = encode_audio(wave, 16_000, "WAV", "FLOAT")
    ours = process_audio(data)
    ref = audio_ref(wave, return_tensors="pt")["input_features"][0]
    assert ours.num_tokens == 13 and torch.equal(ours.features, ref)
    assert torch.equal(ours.features.reshape(-1)[:8000], torch.from_numpy(wave))
    assert not ours.features.reshape(-1)[8000:].any()
    # the same audio as a path, a data: URL and OpenAI's input_audio (base64 + format)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for source in (path, str(path), "data:audio/wav;base64," + b64, input_audio_bytes(b64, "wav")):
        assert torch.equal(process_audio(source).features, ours.features)


def test_audio_duration_cap():
    exact = process_audio(encode_audio(np.zeros(30 * 16_000, np.float32), 16_000, "WAV"))
    assert exact.num_tokens == 750 == AudioLimits().max_tokens  # the processor's audio_seq_length
    with pytest.raises(InputError, match="30 s"):
        process_audio(encode_audio(np.zeros(30 * 16_000 + 1, np.float32), 16_000, "WAV"))
    with pytest.raises(InputError, match="longer than the limit of 1 s"):
        process_audio(encode_audio(stereo(1.37, 44_100), 44_100, "FLAC"), AudioLimits(max_seconds=1))
    ogg = encode_audio(stereo(1.37, 44_100), 44_100, "OGG")
    assert process_audio(ogg, AudioLimits(max_seconds=1.5)).num_tokens == 35


def _wav_header(channels: int, rate: int, data_bytes: int, bits: int = 16) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_bytes))


def test_bad_audio_is_refused():
    good = encode_audio(stereo(0.5, 44_100), 44_100, "WAV", "PCM_16")
    bad = {
        "random bytes": b"\x00\x01garbage" * 50,
        "truncated header": good[:30],
        "zero length": encode_audio(np.zeros((0, 1), np.float32), 16_000, "WAV"),
        "zero channels": _wav_header(0, 16_000, 64) + bytes(64),
        "zero rate": _wav_header(1, 0, 64) + bytes(64),
        "empty": b"",
        "not a format we take": encode_audio(np.zeros(100, np.float32), 16_000, "AIFF"),
    }
    for name, data in bad.items():
        with pytest.raises(InputError):
            process_audio(data)
            pytest.fail(name)
    with pytest.raises(InputError, match="larger than"):
        process_audio(good, AudioLimits(max_bytes=1000))
    with pytest.raises(InputError, match="format"):
        input_audio_bytes(base64.b64encode(good).decode(), "aiff")
    with pytest.raises(InputError, match="base64"):
        input_audio_bytes("@@@", "wav")
    with pytest.raises(InputError, match="remote"):
        process_audio("http://example.com/a.wav")


def test_lying_and_truncated_audio():
    # a header declaring 4 GB of samples over 64 real bytes: decoded as what is there, never allocated from the claim
    assert process_audio(_wav_header(1, 16_000, 0xFFFFFF00) + bytes(64)).num_tokens == 1
    # a file cut mid-data gives the samples that are there
    good = encode_audio(stereo(1.0, 16_000), 16_000, "WAV", "PCM_16")
    cut = process_audio(good[: len(good) // 2])
    assert 0 < cut.num_tokens < process_audio(good).num_tokens
    # NaN and infinite samples become 0, so one bad sample cannot poison a frame
    wave = np.ones(1280, np.float32)
    wave[[5, 700]] = [np.nan, np.inf]
    out = process_audio(encode_audio(wave, 16_000, "WAV", "FLOAT"))
    assert bool(torch.isfinite(out.features).all()) and out.features[0, 5] == 0 and out.features[1, 60] == 0


def test_audio_samples_past_any_pcm_scale_are_refused():
    """Float samples of a corrupt file (3e38) overflowed the resampler into NaN frames (found by the WAV fuzz of
    benchmarks/hardening_pass.py); loud samples within int32 PCM's scale still give finite frames."""
    wave = stereo(0.2, 48_000)
    wave[100, 0] = 3e38
    with pytest.raises(InputError, match="past any PCM scale"):
        process_audio(encode_audio(wave, 48_000, "WAV", "FLOAT"))
    wave[100, 0] = 2e9
    assert bool(torch.isfinite(process_audio(encode_audio(wave, 48_000, "WAV", "FLOAT")).features).all())


def test_audio_shorter_than_one_16k_sample_is_refused():
    """One sample at 48 kHz resamples to none at 16 kHz: before, it gave (0, 640) frames, an audio clip of no soft
    tokens (found by the FLAC fuzz of benchmarks/hardening_pass.py); two samples still give one frame."""
    with pytest.raises(InputError, match="1 sample.* at 48000 Hz is shorter than one sample at 16 kHz"):
        process_audio(encode_audio(np.full((1, 1), 0.5, np.float32), 48_000, "FLAC", "PCM_16"))
    assert process_audio(encode_audio(np.full((2, 1), 0.5, np.float32), 48_000, "FLAC", "PCM_16")).num_tokens == 1


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_audio_mutants_never_crash(fmt):
    good = encode_audio(stereo(0.3, 22_050), 22_050, fmt)
    rng = np.random.default_rng(1)
    outcomes = set()
    for i in range(40):
        data = bytearray(good)
        # half the mutants hit the header, where counts, rates and chunk sizes live
        span = 64 if i % 2 else len(data)
        for pos in rng.integers(0, span, size=rng.integers(1, 6)):
            data[pos] = rng.integers(0, 256)
        try:
            out = process_audio(bytes(data))
            assert out.features.shape[1] == 640 and bool(torch.isfinite(out.features).all())
            outcomes.add("decoded")
        except InputError:
            outcomes.add("refused")
    assert outcomes  # every mutant either decoded to finite frames or was refused cleanly


# ----------------------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def video_ref():
    return Gemma4UnifiedVideoProcessor()


def _all_frames(data: bytes) -> tuple[np.ndarray, float]:
    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return np.stack(frames), float(c.streams.video[0].average_rate)


def _check_against_reference(ours, ref):
    values, positions = ours.padded(70)
    assert ours.num_soft_tokens == int(ref["num_soft_tokens_per_video"][0])
    assert ours.num_frames == int(ref["num_frames_per_video"][0])
    assert torch.equal(values, ref["pixel_values_videos"])
    assert torch.equal(positions, ref["video_position_ids"])
    meta = ref["video_metadata"][0]
    assert list(ours.frame_indices) == list(meta.frames_indices)
    assert ours.timestamps == meta.timestamps


def test_video_matches_reference(video_ref, tmp_path):
    data = make_video(n=40)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    # the reference's own PyAV decoder, all frames, then its processor samples 32 of them
    frames, meta = load_video(str(path), backend="pyav",
                              sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames))
    ref = video_ref(frames, video_metadata=meta, return_tensors="pt", return_metadata=True)
    ours = process_video(path)
    _check_against_reference(ours, ref)
    assert ours.num_frames == 32 and ours.num_soft_tokens == 63  # 64x48 -> 336x432 -> 7 x 9
    assert ours.frame_indices[:6] == (0, 1, 2, 3, 5, 6) and ours.fps == 10.0
    assert ours.timestamp_strings[-1] == "00:03"
    assert torch.equal(process_video(data).pixel_values, ours.pixel_values)


def test_video_audio_track(audio_ref):
    data = make_video(n=40, audio_rate=44_100)
    ours = process_video(data)
    # the track decoded independently with PyAV, mixed down and resampled, through the reference extractor
    with av.open(io.BytesIO(data)) as c:
        planes = [f.to_ndarray() for f in c.decode(audio=0)]
    mono = np.concatenate(planes, axis=1).mean(axis=0, dtype=np.float32)
    ref = audio_ref(soxr.resample(mono, 44_100, 16_000, quality="HQ"), return_tensors="pt")["input_features"][0]
    assert torch.equal(ours.audio.features, ref)
    assert abs(ours.audio.num_tokens - 100) <= 2  # 4 s = 100 frames, give or take the AAC priming
    assert process_video(data, audio=False).audio is None
    assert process_video(make_video(n=40, audio_rate=None)).audio is None
    with pytest.raises(InputError, match="audio=False"):
        process_video(data, audio_limits=AudioLimits(max_seconds=2))


def test_video_matroska_counts_frames(video_ref):
    # Matroska has no frame count in its header (the reference's PyAV reader fails on it): frames are counted
    data = make_video(n=45, container="matroska", audio_rate=None)
    frames, fps = _all_frames(data)
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps, height=48, width=64)
    ref = video_ref(frames, video_metadata=meta, return_tensors="pt", return_metadata=True)
    _check_against_reference(process_video(data), ref)


def test_video_short_and_long(video_ref):
    short = make_video(n=20, audio_rate=None)
    frames, fps = _all_frames(short)
    with pytest.raises(ValueError, match="exceeds"):  # the reference refuses fewer frames than it samples ...
        video_ref(frames, video_metadata=VideoMetadata(total_num_frames=20, fps=fps), return_tensors="pt")
    ours = process_video(short)  # ... gemrun takes them all
    assert ours.frame_indices == tuple(range(20))
    # 1 fps over 70 s: minutes in the timestamps, and the prompt the reference's replace_video_token writes
    slow = process_video(make_video(n=70, fps=1, audio_rate=None), num_frames=8)
    assert slow.frame_indices == (0, 8, 17, 26, 35, 43, 52, 61)
    assert slow.timestamp_strings == ["00:00", "00:08", "00:17", "00:26", "00:35", "00:43", "00:52", "01:01"]
    meta = VideoMetadata(total_num_frames=70, fps=1.0, frames_indices=list(slow.frame_indices))
    ref_text = Gemma4UnifiedProcessor.replace_video_token(
        _reference_processor(), {"num_soft_tokens_per_video": [63], "video_metadata": [meta]}, 0)
    assert expand_prompt("<|video|>", videos=[slow]) == ref_text
    assert ref_text.startswith("00:00 <|image><|video|>") and " 01:01 <|image>" in ref_text


def test_bad_video_is_refused(tmp_path):
    good = make_video(n=40, audio_rate=None)
    png = io.BytesIO()
    _noise_image(8, 8).save(png, format="PNG")
    bad = {
        "random bytes": b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4,
        "truncated": good[: len(good) // 3],
        "a PNG": png.getvalue(),
        "empty": b"",
        "an HLS playlist": b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",
    }
    for name, data in bad.items():
        with pytest.raises(InputError):
            process_video(data)
            pytest.fail(name)
    with pytest.raises(InputError, match="longer than the limit"):
        process_video(good, limits=VideoLimits(max_seconds=2))
    with pytest.raises(InputError, match="pixels"):
        process_video(good, limits=VideoLimits(max_pixels=1000))
    with pytest.raises(InputError, match="larger than"):
        process_video(good, limits=VideoLimits(max_bytes=1000))
    with pytest.raises(InputError, match="num_frames"):
        process_video(good, num_frames=33)
    with pytest.raises(InputError, match="max_soft_tokens"):
        process_video(good, max_soft_tokens=71)
    with pytest.raises(InputError, match="outside the allowed"):
        (tmp_path / "v.mp4").write_bytes(good)
        process_video(tmp_path / "v.mp4", sources=Sources(root=tmp_path / "elsewhere"))


def test_undecodable_codecs_are_refused():
    """A sample entry naming a codec FFmpeg has no decoder for leaves the stream without a codec context; before,
    an AttributeError escaped process_video (found by the MP4 fuzz of benchmarks/hardening_pass.py)."""
    data = make_video(n=8)
    video = data.find(b"avc1", data.find(b"stsd"))
    with pytest.raises(InputError, match="codec cannot be decoded"):
        process_video(data[:video] + b"zzzz" + data[video + 4:])
    no_audio_codec = data
    for box in (b"mp4a", b"esds"):  # the sample entry and the descriptor FFmpeg would also guess AAC from
        at = no_audio_codec.find(box, data.find(b"stsd", video))
        no_audio_codec = no_audio_codec[:at] + b"zzzz" + no_audio_codec[at + 4:]
    with pytest.raises(InputError, match="audio track's codec cannot be decoded"):
        process_video(no_audio_codec)
    assert process_video(no_audio_codec, audio=False).num_frames == 8


def test_video_mutants_never_crash():
    good = make_video(n=12, audio_rate=None)
    rng = np.random.default_rng(2)
    for _ in range(25):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 6)):
            data[pos] = rng.integers(0, 256)
        try:
            out = process_video(bytes(data))
            assert out.pixel_values.shape[-1] == 6912
        except InputError:
            pass


# ------------------------------------------------------------------------------------------------ prompt expansion
def _reference_processor() -> Gemma4UnifiedProcessor:
    """The reference processor's text side without a tokenizer: its replace_* and create_mm_token_type_ids only
    read these attributes."""
    p = Gemma4UnifiedProcessor.__new__(Gemma4UnifiedProcessor)
    attrs = dict(image_token="<|image|>", video_token="<|video|>", audio_token="<|audio|>", boi_token="<|image>",
                 eoi_token="<image|>", boa_token="<|audio>", eoa_token="<audio|>", image_token_id=258880,
                 video_token_id=258884, audio_token_id=258881)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def expand_prompt(text, images=(), audios=(), videos=()):
    """The prompt text of processed items, through their slots."""
    return expand_media(text, [item.slot for item in (*images, *audios, *videos)])


def test_expand_prompt_matches_reference(image_ref, audio_ref, video_ref):
    ref = _reference_processor()
    img_a, img_b = _noise_image(40, 64), _noise_image(300, 100, seed=5)
    images = [process_image(img_a, 70), process_image(img_b, 70)]
    wave = stereo(0.3, 16_000)[:, 0]
    audios = [process_audio(encode_audio(wave, 16_000, "WAV", "FLOAT"))]
    data = make_video(n=40, audio_rate=None)
    videos = [process_video(data)]

    image_inputs = image_ref([img_a, img_b], max_soft_tokens=70, return_tensors="pt")
    audio_inputs = audio_ref([wave], return_tensors="pt")
    frames, fps = _all_frames(data)
    video_inputs = video_ref(frames, video_metadata=VideoMetadata(total_num_frames=40, fps=fps),
                             return_tensors="pt", return_metadata=True)
    text = ("<bos><|turn>user\nCompare <|image|> with <|image|>, listen to <|audio|> and watch <|video|>.<turn|>\n"
            "<|turn>model\n")
    expected = ref.get_text_with_replacements(
        [text],
        images_replacements=[ref.replace_image_token(image_inputs, i) for i in range(2)],
        videos_replacements=[ref.replace_video_token(video_inputs, 0)],
        audio_replacements=[ref.replace_audio_token(audio_inputs, 0)],
    )[0][0]
    ours = expand_prompt(text, images=images, audios=audios, videos=videos)
    assert ours == expected
    assert ours.count("<|image|>") == 60 + images[1].num_soft_tokens and ours.count("<|audio|>") == 8
    assert ours.count("<|video|>") == 32 * 63 and "<|audio><|audio|>" in ours and "00:03 <|image><|video|>" in ours

    with pytest.raises(InputError, match="2 <\\|image\\|> placeholders for 1 items"):
        expand_prompt(text, images=images[:1], audios=audios, videos=videos)
    with pytest.raises(InputError, match="<\\|audio\\|>"):
        expand_prompt("no placeholders", audios=audios)


def test_mm_token_type_ids_match_reference():
    ids = [2, 255999, 258880, 258880, 258882, 10, 256000, 258881, 258883, 255999, 258884, 258882, 258883, 7]
    expected = _reference_processor().create_mm_token_type_ids([ids])[0]
    assert mm_token_type_ids(ids) == expected == [0, 0, 1, 1, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0]
    batch = torch.tensor([ids, ids[::-1]])
    out = mm_token_type_ids(batch)
    assert out.dtype == torch.long and out.shape == batch.shape
    assert out[1].tolist() == expected[::-1]
    assert mm_token_type_ids([1, 502, 506, 503], image_token_id=502, video_token_id=506, audio_token_id=503) == \
        [0, 1, 2, 3]


def test_media_decoders_load_only_when_media_come():
    """FFmpeg (PyAV), libsndfile and soxr cost a text-only process ~17 MB of RSS: loading a model must not map
    them (they are imported where audio or video is decoded)."""
    import subprocess
    import sys

    code = ("import sys, gemrun.api, gemrun.server.app, gemrun.cli.run\n"
            "print(sorted(m for m in ('av', 'soundfile', 'soxr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
