"""Gemma 3 vision: preprocessing equal to the reference, tiny multimodal parity, prompt assembly, image input
hardening, the image cache."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import hf_mm_model, save_mm_dir

import gemrun
from gemrun.errors import InputError
from gemrun.formats import MediaSlot
from gemrun.formats.gemma3 import expand_images, image_sequence
from gemrun.generate import Prompt, Stats, generate_ids, prefill
from gemrun.model.multimodal import media_blocks
from gemrun.processing.image import ImageConfig, load_image, preprocess, to_rgb
from gemrun.processing.source import Sources
from gemrun.sampling import SamplingParams


def slots(crops: list[int], tokens: int) -> list[MediaSlot]:
    """Prompt slots of images with these numbers of Pan & Scan crops."""
    return [MediaSlot("image", tokens, c) for c in crops]


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


@pytest.mark.parametrize("size", [(896, 896), (300, 200), (1000, 300), (257, 1100), (2000, 512), (64, 64),
                                  (1, 1), (1, 300), (5000, 600), (640, 480), (799, 1203)])
def test_pixels_equal_reference_processor(size):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ref = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = random_image(*size, seed=size[0])
    for pas in (False, True):
        out = ref(img, return_tensors="np", do_pan_and_scan=pas, pan_and_scan_min_crop_size=256,
                  pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
        mine = preprocess(to_rgb(img), ImageConfig(), pas)
        assert mine.shape == out["pixel_values"].shape and mine.shape[0] - 1 == out["num_crops"][0]
        assert np.array_equal(mine, out["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_modes_convert_like_reference(mode):
    from transformers.image_transforms import convert_to_rgb

    img = random_image(40, 30, mode="RGBA" if mode in ("RGBA", "LA") else "RGB")
    img = img.convert(mode) if mode != "I;16" else img.convert("L").convert("I;16")
    expected = np.asarray(convert_to_rgb(img, return_numpy=True))
    assert np.array_equal(np.asarray(to_rgb(img)), expected)


def tiny_inputs(ids: list[int], n_images: int, seed: int = 0):
    pix = torch.randn(n_images, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    ids_t = torch.tensor(ids)
    return ids_t, pix, (ids_t == 502).long()


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    ref = hf_mm_model(seed=1)
    root = tmp_path_factory.mktemp("mm") / "tiny-mm"
    save_mm_dir(ref, root)
    return ref, gemrun.load(root, device="cpu")


IMG = [500, 502, 502, 502, 502, 501]


@pytest.mark.parametrize("ids,n", [([2, 10, 11, *IMG, 12, 13, 14, 15], 1),
                                   ([2, 10, *IMG, 11, 12, *IMG, 13, *IMG, 14, 15, 16, 17, 18, 19, 20, 21], 3)])
def test_tiny_multimodal_logits_match_reference(mm, ids, n):
    from gemrun.model.multimodal import prompt_embeddings

    ref, m = mm
    ids_t, pix, tt = tiny_inputs(ids, n)
    with torch.no_grad():
        expected = ref(input_ids=ids_t[None], pixel_values=pix, token_type_ids=tt[None]).logits[0]
        ref_features = ref.model.get_image_features(pix).pooler_output
        soft = m.vision(pix)
        assert (soft - ref_features).abs().max().item() <= 1e-5  # vision embeddings
        embeds = prompt_embeddings(m.model, ids_t, {502: soft.flatten(0, 1)})
        blocks = media_blocks(ids_t, (502,))
        got = m.model(ids_t[None], m.model.make_caches(), embeds=embeds, blocks=blocks)[0]
        assert (expected - got).abs().max().item() <= 1e-4
        for chunk in (3, 5, 64):  # prefill chunks never split an image block
            last = prefill(m.model, Prompt(ids, embeds, blocks), m.model.make_caches(), chunk)
            assert (expected[-1] - last).abs().max().item() <= 1e-4
        # bidirectional attention inside an image matters: without blocks the logits differ
        plain = m.model(ids_t[None], m.model.make_caches(), embeds=embeds)[0]
        assert (expected - plain).abs().max().item() > 1e-3


def test_tiny_multimodal_greedy_matches_reference_generate(mm):
    from gemrun.model.multimodal import prompt_embeddings

    ref, m = mm
    ids = [2, 10, *IMG, 11, 12, *IMG, 13]
    ids_t, pix, tt = tiny_inputs(ids, 2, seed=3)
    with torch.no_grad():
        out = ref.generate(input_ids=ids_t[None], pixel_values=pix, token_type_ids=tt[None], max_new_tokens=12,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        embeds = prompt_embeddings(m.model, ids_t, {502: m.vision(pix).flatten(0, 1)})
    got = list(generate_ids(m.model, Prompt(ids, embeds, media_blocks(ids_t, (502,))),
                            SamplingParams(temperature=0, max_tokens=12), set(), 512, 512, Stats()))
    assert got == out[0, len(ids):].tolist()


def test_chat_with_images_end_to_end(mm, tmp_path):
    """The API path: template -> placeholders -> expansion -> ids, soft tokens from real image files."""
    ref, m = mm
    a, b = random_image(80, 60, 1), random_image(33, 90, 2)
    (tmp_path / "a.png").write_bytes(png(a))
    url = "data:image/jpeg;base64," + base64.b64encode(png(b, "JPEG", quality=95)).decode()
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "a.png")},
                                         {"type": "text", "text": "what"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
    prompt = m.chat_prompt(msgs)
    assert prompt.ids.count(500) == 2 and prompt.ids.count(502) == 8 and prompt.ids.count(501) == 2
    # the reference model given the same ids and pixels from the reference processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    proc = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    jpeg = Image.open(io.BytesIO(base64.b64decode(url.split(",")[1])))
    pix = torch.from_numpy(proc([a, jpeg], return_tensors="np")["pixel_values"])
    ids_t = torch.tensor(prompt.ids)
    with torch.no_grad():
        expected = ref(input_ids=ids_t[None], pixel_values=pix, token_type_ids=(ids_t == 502).long()[None]).logits
        got = m.model(ids_t[None], m.model.make_caches(), embeds=prompt.embeds, blocks=prompt.blocks)
    assert (expected - got).abs().max().item() <= 1e-4
    text = m.chat(msgs, temperature=0, max_tokens=5)
    assert isinstance(text, str) and m.last_stats.prompt_tokens == len(prompt.ids)


def test_same_image_is_encoded_once(mm):
    _, m = mm
    img = random_image(50, 50, 9)
    calls = []
    handle = m.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "a"}]}]
        m.chat_prompt(msgs)
        msgs += [{"role": "assistant", "content": "b"},
                 {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "c"}]}]
        m.chat_prompt(msgs)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_placeholders_must_match_images(mm):
    with pytest.raises(InputError, match="2 image placeholders for 1 images"):
        expand_images("<start_of_image><start_of_image>", slots([0], 4))
    assert expand_images("a<start_of_image>b", slots([0], 2)) == "a" + image_sequence(2) + "b"
    with_crops = expand_images("<start_of_image>", slots([2], 1))
    assert with_crops.startswith("Here is the original image \n\n<start_of_image>")
    _, m = mm
    msgs = [{"role": "user", "content": "spelled <start_of_image> in text"}]
    assert 500 not in m.chat_prompt(msgs).ids  # text can never create a placeholder


def test_image_input_hardening(tmp_path):
    # a tiny PNG whose header declares 50,000 x 50,000 pixels is refused before decoding
    import zlib

    for side in (50_000, 8_000):  # past PIL's own bomb limit, and past ours only
        bomb = bytearray(png(Image.new("L", (1, 1))))
        bomb[16:24] = side.to_bytes(4, "big") + side.to_bytes(4, "big")
        bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # a valid IHDR
        assert len(bomb) < 1024
        t0 = time.monotonic()
        with pytest.raises(InputError, match="refused"):
            load_image(bytes(bomb))
        assert time.monotonic() - t0 < 1
    good = png(random_image(64, 64))
    for bad in (good[: len(good) // 2], b"", b"not an image at all", b"GIF89a" + b"\x00" * 10):
        with pytest.raises(InputError):
            load_image(bad)
    with pytest.raises(InputError, match="remote"):
        load_image("https://example.com/cat.png")
    with pytest.raises(InputError, match="base64"):
        load_image("data:image/png;base64,@@@")
    (tmp_path / "in").mkdir()
    (tmp_path / "out.png").write_bytes(good)
    with pytest.raises(InputError, match="outside"):
        load_image(str(tmp_path / "out.png"), Sources(root=tmp_path / "in"))
    with pytest.raises(InputError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"))
    assert load_image(png(Image.new("RGB", (1, 1)))).size == (1, 1)
    thin = load_image(png(Image.new("L", (1, 65535))))
    assert thin.size == (1, 65535) and preprocess(thin, ImageConfig(), True).shape == (1, 3, 896, 896)


def test_gif_first_frame_and_exif_orientation():
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)
    img = random_image(40, 20, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = load_image(png(img, "JPEG", exif=exif))
    assert rotated.size == (20, 40)


def test_text_only_model_refuses_images(model_270m):
    with pytest.raises(InputError, match="text-only"):
        model_270m.chat([{"role": "user", "content": [{"type": "image", "image": b"x"},
                                                      {"type": "text", "text": "hi"}]}])


def test_gguf_text_plus_mmproj(tmp_path):
    """A text GGUF with a llama.cpp-style mmproj GGUF gives the same model as the HF directory (the projection is
    F16 in llama.cpp's f16 mmproj files; rounded here so that any mmproj type compares alike)."""
    from gguf import GGUFReader
    from tiny import write_mm_gguf

    from gemrun.errors import WeightsError

    ref = hf_mm_model(seed=4)
    with torch.no_grad():
        ref.model.multi_modal_projector.mm_input_projection_weight.copy_(
            ref.model.multi_modal_projector.mm_input_projection_weight.half().float())
    write_mm_gguf(ref, tmp_path / "text.gguf", tmp_path / "mmproj.gguf")
    r = GGUFReader(tmp_path / "mmproj.gguf")
    assert r.fields["general.architecture"].contents() == "clip"
    m = gemrun.load(tmp_path / "text.gguf", device="cpu", mmproj=tmp_path / "mmproj.gguf")
    assert m.vision.config.image_token_id == 502 and m.vision.config.mm_tokens_per_image == 4
    ref.config.text_config.query_pre_attn_scalar = 16
    for layer in ref.model.language_model.layers:
        layer.self_attn.scaling = 16 ** -0.5
    ids = [2, 10, *IMG, 11, 12]
    ids_t, pix, tt = tiny_inputs(ids, 1, seed=5)
    with torch.no_grad():
        expected = ref(input_ids=ids_t[None], pixel_values=pix, token_type_ids=tt[None]).logits[0]
        from gemrun.model.multimodal import prompt_embeddings

        embeds = prompt_embeddings(m.model, ids_t, {502: m.vision(pix).flatten(0, 1)})
        got = m.model(ids_t[None], m.model.make_caches(), embeds=embeds, blocks=media_blocks(ids_t, (502,)))[0]
    assert (expected - got).abs().max().item() <= 1e-4
    with pytest.raises(WeightsError, match="clip"):
        gemrun.load(tmp_path / "text.gguf", device="cpu", mmproj=tmp_path / "text.gguf")


@pytest.fixture(scope="module")
def mm_gguf_pair(tmp_path_factory):
    from tiny import write_mm_gguf

    d = tmp_path_factory.mktemp("mmproj")
    write_mm_gguf(hf_mm_model(seed=4), d / "text.gguf", d / "mmproj.gguf", quant="f16")
    return d / "text.gguf", d / "mmproj.gguf"


@pytest.mark.parametrize("key, value, match", [
    ("clip.vision.patch_size", 0, "clip.vision.patch_size = 0: must be an integer"),
    ("clip.vision.embedding_length", 2**32 - 32, "clip.vision.embedding_length = 4294967264"),
    ("clip.vision.projector.scale_factor", 0, "clip.vision.projector.scale_factor = 0"),
    ("clip.vision.attention.layer_norm_epsilon", -1.0, "layer_norm_epsilon = -1.0: must be a finite number"),
    ("clip.vision.attention.layer_norm_epsilon", float("nan"), "layer_norm_epsilon = nan"),
    # unused by the mmproj loader, but typed as in a text GGUF (before: any value loaded)
    ("tokenizer.ggml.tokens", [1, 2, 3], "tokenizer.ggml.tokens is missing or not an array of strings"),
])
def test_mmproj_metadata_is_type_and_range_checked(mm_gguf_pair, tmp_path, key, value, match):
    """Each key of a Gemma 3 mmproj is checked for type and range, the error naming it. Before (found by the mmproj
    fuzz of benchmarks/hardening_pass.py): a patch size or scale factor of 0 escaped as ZeroDivisionError, a 2^32
    width as torch's RuntimeError, and a negative or NaN epsilon loaded (NaN image embeddings)."""
    from gguf_edit import rewrite

    from gemrun.errors import ConfigError, WeightsError

    text, mmproj = mm_gguf_pair
    bad = rewrite(mmproj, tmp_path / "bad.gguf", meta={key: value})
    with pytest.raises((ConfigError, WeightsError), match=match):
        gemrun.load(text, device="cpu", mmproj=bad)


@pytest.mark.parametrize("pas", [False, True])
def test_prompt_ids_equal_reference_processor(gguf_path, hf_tokenizer_270m, pas):
    """Gemma3Processor with the real 262k vocabulary (+ <image_soft_token>) and the official template: the same
    ids (the processor's text path adds a second <bos>, facts trap 13; we compare without it) and the same
    pixel values, with and without Pan & Scan."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from gemrun.formats import GEMMA3_TEMPLATE, render_prompt
    from gemrun.tokenizer import from_gguf_metadata
    from gemrun.weights.gguf import GGUFFile

    tok = hf_tokenizer_270m
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]}, replace_extra_special_tokens=False)
    for name, t in (("image_token", "<image_soft_token>"), ("boi_token", "<start_of_image>"),
                    ("eoi_token", "<end_of_image>")):
        setattr(tok, name, t)
        setattr(tok, name + "_id", tok.convert_tokens_to_ids(t))
    ip = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=256)
    imgs = [random_image(1000, 300, 1), random_image(200, 200, 2)]
    msgs = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A test."}]},
            {"role": "user", "content": [{"type": "text", "text": "And\n"}, {"type": "image"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    out = proc(text=text, images=imgs, return_tensors="np", do_pan_and_scan=pas, pan_and_scan_min_crop_size=256,
               pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    expected = out["input_ids"][0].tolist()
    assert expected[:2] == [2, 2]

    ours_tok = from_gguf_metadata(GGUFFile(gguf_path).metadata, image_token=True)
    assert ours_tok.token_to_id("<image_soft_token>") == 262144
    ours_msgs = [{**m, "content": [p if p["type"] == "text" else {"type": "image", "image": img}
                                   for p, img in zip(m["content"], [imgs[0] if i == 1 else imgs[1]] * 2)]}
                 for i, m in enumerate(msgs)]
    sources: list = []
    rendered = render_prompt(ours_tok, ours_msgs, images=sources)
    pixels = [preprocess(to_rgb(i), ImageConfig(), pas) for i in imgs]
    ids = ours_tok.encode_template(expand_images(rendered, slots([p.shape[0] - 1 for p in pixels], 256)))
    assert ids == expected[1:]
    assert np.array_equal(np.concatenate(pixels), out["pixel_values"])
    assert int((torch.tensor(ids) == 262144).sum()) == int(out["token_type_ids"].sum())


def test_checkpoint_name_variants():
    from gemrun.weights.names import hf_to_gemrun, hf_vision_to_gemrun

    for name in ("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",  # original hub files
                 "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
                 "model.vision_tower.encoder.layers.3.mlp.fc1.weight",  # transformers 5.x in memory
                 "vision_tower.encoder.layers.3.mlp.fc1.weight"):  # transformers 5.23 save_pretrained
        assert hf_vision_to_gemrun(name) == "vision_tower.encoder.layers.3.mlp.fc1.weight"
        assert hf_to_gemrun(name) is None
    for name in ("multi_modal_projector.mm_soft_emb_norm.weight",
                 "model.multi_modal_projector.mm_soft_emb_norm.weight"):
        assert hf_vision_to_gemrun(name) == "multi_modal_projector.mm_soft_emb_norm.weight"
    assert hf_vision_to_gemrun("vision_tower.vision_model.head.probe") is None
    for name in ("language_model.model.layers.0.mlp.up_proj.weight",
                 "model.language_model.layers.0.mlp.up_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        assert hf_to_gemrun(name) == "layers.0.mlp.up_proj.weight"


def test_webp_and_bmp_decode():
    img = random_image(30, 20, 5)
    for fmt in ("WEBP", "BMP"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        assert np.array_equal(np.asarray(load_image(png(img, fmt, **kw))), np.asarray(img))
