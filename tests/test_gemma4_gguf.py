"""Gemma 4 Unified as llama.cpp's three GGUFs (text `gemma4`, mmproj `clip` gemma4uv + gemma4ua, drafter
`gemma4-assistant`): HF -> GGUF -> logits equal to the HF directory's (text, image, audio), quantized files equal
to dequantizing their own blocks, QAT blocks reproduced, the drafter and speculative decoding, proportional RoPE
as `rope_freqs`, the tokenizer, strict refusals and GGUF -> HF back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny_gemma4 import (
    multimodal_inputs,
    reference,
    reference_assistant,
    soft_tokens,
    tiny4_vocab,
    write_tiny_dir,
)

import gemrun
from gemrun.convert import convert
from gemrun.errors import ConfigError, GemrunError, WeightsError
from gemrun.model.multimodal import media_blocks, prompt_embeddings
from gemrun.weights.gguf import GGUFFile
from gemrun.weights.names import gemma4_gguf_name, gemma4_gguf_to_gemrun

IDS = list(range(3, 40))
EXACT = 1e-5  # the issue's bound: f32 GGUF against the HF directory


@torch.no_grad()
def media_logits(m, kw):
    ids = kw["input_ids"][0]
    x = prompt_embeddings(m.model, ids, soft_tokens(m.media, kw))
    return m.model(None, m.model.make_caches(), embeds=x, blocks=media_blocks(ids, (502, 506)))[0]


def load(path, **kw):
    return gemrun.load(path, device="cpu", dtype=kw.pop("dtype", "float32"), **kw)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """The tiny reference as an HF directory (+ assistant) and as the f32 GGUF trio made by `gemrun convert`."""
    d = tmp_path_factory.mktemp("g4")
    ref = reference(seed=0)
    root = write_tiny_dir(d / "hf", ref)
    reference_assistant(seed=0).save_pretrained(d / "assistant")
    convert(root, d / "t.gguf", "f32", mmproj=d / "mm.gguf", mmproj_quant="f32", draft=(d / "assistant", d / "d.gguf"))
    return ref, d


def test_trio_f32_logits_equal_the_hf_directory(trio):
    """Text, image + video + audio prompts: the GGUF trio gives the HF directory's logits (and both the
    reference's)."""
    ref, d = trio
    hf = load(d / "hf")
    gg = load(d / "t.gguf", mmproj=d / "mm.gguf")
    text = (gg.logits(IDS) - hf.logits(IDS)).abs().max().item()
    kw = multimodal_inputs()
    media = (media_logits(gg, kw) - media_logits(hf, kw)).abs().max().item()
    print(f"f32 trio vs HF directory: text {text:.2e}, image+video+audio {media:.2e}")
    assert text <= EXACT and media <= EXACT
    assert (hf.logits(IDS) - ref(input_ids=torch.tensor([IDS])).logits[0]).abs().max() <= 1e-4
    # the mmproj's token ids are the tokenizer's; suppressed ids come from tokenizer.ggml.suppress_tokens
    assert gg.media.config == hf.media.config
    assert gg.config.suppress_token_ids == hf.config.suppress_token_ids == (505, 501)
    g = GGUFFile(d / "t.gguf").metadata
    assert g["general.architecture"] == "gemma4" and list(g["tokenizer.ggml.suppress_tokens"]) == [505, 501]
    from gemrun.weights.inspect import describe  # `gemrun info`: the header alone gives the same cache shapes

    def shapes(cfg):
        return [(s.sliding, s.head_dim, s.num_kv_heads, s.window, s.kv_source, s.k_eq_v) for s in cfg.layers]

    assert shapes(describe(d / "t.gguf").config) == shapes(gg.config)


def test_kv_sharing_variant(tmp_path):
    ref = reference(seed=3, num_kv_shared_layers=3, use_double_wide_mlp=True)
    root = write_tiny_dir(tmp_path / "hf", ref)
    convert(root, tmp_path / "t.gguf", "f32")
    meta = GGUFFile(tmp_path / "t.gguf").metadata
    assert meta["gemma4.attention.shared_kv_layers"] == 3 and list(meta["gemma4.feed_forward_length"]) == \
        [128, 128, 128, 256, 256, 256]
    gg, hf = load(tmp_path / "t.gguf"), load(root)
    assert [s.kv_source for s in gg.model.specs] == [None, None, None, 1, 1, 2]
    assert (gg.logits(IDS) - hf.logits(IDS)).abs().max() <= EXACT


@pytest.mark.parametrize("quant, qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_quantized_files_are_their_own_blocks(trio, tmp_path, quant, qtype):
    """Blocks are the reference quantizer's; loaded dense, every matrix (and the embedding) equals dequantizing its
    own blocks; loaded packed, they stay low-bit and multiply as those blocks."""
    ref, d = trio
    convert(d / "hf", tmp_path / "q.gguf", quant, mmproj=tmp_path / "mm.gguf")
    g = GGUFFile(tmp_path / "q.gguf")
    w = ref.model.language_model.layers[2].mlp.down_proj.weight.detach().numpy()
    raw = g.raw("blk.2.ffn_down.weight")
    assert g.tensors["blk.2.ffn_down.weight"].qtype == qtype
    assert np.array_equal(raw.reshape(-1), quantize(w, qtype).reshape(-1).view(np.uint8))
    dense = load(tmp_path / "q.gguf", packed=False)
    state = dense.model.state_dict()
    for name, info in g.tensors.items():
        if info.qtype not in (Q.F32, Q.F16):
            got = state[gemma4_gguf_to_gemrun(name)].numpy()
            assert np.array_equal(got, dequantize(g.raw(name), info.qtype).reshape(info.shape)), name
    assert g.tensors["token_embd.weight"].qtype == (Q.Q8_0 if quant == "q4_0" else qtype)
    # packed (the CPU kernels): the matrices stay low-bit and multiply as their blocks do (activation rounding only)
    packed = load(tmp_path / "q.gguf", dtype="auto", packed=True)
    module = packed.model.layers[2].mlp.down_proj
    assert not isinstance(module, torch.nn.Linear) and not isinstance(packed.model.embed_tokens, torch.nn.Embedding)
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
    want = x @ state["layers.2.mlp.down_proj.weight"].T
    rel = ((module(x) - want).norm() / want.norm()).item()
    print(f"{quant}: packed down_proj vs its dequantized blocks, relative error {rel:.1e}")
    assert rel < 1e-3


def _qat_weights(shape, rng):
    """Weights exactly representable as Q4_0: per block of 32 an fp16 scale d and quants q in 0..15 with one
    q = 0 (the value -8d, which makes the block's largest magnitude what the quantizer divides by -8)."""
    rows, cols = shape
    q = rng.integers(0, 16, (rows, cols // 32, 32))
    q[..., 0] = 0
    scale = rng.uniform(0.001, 0.01, (rows, cols // 32, 1)).astype(np.float16).astype(np.float32)
    return ((q - 8) * scale).reshape(rows, cols).astype(np.float32)


def test_q4_0_reproduces_qat_blocks(tmp_path):
    """A QAT checkpoint's unquantized weights (already on the Q4_0 grid) give back exactly those blocks."""
    ref = reference(seed=5)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2 and p.shape[1] % 32 == 0 and "language_model" in name:
                p.copy_(torch.from_numpy(_qat_weights(tuple(p.shape), rng)))
    root = write_tiny_dir(tmp_path / "hf", ref)
    convert(root, tmp_path / "q.gguf", "q4_0", embed_quant="q4_0")
    g = GGUFFile(tmp_path / "q.gguf")
    checked = 0
    for name, p in ref.model.language_model.named_parameters():
        if p.ndim == 2:
            gname = gemma4_gguf_name(name)
            want = dequantize(g.raw(gname), Q.Q4_0).reshape(p.shape)
            assert np.array_equal(want, p.detach().numpy()), name  # the blocks hold exactly the QAT values
            assert np.array_equal(g.raw(gname).reshape(-1), quantize(p.detach().numpy(), Q.Q4_0).reshape(-1)
                                  .view(np.uint8))
            checked += 1
    assert checked == 1 + 6 * 7 - 2  # embedding + 7 matrices per layer, no attn_v on the two global layers


@torch.no_grad()
def test_drafter_gguf_matches_hf_drafter(trio):
    """The drafter GGUF's draft logits and next hidden state equal the HF assistant's; speculative greedy
    decoding with the GGUF pair equals plain greedy and the HF pair's."""
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams
    from gemrun.weights.load import load_drafter

    _, d = trio
    target = load(d / "t.gguf")
    hf_drafter = load_drafter(d / "assistant", torch.float32, torch.device("cpu"), target.config)
    gg_drafter = load_drafter(d / "d.gguf", torch.float32, torch.device("cpu"), target.config)
    caches = target.model.make_caches(capacity=4, spare=2)
    ids = torch.tensor([IDS])
    hidden = target.model.hidden(ids, caches)[:, -1:]
    kv = {s.sliding: caches[i].view() for i, s in enumerate(target.model.specs)}
    embed = target.model.embed(torch.tensor([[7]]))
    a, ha = hf_drafter.step(embed, hidden, len(IDS), kv)
    b, hb = gg_drafter.step(embed, hidden, len(IDS), kv)
    print(f"drafter GGUF vs HF: logits {(a - b).abs().max().item():.1e}, "
          f"next hidden {(ha - hb).abs().max().item():.1e}")
    assert (a - b).abs().max() <= EXACT and (ha - hb).abs().max() <= EXACT
    params = SamplingParams(max_tokens=30, temperature=0)
    plain = list(generate_ids(target.model, IDS, params, {1}, 4096, 512, Stats()))
    runs = {}
    for label, path in (("hf", d / "assistant"), ("gguf", d / "d.gguf")):
        m = load(d / "t.gguf", draft=path, draft_tokens=3)
        stats = Stats()
        runs[label] = list(generate_ids(m.model, IDS, params, {1}, 4096, 512, stats, draft=m.draft))
        assert stats.drafted_tokens > 0
    assert runs["hf"] == runs["gguf"] == plain


@torch.no_grad()
def test_centroid_head_matches_reference(tmp_path):
    """A drafter with the centroid-narrowed head (use_ordered_embeddings) from HF and from GGUF."""
    from tiny_gemma4 import ours, patch_reference_drafting

    from gemrun.weights.load import load_drafter

    patch_reference_drafting()
    target_ref = reference(seed=0)
    types = target_ref.config.text_config.layer_types
    for kind in set(types):
        target_ref.model.language_model.layers[max(i for i, t in enumerate(types) if t == kind)] \
            .self_attn.store_full_length_kv = True
    ref = reference_assistant(seed=1, ordered=True)
    ref.save_pretrained(tmp_path / "a")
    out = target_ref(input_ids=torch.tensor([IDS]), output_hidden_states=True, return_shared_kv_states=True)
    embed = target_ref.get_input_embeddings()(torch.tensor([[9]]))
    expected = ref(inputs_embeds=torch.cat([embed, out.hidden_states[-1][:, -1:]], -1),
                   position_ids=torch.tensor([[len(IDS)]]), shared_kv_states=dict(out.shared_kv_states)).logits
    target, _ = ours(target_ref)
    caches = target.make_caches(capacity=4, spare=2)
    hidden = target.hidden(torch.tensor([IDS]), caches)[:, -1:]
    kv = {s.sliding: caches[i].view() for i, s in enumerate(target.specs)}
    hf = load_drafter(tmp_path / "a", torch.float32, torch.device("cpu"))
    got, _ = hf.step(target.embed(torch.tensor([[9]])), hidden, len(IDS), kv)
    assert (got - expected).abs().max() <= 1e-4
    root = write_tiny_dir(tmp_path / "hf", target_ref)
    convert(root, tmp_path / "t.gguf", "f32", draft=(tmp_path / "a", tmp_path / "d.gguf"))
    names = GGUFFile(tmp_path / "d.gguf").tensors
    assert names["masked_embd_ordering"].qtype == Q.I32 and names["masked_embd_centroids.weight"].shape == (8, 32)
    gg = load_drafter(tmp_path / "d.gguf", torch.float32, torch.device("cpu"))
    again, _ = gg.step(target.embed(torch.tensor([[9]])), hidden, len(IDS), kv)
    print(f"centroid head: HF vs reference {(got - expected).abs().max().item():.1e}, GGUF vs HF "
          f"{(again - got).abs().max().item():.1e}")
    assert (again - got).abs().max() <= EXACT


def test_rope_freqs_is_the_reference_proportional_rope():
    """llama.cpp's NeoX RoPE over the whole global head with frequency divisors rope_freqs (1 for the rotated
    pairs, 1e30 for the rest) is the reference's proportional RoPE: the same frequency per pair (theta^(-2i/D) for
    i < partial * D/2, then 0: at most 2.6e5 * 1e-30 rad at 256K positions) on the same pairs (i, i + D/2). Checked
    for the 12B's head (512, partial 0.25) and the tiny one (32), at positions up to 256K, in float64."""
    from gemrun.config import Gemma4TextConfig, Rope
    from gemrun.model.layers import apply_rope, rope_inv_freq
    from gemrun.weights.gguf_config import partial_from_rope_freqs, rope_freqs

    for dim in (512, 32):
        cfg = Gemma4TextConfig(global_head_dim=dim, rope_global=Rope(1e6, partial=0.25))
        factors = rope_freqs(cfg).astype(np.float64)
        assert partial_from_rope_freqs(rope_freqs(cfg), dim) == 0.25
        i = np.arange(dim // 2)
        ggml_freq = 1e6 ** (-2.0 * i / dim) / factors  # ggml_rope_ext: theta_i = p * base^(-2i/n_rot) / ff_i
        ours = rope_inv_freq(dim, cfg.rope_global).double().numpy()
        rotated = int(dim * 0.25 / 2)
        assert np.allclose(ours[:rotated], ggml_freq[:rotated], rtol=1e-6, atol=0)
        assert (ours[rotated:] == 0).all() and (ggml_freq[rotated:] < 1e-29).all()
        positions = np.array([0, 1, 7, 1000, 65_535, 262_143], dtype=np.float64)
        x = np.random.default_rng(dim).standard_normal((len(positions), dim))
        theta = positions[:, None] * ggml_freq[None, :]  # NeoX: rotate (x_i, x_{i + n/2}) by theta_i
        a, b = x[:, :dim // 2], x[:, dim // 2:]
        ggml = np.concatenate([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], -1)
        # ours as rope_cos_sin lays it out (cat(freqs, freqs)), in float64 so that only the layout is compared
        freqs = positions[:, None] * np.where(np.arange(dim // 2) < rotated, ggml_freq, 0.0)
        emb = torch.tensor(np.concatenate([freqs, freqs], -1))
        got = apply_rope(torch.tensor(x)[None, None], emb.cos(), emb.sin())[0, 0].numpy()
        assert np.abs(got - ggml).max() < 1e-12


def test_tokenizer_and_suppression(trio, tmp_path):
    _, d = trio
    g = GGUFFile(d / "t.gguf").metadata
    tokens, types = g["tokenizer.ggml.tokens"], list(g["tokenizer.ggml.token_type"])
    assert g["tokenizer.ggml.model"] == "gemma4" and g["tokenizer.ggml.add_bos_token"] is True
    assert types[tokens.index("<|channel>")] == 4 and types[tokens.index("<|image|>")] == 3  # llama.cpp's types
    assert len(g["tokenizer.ggml.merges"]) > 0
    gg, hf = load(d / "t.gguf"), load(d / "hf")
    for text in ("the cat in the hat", "  two  spaces\nand tabs\t!", "<|channel>thought"):
        assert gg.tokenizer.encode(text) == hf.tokenizer.encode(text)
    assert gg.tokenizer.encode("<|channel>") != [tokens.index("<|channel>")]  # user text never a control token
    assert gg.tokenizer.specials["<|channel>"] == tokens.index("<|channel>")
    assert gg.tokenizer.encode("hi", bos=True)[0] == 2 and gg.prompts().text("hi").ids[0] == 2  # BOS always
    # suppressed ids are never sampled, whatever their logits
    from gemrun.generate import Sequence
    from gemrun.sampling import SamplingParams

    seq = Sequence(gg.model, [2, 5, 6], SamplingParams(temperature=0), {1}, 4096, 512)
    seq.prefill_step()
    logits = torch.zeros(512)
    logits[505] = logits[501] = 100.0
    assert seq.choose(logits).id not in (505, 501)
    assert tuple(tokens.index(t) for t in ("<audio|>", "<image|>")) == (505, 501)


def test_drafter_variant_names(trio, tmp_path):
    """The other published drafter layout: `gemma4-mtp` with `mtp_pre_proj` / `mtp_post_proj` and the target width
    as `n_embd_backbone`; it drafts exactly as the llama.cpp-named file."""
    from gguf_edit import rewrite

    from gemrun.weights.load import load_drafter

    _, d = trio
    mtp = rewrite(d / "d.gguf", tmp_path / "mtp.gguf", arch="gemma4-mtp",
                  meta={"gemma4-assistant.embedding_length_out": None, "gemma4-assistant.n_embd_backbone": 64},
                  rename={"nextn.pre_projection.weight": "mtp_pre_proj.weight",
                          "nextn.post_projection.weight": "mtp_post_proj.weight"})
    names = GGUFFile(mtp)
    assert names.metadata["general.architecture"] == "gemma4-mtp" and "mtp_pre_proj.weight" in names.tensors
    a = load_drafter(d / "d.gguf", torch.float32, torch.device("cpu"))
    b = load_drafter(mtp, torch.float32, torch.device("cpu"))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_gguf_back_to_hf(trio, tmp_path):
    """GGUF trio -> HF directory (+ assistant) -> the same logits, media and drafts."""
    _, d = trio
    convert(d / "t.gguf", tmp_path / "hf", "f32", mmproj=d / "mm.gguf", draft=(d / "d.gguf", tmp_path / "a"))
    back, gg = load(tmp_path / "hf"), load(d / "t.gguf", mmproj=d / "mm.gguf")
    assert torch.equal(back.logits(IDS), gg.logits(IDS))
    kw = multimodal_inputs()
    assert (media_logits(back, kw) - media_logits(gg, kw)).abs().max() <= EXACT
    assert back.config.suppress_token_ids == (505, 501)
    from transformers import Gemma4UnifiedForConditionalGeneration

    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()  # transformers reads it
    assert (ref(input_ids=torch.tensor([IDS])).logits[0] - back.logits(IDS)).abs().max() <= 1e-4
    m = load(d / "t.gguf", draft=tmp_path / "a")
    assert m.draft is not None


def test_strict_loading(trio, tmp_path):
    """Unknown or missing tensors, wrong shapes, inconsistent per-layer arrays, mixed K=V layers, a rope_freqs
    that is not proportional RoPE: clear errors."""
    from gguf_edit import rewrite

    _, d = trio
    meta = GGUFFile(d / "t.gguf").metadata
    fewer = {k: meta[k][:-1] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    cases = {
        "unknown": (dict(add={"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)}), "not part of"),
        "vocabulary": (dict(meta=fewer), "511 tokens but token_embd.weight 512 rows"),
        "missing": (dict(drop={"blk.3.ffn_up.weight"}), "missing"),
        "shape": (dict(replace={"blk.1.attn_q_norm.weight": np.ones(8, np.float32)}), "mis-shaped"),
        "kv array": (dict(meta={"gemma4.attention.head_count_kv": [2, 4, 1, 2, 2, 1]}), "differ between layers"),
        "pattern": (dict(meta={"gemma4.attention.sliding_window_pattern": [True] * 6}), "last layer"),
        "mixed k=v": (dict(add={"blk.2.attn_v.weight": np.zeros((32, 64), np.float32)}), "attn_v"),
        "rope_freqs": (dict(replace={"rope_freqs.weight": np.full(16, 2.0, np.float32)}), "proportional"),
        "ple": (dict(meta={"gemma4.embedding_length_per_layer_input": 256}), "per-layer embeddings"),
        "arch": (dict(meta={"general.architecture": "gemma4-assistant"}), "not supported"),
    }
    for label, (edit, match) in cases.items():
        path = rewrite(d / "t.gguf", tmp_path / f"{label.replace(' ', '_')}.gguf", **edit)
        with pytest.raises(GemrunError, match=match):
            load(path)
    mm = rewrite(d / "mm.gguf", tmp_path / "mm.gguf", meta={"clip.vision.projector_type": "gemma4v"})
    with pytest.raises(WeightsError, match="gemma4uv"):
        load(d / "t.gguf", mmproj=mm)
    with pytest.raises(ConfigError, match="not a Gemma 4 drafter"):
        load(d / "t.gguf", draft=d / "t.gguf")
    # tokenizer arrays in an mmproj or a drafter go unused, but are typed as in the text model (before: any loaded)
    bad_tokens = {"tokenizer.ggml.tokens": [1, 2, 3]}
    for kind, src in (("mmproj", "mm.gguf"), ("draft", "d.gguf")):
        path = rewrite(d / src, tmp_path / f"tokens-{src}", meta=bad_tokens)
        with pytest.raises(WeightsError, match="tokenizer.ggml.tokens is missing or not an array of strings"):
            load(d / "t.gguf", **{kind: path})
    with pytest.raises(ConfigError, match="Gemma 4 model"):
        gemrun.load(None, draft=d / "d.gguf")


def test_written_independently_with_gguf_tables(trio, tmp_path):
    """A trio written here with the `gguf` package alone (tensor names from its MODEL_ARCH.GEMMA4 table, keys as
    llama.cpp spells them; the mmproj's and drafter's names as llama.cpp's constants.py spells them) loads and
    matches the HF reference: gemrun reads llama.cpp's files, not only its own."""
    from gguf_independent import write_independent

    ref, d = trio
    text, mm, dr = write_independent(ref, reference_assistant(seed=0), tmp_path, tiny4_vocab())
    gg, hf = load(text, mmproj=mm, draft=dr), load(d / "hf")
    kw = multimodal_inputs()
    gaps = ((gg.logits(IDS) - hf.logits(IDS)).abs().max().item(),
            (media_logits(gg, kw) - media_logits(hf, kw)).abs().max().item())
    print(f"independently written set vs HF directory: text {gaps[0]:.1e}, media {gaps[1]:.1e}")
    assert max(gaps) <= EXACT
    assert (gg.logits(IDS) - ref(input_ids=torch.tensor([IDS])).logits[0]).abs().max() <= 1e-4
    assert gg.draft is not None


def test_convert_cli_and_refusals(trio, tmp_path):
    import subprocess
    import sys

    _, d = trio
    out = subprocess.run([sys.executable, "-m", "gemrun.cli", "convert", str(d / "hf"), str(tmp_path / "t.gguf"),
                          "--quant", "q8_0", "--mmproj", str(tmp_path / "mm.gguf"), "--draft", str(d / "assistant"),
                          str(tmp_path / "d.gguf")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["draft"] == str(tmp_path / "d.gguf")
    assert GGUFFile(tmp_path / "d.gguf").metadata["general.architecture"] == "gemma4-assistant"
    with pytest.raises(ConfigError, match="HF directory"):
        convert(d / "t.gguf", tmp_path / "x.gguf", "f32")
    with pytest.raises(ConfigError, match="HF output"):
        convert(d / "t.gguf", tmp_path / "y", "int4-block")
    with pytest.raises(ConfigError, match="--draft SRC OUT"):
        convert(d / "assistant", tmp_path / "a.gguf", "f32")
    with pytest.raises(ConfigError, match="no image or audio"):
        write_tiny_dir(tmp_path / "textonly", reference(seed=2))
        cfg = json.loads((tmp_path / "textonly" / "config.json").read_text())
        cfg.pop("vision_config"), cfg.pop("audio_config")
        (tmp_path / "textonly" / "config.json").write_text(json.dumps(cfg))
        convert(tmp_path / "textonly", tmp_path / "z.gguf", "f32", mmproj=tmp_path / "zm.gguf")
    assert not (tmp_path / "z.gguf").exists() and not (tmp_path / "zm.gguf").exists()  # nothing left behind


def _fuzz(path, count, seed, mode, text=None, timeout=900):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gguf_fuzz.py")
    root = str(script.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(script), str(path), str(count), str(seed), mode] + ([str(text)] if text else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("count", [pytest.param(300, id="300"), pytest.param(2000, id="2000", marks=pytest.mark.slow)])
def test_mutated_headers_fail_cleanly(trio, count):
    """Mutated headers of the tiny text GGUF, mmproj and drafter, each through gemrun's whole loader in a child
    process with a 6 GiB address-space cap and a per-mutant alarm: every mutant a clean error or a valid load."""
    _, d = trio
    for file, mode in (("t.gguf", "gemma4-text"), ("mm.gguf", "gemma4-mmproj"), ("d.gguf", "gemma4-draft")):
        stats = _fuzz(d / file, count, 11, mode, d / "t.gguf")
        print(mode, {k: v for k, v in stats.items() if k != "examples"})
        assert stats["crashes"] == stats["hangs"] == stats["oom"] == 0, stats
        assert stats["rejected"] > count // 2


def test_random_set_runs_with_media_and_drafter(tmp_path):
    """make-random's Gemma 4 set (here a small config; `--preset gemma-4-12b` writes the full shape the same way):
    Q4_0 text model, f16 mmproj, Q4_0 drafter, in llama.cpp's layout; it loads packed and answers a prompt with
    an image and an audio clip, drafting."""
    import io
    import wave

    from PIL import Image

    from gemrun.weights.random import small_gemma4, write_random_gemma4_gguf

    cfg, assistant = small_gemma4(128)
    paths = write_random_gemma4_gguf(cfg, tmp_path / "t.gguf", "q4_0", mmproj=tmp_path / "mm.gguf",
                                     draft=tmp_path / "d.gguf", assistant=assistant)
    kinds = [GGUFFile(p).metadata["general.architecture"] for p in paths]
    assert kinds == ["gemma4", "clip", "gemma4-assistant"]
    assert GGUFFile(paths[0]).tensors["blk.0.attn_q.weight"].qtype == Q.Q4_0
    m = load(paths[0], dtype="auto", mmproj=paths[1], draft=paths[2])
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) * 0.1) * 8000).astype(np.int16).tobytes())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    msg = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"},
                                         {"type": "audio", "audio": buf.getvalue()}]}]
    prompt = m.chat_prompt(msg, image_tokens=70)
    assert prompt.embeds is not None and 258880 in prompt.ids and 258881 in prompt.ids
    list(m.events(prompt, gemrun.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    assert m.last_stats.generated_tokens == 6 and m.last_stats.drafted_tokens > 0
