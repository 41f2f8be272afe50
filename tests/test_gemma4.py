"""Gemma 4 Unified decoder and media embedders against transformers' gemma4_unified (tiny random configs, float32)."""

from __future__ import annotations

import pytest
import torch
from tiny_gemma4 import multimodal_inputs, ours, reference

from gemrun.config import Gemma4TextConfig, preset
from gemrun.model.gemma4 import prompt_embeddings, vision_blocks

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return reference()


def _soft(media, kw):
    """gemrun soft tokens for the reference inputs: padding rows dropped, as get_*_features do."""
    pix, pos = kw["pixel_values"][0], kw["image_position_ids"][0]
    vpix, vpos = kw["pixel_values_videos"], kw["video_position_ids"]
    keep, vkeep = (pos != -1).all(-1), (vpos != -1).all(-1)
    return {502: media.image(pix[keep], pos[keep]), 506: media.image(vpix[vkeep], vpos[vkeep]),
            503: media.audio(kw["input_features"][0][kw["input_features_mask"][0]])}


@torch.no_grad()
def test_text_logits_match_reference(ref):
    text, _ = ours(ref)
    ids = torch.randint(3, 500, (2, 37), generator=torch.Generator().manual_seed(0))
    assert (text(ids, text.make_caches(batch=2)) - ref(input_ids=ids).logits).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("mode", ["sliding", "all"])
def test_multimodal_logits_match_both_reference_mask_paths(ref, mode):
    """"all": the reference's plain forward (image tokens bidirectional on every layer); "sliding": its generate
    path (create_masks_for_vision_model: sliding layers only, the window still applied). The image has 12 soft
    tokens, more than the window of 8, so the window clamps its block on sliding layers."""
    kw = multimodal_inputs()
    ids = kw["input_ids"]
    if mode == "all":
        expected = ref(**kw).logits
    else:
        emb = ref.model.get_input_embeddings()(ids.clamp(max=511))
        masks = ref.create_masks_for_generate(ref.config, emb, None, None, torch.arange(ids.shape[1])[None],
                                              mm_token_type_ids=kw["mm_token_type_ids"])
        expected = ref(**kw, attention_mask=masks).logits
    text, media = ours(ref, mode)
    x = prompt_embeddings(text, ids[0], _soft(media, kw))
    got = text(None, text.make_caches(), embeds=x, blocks=vision_blocks(ids[0], (502, 506)))
    assert (got - expected).abs().max() <= TOL
    other, _ = ours(ref, "all" if mode == "sliding" else "sliding")
    differs = other(None, other.make_caches(), embeds=x, blocks=vision_blocks(ids[0], (502, 506)))
    assert (differs - expected).abs().max() > 1e-2  # the two compositions really differ on this prompt


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(ref):
    """Prefill in chunks that end at block boundaries, then decode token by token: the logits equal one full
    forward of the whole sequence (text continuation appended after the media)."""
    kw = multimodal_inputs()
    text, media = ours(ref)
    ids = torch.cat([kw["input_ids"][0], torch.tensor([21, 22, 23, 24, 25, 26, 27, 28, 29, 30])])
    x = prompt_embeddings(text, ids, _soft(media, kw))
    blocks = vision_blocks(ids, (502, 506))
    full = text(None, text.make_caches(), embeds=x, blocks=blocks)
    caches = text.make_caches(capacity=4)
    n_prompt = kw["input_ids"].shape[1]
    steps = [text(None, caches, embeds=x[:, :3], blocks=blocks[:3]),
             text(None, caches, embeds=x[:, 3:n_prompt], blocks=blocks[3:n_prompt])]
    steps += [text(ids[None, i:i + 1], caches) for i in range(n_prompt, len(ids))]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL


@torch.no_grad()
def test_kv_sharing_layers_match_reference():
    """E2B-style sharing: the last layers reuse the K/V of the last earlier layer of their type (no K/V weights,
    2x MLP), and the cache keeps nothing for them."""
    ref = reference(seed=3, num_kv_shared_layers=3, use_double_wide_mlp=True)
    text, _ = ours(ref)
    assert [s.kv_source for s in text.specs] == [None, None, None, 1, 1, 2]
    assert not hasattr(text.layers[3].self_attn, "k_proj") and text.layers[3].mlp.up_proj.out_features == 256
    ids = torch.randint(3, 500, (1, 30), generator=torch.Generator().manual_seed(4))
    expected = ref(input_ids=ids).logits
    assert (text(ids, text.make_caches()) - expected).abs().max() <= TOL
    caches = text.make_caches(capacity=2)
    steps = [text(ids[:, :17], caches)] + [text(ids[:, i:i + 1], caches) for i in range(17, 30)]
    assert (torch.cat(steps, dim=1) - expected).abs().max() <= TOL
    assert sum(c.nbytes for c in caches) == sum(c.nbytes for c in caches[:3])


def test_12b_preset_kv_cache_arithmetic():
    """256K context: 40 sliding layers keep 1024 positions of 2x8x256 values, 8 global layers keep every
    position of 2x1x512 (K and V differ even though one projection makes both); bf16."""
    cfg = preset("gemma-4-12b")
    assert isinstance(cfg, Gemma4TextConfig)
    specs = cfg.layers
    assert [i for i, s in enumerate(specs) if not s.sliding] == [5, 11, 17, 23, 29, 35, 41, 47]
    assert all(s.k_eq_v and s.head_dim == 512 and s.num_kv_heads == 1 for s in specs if not s.sliding)
    expected = 40 * 1024 * 2 * 8 * 256 * 2 + 8 * 262_144 * 2 * 1 * 512 * 2
    assert cfg.kv_cache_bytes(262_144) == expected == int(4.3125 * 2**30)
    with torch.device("meta"):
        from gemrun.model.gemma4 import Gemma4

        model = Gemma4(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert 11.0e9 < params < 12.5e9  # ~11.8B with the tied embedding
