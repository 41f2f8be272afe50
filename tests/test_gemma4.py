"""Gemma 4 Unified decoder and media embedders against transformers' gemma4_unified (tiny random configs, float32)."""

from __future__ import annotations

import pytest
import torch
from tiny_gemma4 import multimodal_inputs, ours, reference
from tiny_gemma4 import soft_tokens as _soft

from gemrun.config import Gemma4TextConfig, preset
from gemrun.model.multimodal import media_blocks, prompt_embeddings

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return reference()


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
    got = text(None, text.make_caches(), embeds=x, blocks=media_blocks(ids[0], (502, 506)))
    assert (got - expected).abs().max() <= TOL
    other, _ = ours(ref, "all" if mode == "sliding" else "sliding")
    differs = other(None, other.make_caches(), embeds=x, blocks=media_blocks(ids[0], (502, 506)))
    assert (differs - expected).abs().max() > 1e-2  # the two compositions really differ on this prompt


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(ref):
    """Prefill in chunks that end at block boundaries, then decode token by token: the logits equal one full
    forward of the whole sequence (text continuation appended after the media)."""
    kw = multimodal_inputs()
    text, media = ours(ref)
    ids = torch.cat([kw["input_ids"][0], torch.tensor([21, 22, 23, 24, 25, 26, 27, 28, 29, 30])])
    x = prompt_embeddings(text, ids, _soft(media, kw))
    blocks = media_blocks(ids, (502, 506))
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


@torch.no_grad()
def test_drafter_step_matches_reference_assistant():
    """One MTP draft step over the target's stored K/V (sliding: the last W + 1 positions; global: all), from
    [target embedding of the new token, target's last hidden state], at the new token's position."""
    from tiny_gemma4 import ours_drafter, reference_pair

    ref_target, ref_drafter = reference_pair()
    ids = torch.randint(3, 500, (1, 21), generator=torch.Generator().manual_seed(5))  # longer than W + 1 = 9
    out = ref_target(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True)
    token = out.logits[:, -1:].argmax(-1)
    embed = ref_target.get_input_embeddings()(token)
    kv = out.shared_kv_states
    expected = ref_drafter(inputs_embeds=torch.cat([embed, out.hidden_states[-1][:, -1:]], -1),
                           position_ids=torch.tensor([[21]]), shared_kv_states=dict(kv))
    target, _ = ours(ref_target)
    drafter = ours_drafter(ref_drafter)
    caches = target.make_caches(capacity=4, spare=2)  # the ring keeps W + 2 positions, enough for the drafter
    hidden = target.hidden(ids, caches)[:, -1:]
    assert (hidden - out.hidden_states[-1][:, -1:]).abs().max() <= TOL
    target_kv = {spec.sliding: caches[i].view() for i, spec in enumerate(target.specs)}  # last of each type
    logits, nxt = drafter.step(target.embed(token), hidden, 21, target_kv)
    assert (logits - expected.logits).abs().max() <= TOL
    assert (nxt - expected.last_hidden_state).abs().max() <= TOL


def _speculative_setup():
    from tiny_gemma4 import ours_drafter, reference_pair

    ref_target, ref_drafter = reference_pair()
    target, _ = ours(ref_target)
    return target, ours_drafter(ref_drafter)


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_speculative_greedy_output_equals_plain_greedy(draft_tokens):
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams
    from gemrun.speculative import Speculator

    target, drafter = _speculative_setup()
    prompt = torch.randint(3, 500, (23,), generator=torch.Generator().manual_seed(6)).tolist()
    params = SamplingParams(max_tokens=40, temperature=0)
    plain = list(generate_ids(target, prompt, params, {1}, 4096, 512, Stats(), chunk=8))
    stats = Stats()
    fast = list(generate_ids(target, prompt, params, {1}, 4096, 512, stats, chunk=8,
                             draft=Speculator(drafter, draft_tokens)))
    assert fast == plain and len(plain) == 40
    assert stats.drafted_tokens > 0 and 0 <= stats.accepted_tokens <= stats.drafted_tokens
    print(f"draft {draft_tokens}: acceptance rate {stats.acceptance_rate:.2f} "
          f"({stats.accepted_tokens}/{stats.drafted_tokens})")


def test_speculative_greedy_accepts_a_drafter_that_agrees():
    """A drafter whose proposals are the target's own next tokens is always accepted (rate 1.0), and the cache
    rewind/acceptance bookkeeping still yields the plain output."""
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams
    from gemrun.speculative import Speculator

    target, drafter = _speculative_setup()
    prompt = [5, 6, 7, 8, 9, 10, 11]
    params = SamplingParams(max_tokens=13, temperature=0)
    plain = list(generate_ids(target, prompt, params, set(), 4096, 512, Stats()))

    class Oracle(Speculator):
        def draft(self, model, seq, hidden, k):
            done = len(seq.tokens)
            return plain[done:done + k], [None] * k

    stats = Stats()
    assert list(generate_ids(target, prompt, params, set(), 4096, 512, stats, draft=Oracle(drafter, 4))) == plain
    assert stats.drafted_tokens > 0 and stats.acceptance_rate == 1.0


def test_speculative_sampling_rule_keeps_the_target_distribution():
    from gemrun.sampling import speculative_choice

    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(20_000):
        draft = int(torch.multinomial(q, 1, generator=gen))
        counts[speculative_choice(p, q, draft, gen)] += 1
    assert (counts / counts.sum() - p).abs().max() < 0.015
    assert counts[4] == 0  # never a token the target rules out


def test_speculative_sampling_runs_and_stops_on_length():
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams
    from gemrun.speculative import Speculator

    target, drafter = _speculative_setup()
    params = SamplingParams(max_tokens=25, temperature=0.8, top_k=20, seed=3)
    stats = Stats()
    out = list(generate_ids(target, [2, 40, 41, 42], params, set(), 4096, 512, stats, draft=Speculator(drafter, 4)))
    assert len(out) == 25 and stats.finish_reason == "length" and all(0 <= t < 512 for t in out)


@torch.no_grad()
def test_hf_directory_loads_strictly(ref, tmp_path):
    """save_pretrained output (hub names: model.vision_embedder.*, model.embed_vision.embedding_projection) loads
    through the strict loader, media embedders included; a drafter directory loads too."""
    from tiny_gemma4 import reference_pair

    from gemrun.errors import WeightsError
    from gemrun.weights.load import load_checkpoint, load_drafter

    ref.save_pretrained(tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m", torch.float32, torch.device("cpu"))
    assert loaded.media is not None and loaded.vision is None
    kw = multimodal_inputs()
    x = prompt_embeddings(loaded.model, kw["input_ids"][0], _soft(loaded.media, kw))
    emb = ref.model.get_input_embeddings()(kw["input_ids"].clamp(max=511))
    masks = ref.create_masks_for_generate(ref.config, emb, None, None, torch.arange(emb.shape[1])[None],
                                          mm_token_type_ids=kw["mm_token_type_ids"])
    got = loaded.model(None, loaded.model.make_caches(), embeds=x, blocks=media_blocks(kw["input_ids"][0], (502, 506)))
    assert (got - ref(**kw, attention_mask=masks).logits).abs().max() <= TOL
    _, ref_drafter = reference_pair()
    ref_drafter.save_pretrained(tmp_path / "d")
    drafter = load_drafter(tmp_path / "d", torch.float32, torch.device("cpu"))
    assert drafter.pre_projection.weight.shape == (32, 128)
    with pytest.raises(WeightsError, match="not a Gemma 4 assistant"):
        load_drafter(tmp_path / "m", torch.float32, torch.device("cpu"))
