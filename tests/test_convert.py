"""`gemrun convert`: HF <-> GGUF round trips, GGUF blocks from the reference quantizers, quantized HF schemes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny import hf_model, tiny_vocab

import gemrun
from gemrun.convert import convert
from gemrun.errors import ConfigError, WeightsError
from gemrun.quant.hf import dequantize_fp8, dequantize_int4
from gemrun.weights.gguf import GGUFFile
from gemrun.weights.gguf_write import gguf_name
from gemrun.weights.names import hf_to_gemrun

IDS = list(range(5, 45))


def save_hf(model, root: Path, template: str | None = None) -> Path:
    from gemrun.tokenizer import build_backend

    model.save_pretrained(root)
    tokens, types = tiny_vocab()
    build_backend(tokens, types).save(str(root / "tokenizer.json"))
    cfg = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}
    if template:
        cfg["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


def logits(path, **kw):
    m = gemrun.load(path, device="cpu", **kw)
    return m, m.logits(IDS)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    ref = hf_model(seed=31, query_pre_attn_scalar=16)
    template = "{{ bos_token }}{{ messages[0]['content'] }}"
    return ref, save_hf(ref, tmp_path_factory.mktemp("conv") / "hf", template=template)


def test_hf_gguf_hf_round_trip_is_exact(tiny_hf, tmp_path):
    ref, root = tiny_hf
    base_m, base = logits(root, dtype="float32")
    convert(root, tmp_path / "f32.gguf", "f32")
    g = GGUFFile(tmp_path / "f32.gguf")
    assert g.metadata["general.architecture"] == "gemma3"
    assert list(g.metadata["tokenizer.ggml.tokens"]) == tiny_vocab()[0]
    assert "messages[0]" in g.metadata["tokenizer.chat_template"]
    gg_m, gg = logits(tmp_path / "f32.gguf", dtype="float32")
    assert torch.equal(gg, base)
    assert gg_m.tokenizer.encode("the cat in the hat") == base_m.tokenizer.encode("the cat in the hat")
    convert(tmp_path / "f32.gguf", tmp_path / "back", "f32")
    back_m, back = logits(tmp_path / "back", dtype="float32")
    assert torch.equal(back, base)
    assert back_m.tokenizer.chat_template == base_m.tokenizer.chat_template
    # GGUF -> HF -> GGUF keeps the tokenizer arrays
    convert(tmp_path / "back", tmp_path / "again.gguf", "f32")
    again = GGUFFile(tmp_path / "again.gguf").metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        assert list(again[key]) == list(g.metadata[key]), key


@pytest.mark.parametrize("quant, qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0), ("q5_1", Q.Q5_1), ("bf16", Q.BF16)])
def test_gguf_blocks_are_the_reference_quantizers(tiny_hf, tmp_path, quant, qtype):
    ref, root = tiny_hf
    convert(root, tmp_path / "q.gguf", quant)
    g = GGUFFile(tmp_path / "q.gguf")
    state = {hf_to_gemrun(k): v for k, v in ref.state_dict().items() if hf_to_gemrun(k)}
    w = state["layers.2.mlp.down_proj.weight"].float().numpy()
    info = g.tensors["blk.2.ffn_down.weight"]
    assert info.qtype == qtype
    assert np.array_equal(g.raw(info.name).reshape(-1), quantize(w, qtype).reshape(-1).view(np.uint8))
    emb = g.tensors["token_embd.weight"].qtype
    assert emb == (qtype if quant in ("q8_0", "bf16") else Q.Q8_0)  # 4/5-bit files keep the embedding at Q8_0
    assert g.tensors["blk.0.attn_norm.weight"].qtype == Q.F32
    # loads as exactly the dequantized reference
    m = gemrun.load(tmp_path / "q.gguf", device="cpu", dtype="float32")
    got = m.model.state_dict()["layers.2.mlp.down_proj.weight"].numpy()
    assert np.array_equal(got, dequantize(quantize(w, qtype), qtype).reshape(w.shape))


@pytest.mark.parametrize("scheme, extra, packed", [("int4-channel", [], True), ("int4-block", [], True),
                                                   ("int4-block", ["--group-size", "64"], True),
                                                   ("int4-block", ["--group-size", "16"], False),
                                                   ("fp8", [], False), ("fp8", ["--fp8-scales", "tensor"], False)])
def test_quantized_hf_schemes(tmp_path, scheme, extra, packed):
    from safetensors import safe_open

    ref = hf_model(seed=32, hidden_size=128, intermediate_size=256, head_dim=32, query_pre_attn_scalar=32)
    root = save_hf(ref, tmp_path / "hf")
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "gemrun.cli", "convert", root, out, "--quant", scheme, *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "gemrun_quant.json").read_text())
    assert meta["scheme"] == scheme and meta["kept"] == ["embed_tokens.weight"]
    # the stored tensors dequantize to a close copy of the float weight
    f = next(out.glob("*.safetensors"))
    w = ref.state_dict()["model.layers.1.mlp.up_proj.weight"].float()
    with safe_open(str(f), "pt") as st:
        if scheme == "fp8":
            q, s = st.get_tensor("model.layers.1.mlp.up_proj.weight"), st.get_tensor(
                "model.layers.1.mlp.up_proj.weight_scale")
            assert q.dtype == torch.float8_e4m3fn and s.numel() == (1 if "tensor" in extra else 256)
            deq = dequantize_fp8(q, s)
            bound = w.abs() * 2**-4 + s.float() * 2**-9  # e4m3: 3 mantissa bits, subnormals from 2^-9
        else:
            q, s = st.get_tensor("model.layers.1.mlp.up_proj.qweight"), st.get_tensor(
                "model.layers.1.mlp.up_proj.scales")
            assert q.dtype == torch.uint8 and q.shape == (256, 64)
            assert s.shape[1] == {"int4-channel": 1, "int4-block": 128 // int((extra or ["", "32"])[1])}[scheme]
            deq = dequantize_int4(q, s)
            bound = s.float().repeat_interleave(128 // s.shape[1], dim=1) * 0.5001  # half a step
        assert "model.embed_tokens.weight" in st.keys()
    assert ((deq - w).abs() <= bound).all()
    dense = gemrun.load(out, device="cpu", dtype="float32")
    assert torch.equal(dense.model.state_dict()["layers.1.mlp.up_proj.weight"], deq)
    fast = gemrun.load(out, device="cpu", dtype="auto")
    kinds = {type(m).__name__ for m in fast.model.modules()}
    assert ("Int4Linear" in kinds) == packed
    a, b = dense.logits(IDS), fast.logits(IDS)
    assert (a - b).abs().max() <= 0.01 * a.abs().max()


def test_convert_refuses_bad_requests(tiny_hf, tmp_path):
    _, root = tiny_hf

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gemrun.cli", "convert", *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    for args, msg in [((root, tmp_path / "x.gguf", "--quant", "int4-block"), "HF safetensors scheme"),
                      ((root, tmp_path / "x", "--quant", "q4_0"), "give OUT a .gguf name"),
                      ((root, tmp_path / "x", "--quant", "q3"), "HF output types"),
                      ((tmp_path / "missing", tmp_path / "x"), "does not exist"),
                      ((root, tmp_path / "y", "--quant", "int4-block", "--group-size", "48"), "group size 48"),
                      ((root, root), "differ")]:
        r = run(*args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    r = run(root, tmp_path / "e.gguf", "--quant", "q4_0", "--embed-quant", "f16")
    assert r.returncode == 0, r.stderr
    assert GGUFFile(tmp_path / "e.gguf").tensors["token_embd.weight"].qtype == Q.F16
    convert(root, tmp_path / "q4", "int4-block")
    r = run(tmp_path / "q4", tmp_path / "z.gguf", "--quant", "q8_0")
    assert r.returncode == 2 and "already quantized" in r.stderr


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration saved as an HF directory; query_pre_attn_scalar = head_dim, which
    GGUF files cannot express otherwise."""
    from tiny import hf_mm_model, save_mm_dir

    ref = hf_mm_model(seed=7)
    ref.config.text_config.query_pre_attn_scalar = 16
    for layer in ref.model.language_model.layers:
        layer.self_attn.scaling = 16**-0.5
    root = tmp_path_factory.mktemp("mm") / "hf"
    save_mm_dir(ref, root)
    return ref, root


MM_IDS = [2, 10, 500, 502, 502, 502, 502, 501, 11, 12]


def mm_outputs(m, pix):
    """(soft tokens, logits over an image prompt) through gemrun's own multimodal path."""
    from gemrun.model.multimodal import media_blocks, prompt_embeddings

    ids = torch.tensor(MM_IDS)
    with torch.no_grad():
        soft = m.vision(pix)
        embeds = prompt_embeddings(m.model, ids, {502: soft.flatten(0, 1)})
        return soft, m.model(ids[None], m.model.make_caches(), embeds=embeds, blocks=media_blocks(ids, (502,)))[0]


def test_vision_round_trips_through_mmproj(tiny_mm, tmp_path):
    """HF -> text GGUF + mmproj GGUF -> HF: in f32 the same soft tokens and logits, bit for bit; the HF directory
    written back loads in transformers and gives the reference's logits."""
    from transformers import Gemma3ForConditionalGeneration

    ref, root = tiny_mm
    pix = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    base = mm_outputs(gemrun.load(root, device="cpu", dtype="float32"), pix)
    r = subprocess.run([sys.executable, "-m", "gemrun.cli", "convert", root, tmp_path / "t.gguf", "--quant", "f32",
                        "--mmproj", tmp_path / "mm.gguf", "--mmproj-quant", "f32"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    meta = GGUFFile(tmp_path / "mm.gguf").metadata
    assert meta["general.architecture"] == "clip" and meta["clip.projector_type"] == "gemma3"
    assert meta["general.type"] == "mmproj" and meta["clip.has_vision_encoder"] and meta["clip.use_gelu"]
    assert meta["clip.vision.projection_dim"] == 64 and meta["clip.vision.block_count"] == 2
    assert meta["clip.vision.projector.scale_factor"] == 2  # 4x4 patches pooled 2x2 (Gemma 3's 64x64 by 4 omits it)
    assert "v.blk.1.attn_out.weight" in GGUFFile(tmp_path / "mm.gguf").tensors
    g = gemrun.load(tmp_path / "t.gguf", device="cpu", dtype="float32", mmproj=tmp_path / "mm.gguf")
    for a, b in zip(mm_outputs(g, pix), base):
        assert torch.equal(a, b)
    convert(tmp_path / "t.gguf", tmp_path / "back", "f32", mmproj=tmp_path / "mm.gguf")
    back = gemrun.load(tmp_path / "back", device="cpu", dtype="float32")
    assert back.vision.config.image_token_id == 502 and back.tokenizer.token_to_id("<image_soft_token>") == 502
    for a, b in zip(mm_outputs(back, pix), base):
        assert torch.equal(a, b)
    hf = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    ids = torch.tensor([MM_IDS])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pix, token_type_ids=(ids == 502).long()).logits[0]
        got = hf(input_ids=ids, pixel_values=pix, token_type_ids=(ids == 502).long()).logits[0]
    assert torch.equal(got, want)
    assert (base[1] - want).abs().max() <= 1e-4


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_mmproj_types_follow_llama_cpp(tiny_mm, tmp_path, quant):
    """Embeddings and vectors F32, the input projection F16, the attention and MLP matrices in the asked type;
    what loads is exactly the stored values."""
    _, root = tiny_mm
    convert(root, tmp_path / "t.gguf", "q8_0", mmproj=tmp_path / "mm.gguf", mmproj_quant=quant)
    g = GGUFFile(tmp_path / "mm.gguf")
    types = {n: t.qtype for n, t in g.tensors.items()}
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == types["v.blk.0.ln1.bias"] == Q.F32
    assert types["mm.input_projection.weight"] == Q.F16
    assert types["v.blk.0.ffn_down.weight"] == types["v.blk.1.attn_q.weight"] == {"f16": Q.F16, "bf16": Q.BF16,
                                                                                    "q8_0": Q.Q8_0}[quant]
    m = gemrun.load(tmp_path / "t.gguf", device="cpu", dtype="float32", mmproj=tmp_path / "mm.gguf")
    got = m.vision.state_dict()["vision_tower.encoder.layers.0.mlp.fc2.weight"]
    assert torch.equal(got, torch.from_numpy(g.load("v.blk.0.ffn_down.weight")))
    pix = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    exact = mm_outputs(gemrun.load(root, device="cpu", dtype="float32"), pix)[0]
    assert (m.vision(pix) - exact).abs().max() <= 0.05 * exact.abs().max()


@pytest.mark.parametrize("scheme", ["int4-block", "fp8", "bf16"])
def test_hf_schemes_carry_the_vision_tower(tiny_mm, tmp_path, scheme):
    """Quantized HF schemes keep the vision tower unquantized (bf16), with the multimodal config."""
    _, root = tiny_mm
    convert(root, tmp_path / "q", scheme)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and cfg["vision_config"]["hidden_size"] == 32
    base = gemrun.load(root, device="cpu", dtype="float32")
    m = gemrun.load(tmp_path / "q", device="cpu", dtype="float32")
    want = {k: v.bfloat16().float() for k, v in base.vision.state_dict().items()}
    got = m.vision.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if scheme != "bf16":
        assert json.loads((tmp_path / "q" / "gemrun_quant.json").read_text())["vision"] == "unquantized"


def test_mmproj_refusals(tiny_hf, tiny_mm, tmp_path):
    _, text_root = tiny_hf
    _, mm_root = tiny_mm
    with pytest.raises(ConfigError, match="no vision tower"):
        convert(text_root, tmp_path / "a.gguf", "q8_0", mmproj=tmp_path / "mm.gguf")
    with pytest.raises(ConfigError, match="mmproj types"):
        convert(mm_root, tmp_path / "a.gguf", "q8_0", mmproj=tmp_path / "mm.gguf", mmproj_quant="q4_0")
    with pytest.raises(ConfigError, match="HF OUT carries"):
        convert(mm_root, tmp_path / "h", "bf16", mmproj=tmp_path / "mm.gguf")
    convert(mm_root, tmp_path / "t.gguf", "f32", mmproj=tmp_path / "mm.gguf")
    with pytest.raises(ConfigError, match="used as it is"):
        convert(tmp_path / "t.gguf", tmp_path / "u.gguf", "q8_0", mmproj=tmp_path / "mm.gguf")
    with pytest.raises(WeightsError, match="clip"):
        convert(tmp_path / "t.gguf", tmp_path / "h2", "f32", mmproj=tmp_path / "t.gguf")


def q4_k_reference(x: np.ndarray) -> bytes:
    """A literal scalar transcription of llama.cpp's `quantize_row_q4_K_ref` / `make_qkx2_quants` (float32
    arithmetic in C's order) for one 256-value block: the check that the vectorized quantizer is that algorithm."""
    f = np.float32

    def nearest(v):
        return int(np.rint(v))

    def qkx2(xs, ws):
        lo, hi = min(f(0), xs.min()), xs.max()
        sum_w = sum_x = f(0)
        for xi, wi in zip(xs, ws):
            sum_w, sum_x = sum_w + wi, sum_x + wi * xi
        if hi == lo:
            return f(0), -lo
        iscale = f(15) / (hi - lo)
        scale = f(1) / iscale
        best = f(0)
        for xi, wi in zip(xs, ws):
            lv = max(0, min(15, nearest(iscale * (xi - lo))))
            best += wi * (scale * f(lv) + lo - xi) ** 2
        for step in range(21):
            iscale = (f(-1) + f(0.1) * f(step) + f(15)) / (hi - lo)
            ls = [max(0, min(15, nearest(iscale * (xi - lo)))) for xi in xs]
            sl = sl2 = sxl = f(0)
            for xi, wi, lv in zip(xs, ws, ls):
                sl, sl2, sxl = sl + wi * f(lv), sl2 + wi * f(lv) * f(lv), sxl + wi * f(lv) * xi
            det = sum_w * sl2 - sl * sl
            if det > 0:
                this_scale, this_min = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
                if this_min > 0:
                    this_scale, this_min = sxl / sl2, f(0)
                err = f(0)
                for xi, wi, lv in zip(xs, ws, ls):
                    err += wi * (this_scale * f(lv) + this_min - xi) ** 2
                if err < best:
                    best, scale, lo = err, this_scale, this_min
        return scale, -lo

    x = x.astype(f)
    fits = []
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        ws = np.sqrt(f(np.sum(xs * xs, dtype=f) / f(32))) + np.abs(xs)
        fits.append(qkx2(xs, ws))
    max_scale, max_min = max(s for s, _ in fits), max(m for _, m in fits)
    ls = [min(63, nearest(f(63) / max_scale * s)) for s, _ in fits]
    lm = [min(63, nearest(f(63) / max_min * m)) for _, m in fits]
    d, dmin = np.float16(max_scale / f(63)), np.float16(max_min / f(63))
    q = np.zeros(256, np.uint8)
    for j in range(8):
        step, off = f(d) * f(ls[j]), f(dmin) * f(lm[j])
        if step:
            q[32 * j:32 * j + 32] = [max(0, min(15, nearest((v + off) / step))) for v in x[32 * j:32 * j + 32]]
    sc = [ls[j] | (ls[j + 4] >> 4) << 6 for j in range(4)] + [lm[j] | (lm[j + 4] >> 4) << 6 for j in range(4)]
    sc += [(ls[j + 4] & 15) | (lm[j + 4] & 15) << 4 for j in range(4)]
    qs = [q[64 * c + i] | q[64 * c + 32 + i] << 4 for c in range(4) for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qs)


def test_q4_k_quantizer():
    """Our Q4_K blocks are llama.cpp's reference algorithm, decode (with the gguf package) close to the input,
    and beat Q4_1 on the same data; flat and all-positive sub-blocks decode right."""
    from gemrun.quant.q4k import quantize_q4_k

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 512)) * 0.02).astype(np.float32)
    x[0, :32] = 0  # a flat sub-block
    x[1, :256] = np.abs(x[1, :256]) + 0.05  # a block with no negative values: min 0 is not representable exactly
    x[2, 256:] *= 40  # a block of larger values next to a normal one
    blocks = quantize_q4_k(x)
    assert blocks.shape == (24, 2 * 144) and blocks.dtype == np.uint8
    # float32 sums in another order may flip a near tie: a scale step or a quant off by one in a few blocks
    diff = [int((blocks.reshape(-1, 144)[i] != np.frombuffer(q4_k_reference(x.reshape(-1, 256)[i]), np.uint8)).sum())
            for i in range(48)]
    assert sum(d == 0 for d in diff) >= 44 and max(diff) <= 4, diff
    y = dequantize(blocks, Q.Q4_K).reshape(x.shape)
    assert np.array_equal(y[0, :32], np.zeros(32, np.float32))
    err = np.abs(y - x)
    assert err.max() <= 0.07 * np.abs(x).max(axis=1, keepdims=True).max() and err[1].max() <= 0.02
    rms = np.sqrt((err[3:] ** 2).mean()) / x[3:].std()
    q41 = dequantize(quantize(x, Q.Q4_1), Q.Q4_1).reshape(x.shape)
    assert rms <= 0.075 and rms < np.sqrt(((q41 - x)[3:] ** 2).mean()) / x[3:].std()


def test_q4_k_gguf_loads_as_the_dequantized_weights(tmp_path):
    """q4_k: 256-divisible matrices Q4_K, the 128-wide o_proj Q5_0 (llama.cpp's fallback), the embedding Q8_0;
    gemrun's dense load gives the logits of the dequantized weights, the packed kernels close to them."""
    from tiny import ours_from

    from gemrun.quant.q4k import quantize_q4_k

    ref = hf_model(seed=34, hidden_size=256, intermediate_size=512, head_dim=32, query_pre_attn_scalar=32)
    root = save_hf(ref, tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "gemrun.cli", "convert", root, tmp_path / "k.gguf", "--quant", "q4_k"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    g = GGUFFile(tmp_path / "k.gguf")
    assert g.metadata["general.file_type"] == 14  # MOSTLY_Q4_K_S: Q4_K throughout
    types = {n: t.qtype for n, t in g.tensors.items()}
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_q.weight"] == Q.Q4_K
    assert types["blk.0.attn_output.weight"] == Q.Q5_0 and types["token_embd.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32
    state = {hf_to_gemrun(k): v.float() for k, v in ref.state_dict().items() if hf_to_gemrun(k)}
    w = state["layers.3.mlp.down_proj.weight"].numpy()
    assert np.array_equal(g.raw("blk.3.ffn_down.weight"), quantize_q4_k(w))
    deq = {}
    for name, t in state.items():
        q = types[gguf_name(name)]
        if q != Q.F32:
            blocks = quantize_q4_k(t.numpy()) if q == Q.Q4_K else quantize(t.numpy(), q)
            deq[name] = torch.from_numpy(dequantize(blocks, q).reshape(t.shape).astype(np.float32))
    expected_model = ours_from(ref)
    expected_model.load_state_dict(deq, strict=False)
    with torch.no_grad():
        expected = expected_model(torch.tensor([IDS]), expected_model.make_caches())[0]
    dense = gemrun.load(tmp_path / "k.gguf", device="cpu", dtype="float32", packed=False)
    assert torch.equal(dense.logits(IDS), expected)
    fast = gemrun.load(tmp_path / "k.gguf", device="cpu", dtype="auto")
    assert (fast.logits(IDS) - expected).abs().max() <= 0.01 * expected.abs().max()


def test_keep_globs_and_norms(tiny_hf, tmp_path):
    """Norms are never quantized; --keep adds matrices to the embedding kept in bf16."""
    from safetensors import safe_open

    _, root = tiny_hf
    convert(root, tmp_path / "q", "fp8", keep=("embed_tokens.weight", "layers.0.*"))
    scheme = json.loads((tmp_path / "q" / "gemrun_quant.json").read_text())
    assert scheme["kept"] == ["embed_tokens.weight"] + [n for n in scheme["kept"] if n.startswith("layers.0.")]
    assert len(scheme["kept"]) == 8 and scheme["quantized"] == 7 * 5
    with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), "pt") as st:
        dtypes = {k: st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16" and "model.layers.0.mlp.up_proj.weight_scale" \
        not in dtypes
    assert dtypes["model.layers.1.mlp.up_proj.weight"] == "F8_E4M3"
    assert {v for k, v in dtypes.items() if "norm" in k} == {"BF16"}


LLAMA_PY = Path("/opt/llamacpp-venv/bin/python")


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_PY.exists(), reason="llama-cpp-python venv not built (see benchmarks/vs_llamacpp.py)")
def test_llama_cpp_loads_our_gguf(tmp_path):
    """The real 270M, GGUF -> HF -> our Q8_0 GGUF: llama.cpp loads it and its greedy text equals gemrun's."""
    from gemrun.weights.embedded import default_model_path

    convert(default_model_path(), tmp_path / "hf", "f32")
    convert(tmp_path / "hf", tmp_path / "ours.gguf", "q8_0")
    code = ("import json,sys; from llama_cpp import Llama; m = Llama(sys.argv[1], n_ctx=256, verbose=False, "
            "n_threads=2); print(json.dumps(m.tokenize(b'The capital of France is')))")
    r = subprocess.run([str(LLAMA_PY), "-c", code, str(tmp_path / "ours.gguf")], capture_output=True, text=True,
                       timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    ids = json.loads(r.stdout.strip().splitlines()[-1])
    ours = gemrun.load(tmp_path / "ours.gguf", device="cpu", dtype="float32")
    assert ids == ours.tokenizer.encode("The capital of France is", bos=True)
    gen = ("import sys; from llama_cpp import Llama; m = Llama(sys.argv[1], n_ctx=256, verbose=False, n_threads=2);"
           "print(m('The capital of France is', max_tokens=8, temperature=0)['choices'][0]['text'])")
    r = subprocess.run([str(LLAMA_PY), "-c", gen, str(tmp_path / "ours.gguf")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = ours.generate("The capital of France is", max_tokens=8, temperature=0)
    print("llama.cpp:", repr(r.stdout), "gemrun:", repr(text))
    assert r.stdout.strip().split()[:3] == text.strip().split()[:3]  # greedy, the same words first
    shutil.rmtree(tmp_path / "hf")


# Gemma 3 configs against llama.cpp's gemma3 keys (its reader: sliding layers only with attention.sliding_window, the
# pattern from attention.sliding_window_pattern, the local base from rope.freq_base_swa, the attention scale from
# key_length): each either converts to a GGUF with the HF directory's logits, or is refused leaving no file.
_LOCAL = {"rope_type": "default", "rope_theta": 20_000.0}
_GLOBAL = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
G3_CONFIGS = {
    "query_pre_attn_scalar": (dict(query_pre_attn_scalar=24), "query_pre_attn_scalar"),
    "local_rope_base": (dict(rope_parameters={"sliding_attention": _LOCAL, "full_attention": _GLOBAL}), None),
    "all_global": (dict(layer_types=["full_attention"] * 6), None),
    "pattern_3": (dict(sliding_window_pattern=3), None),
    "irregular_layers": (dict(layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                           "sliding_attention", "full_attention", "full_attention"]), None),
    "final_softcap": (dict(final_logit_softcapping=30.0), None),
    "local_rope_scaling": (dict(rope_parameters={"sliding_attention": {**_LOCAL, "rope_type": "linear", "factor": 2.0},
                                                 "full_attention": _GLOBAL}), "sliding layers' RoPE"),
    "attn_softcap": (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
}


@pytest.mark.parametrize("case", list(G3_CONFIGS))
def test_gguf_carries_the_config_or_refuses(tmp_path, case):
    over, refusal = G3_CONFIGS[case]
    ref = hf_model(seed=7, **{"query_pre_attn_scalar": 16, **over})
    root = save_hf(ref, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    if refusal:
        with pytest.raises(ConfigError, match=refusal):
            convert(root, out, "f32")
        assert not out.exists()
        return
    _, base = logits(root, dtype="float32")
    assert (base - ref(torch.tensor([IDS])).logits[0]).abs().max() <= 1e-4  # the HF directory is read right
    convert(root, out, "f32")
    _, got = logits(out, dtype="float32")
    print(f"{case}: GGUF vs HF directory {(got - base).abs().max().item():.1e}")
    assert torch.equal(got, base)
