"""Packed low-bit weights: block formats mapped exactly, kernels against dense math, the real 270M packed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import gemrun
from gemrun.quant.packed import Int4Linear, Int8Embedding, Int8Linear, int8_blocks, q4_blocks, quantize_rows_int8


def expand(q, s, m, group=32):
    return q.double() * s.double().repeat_interleave(group, 1) + m.double().repeat_interleave(group, 1)


def random_blocks(qtype, rows, cols, seed=0):
    """Random bytes in a GGUF block format with sane fp16 super-block scales (d, dmin)."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    raw[..., 0:4] = np.array([0.01, 0.02], dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1])
def test_blocks_are_exact(qtype):
    w = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    raw = quantize(w, qtype)
    want = dequantize(raw, qtype).reshape(16, 256)
    assert np.array_equal(expand(*int8_blocks(raw, qtype, 16, 256)).numpy(), want)
    if qtype in (Q.Q4_0, Q.Q4_1):
        assert np.array_equal(expand(*q4_blocks(raw, qtype, 16, 256)).numpy(), want)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K])
def test_k_blocks_are_exact(qtype):
    raw = random_blocks(qtype, 8, 512)
    assert np.array_equal(expand(*int8_blocks(raw, qtype, 8, 512)).numpy(), dequantize(raw, qtype).reshape(8, 512))


def test_q4_k_of_the_real_file(gguf_path):
    from gemrun.weights.gguf import GGUFFile

    g = GGUFFile(gguf_path)
    name = next(n for n, t in g.tensors.items() if t.qtype == Q.Q4_K)
    info = g.tensors[name]
    got = expand(*q4_blocks(g.raw(name), Q.Q4_K, *info.shape)).numpy()
    assert np.array_equal(got, dequantize(g.raw(name), Q.Q4_K).reshape(info.shape))


def test_int4_kernel_matches_dense_math():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (96, 256))
    s, m = torch.rand(96, 8) * 0.05, torch.randn(96, 8) * 0.01
    lin = Int4Linear.from_quants(q, s, m)
    w = expand(q, s.half(), m.half()).float()  # fp16 scales and mins in the kernel (bf16 in PyTorch's)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    ref = x.float() @ w.T
    assert (lin(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert lin(x[None]).shape == (1, 5, 96)


@pytest.mark.parametrize("native", [True, False])
def test_int8_modules(native, monkeypatch):
    from gemrun.quant import native as kernels

    if native and not kernels.available():
        pytest.skip("no native kernels here")
    if not native:
        monkeypatch.setattr(kernels, "supports", lambda k: False)
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    if native:  # Q8_0 groups, bit for bit the gguf package's quantizer
        deq = torch.from_numpy(dequantize(quantize(w.numpy(), Q.Q8_0), Q.Q8_0).reshape(64, 128))
    else:  # PyTorch's kernel: int8 per output row
        q, scale = quantize_rows_int8(w)
        assert (q.float() * scale.float()[:, None] - w).abs().max() <= scale.float().max() / 2 + 1e-6
        deq = q.float() * scale.float()[:, None]
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    lin = Int8Linear.from_float(w)
    assert lin.native == native
    ref = x.float() @ deq.T
    assert (lin(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    emb = Int8Embedding.from_float(w, chunk=10)
    ids = torch.tensor([[0, 5, 63]])
    assert torch.equal(emb(ids), deq[ids])
    assert (emb.project(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.skipif(not __import__("gemrun.quant.native", fromlist=["x"]).available(), reason="no native kernels")
@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1, Q.Q5_K])
def test_5bit_weights_keep_their_size_and_values(qtype):
    """Q5_0 / Q5_1 / Q5_K load as `Int5Linear`: 5 bits a value plus the scales (not 8), the values the file's
    (Q5_K: its scales rounded to fp16, as `Int8Linear` holds them), and products bit-equal to the same quants held
    8-bit: one token (the integer kernel, alone and together with another weight), a long prompt (dequantized to
    bf16), a shard of columns."""
    from gemrun.quant.packed import Int5Linear, pack_gguf, together

    n, k = 96, 512
    raw = random_blocks(qtype, n, k) if qtype == Q.Q5_K else quantize(
        np.random.default_rng(2).standard_normal((n, k)).astype(np.float32), qtype)
    lin = pack_gguf(raw, qtype, (n, k))
    assert isinstance(lin, Int5Linear)
    quants = int8_blocks(raw, qtype, n, k)
    ref = Int8Linear.from_quants(*quants)
    q, sc, mn = quants  # Q5_K's sub-scales times its super-block scale, rounded to fp16 (as `Int8Linear`)
    want = dequantize(raw, qtype).reshape(n, k) if qtype != Q.Q5_K else expand(q, sc.half(), mn.half()).numpy()
    assert np.array_equal(expand(*lin.quants()).numpy(), want)
    held = sum(b.nbytes for b in lin.buffers())
    assert held == n * k * 5 // 8 + n * (k // 32) * 2 * (1 if qtype == Q.Q5_0 else 2)  # Q5_0: no mins
    torch.manual_seed(0)
    for rows in (1, 3, 70):
        x = torch.randn(1, rows, k)
        assert torch.equal(lin(x), ref(x)), rows
    x = torch.randn(1, 1, k)
    assert torch.equal(together(x, [ref, lin])[1], ref(x))
    part = lin.narrow(1, 128, 256)
    assert torch.equal(part(x[..., 128:384]), ref.narrow(1, 128, 256)(x[..., 128:384]))


TEXT = ("The history of the river valley begins long before the first farmers arrived. For thousands of years the "
        "water carved its way through soft stone, leaving terraces that would later hold villages, orchards and "
        "roads. When the first settlers came, they found fish in abundance and soil that rewarded patient work. "
        "Over the centuries the towns grew, trade routes crossed the valley, and bridges replaced the old fords. "
        "Today visitors walk along the banks, read the weathered signs, and wonder how the landscape looked when "
        "only the river and the wind shaped it. ") * 3


@pytest.mark.skipif(not __import__("gemrun.quant.native", fromlist=["x"]).available(), reason="no native kernels")
def test_kernel_plans_follow_replaced_weights():
    """The kernels' descriptors (pointers) are made once per weight, and again after a buffer is replaced, also
    for weights that run together in one call."""
    from gemrun.quant.packed import together

    torch.manual_seed(0)
    a, b, c = (Int8Linear.from_float(torch.randn(64, 128)) for _ in range(3))
    x = torch.randn(1, 1, 128)
    first = together(x, [a, b])[0]
    assert torch.equal(first, a(x)) and a.plan(b) is a.plan(b)
    a.qweight, a.scales = c.qweight, c.scales  # a now holds c's weight
    assert torch.equal(a(x), c(x)) and not torch.equal(a(x), first)
    assert torch.equal(together(x, [a, b])[0], c(x)) and torch.equal(together(x, [b, a])[1], c(x))
    before = b(x)
    b.qweight, b.scales = c.qweight.clone(), c.scales.clone()
    assert torch.equal(together(x, [a, b])[1], c(x)) and not torch.equal(before, c(x))


def test_packed_270m_keeps_the_output(model_270m):
    """Packed weights vs the float32 dequantized path, teacher-forced (`gemrun.quality`): with float32 activations
    (the CPU default) top-1 agreement >= 99%; bf16 activations cost a few percent on their own."""
    from gemrun.quality import evaluate

    packed = gemrun.load(model_270m.loaded.path, device="cpu")  # auto: float32 over packed weights
    assert type(packed.model.embed_tokens).__name__ == "Int8Embedding"
    kinds = {type(m).__name__ for m in packed.model.modules()}
    assert {"Int4Linear", "Int8Linear"} <= kinds and "Linear" not in kinds
    ids = model_270m.tokenizer.encode(TEXT)
    exact = evaluate(packed, ids, ref=model_270m, chunk=32)  # under 64 rows: the integer kernels
    print("float32 packed", exact.as_dict())
    assert exact.top1_agreement >= 0.99 and exact.kl_mean < 5e-4
    assert abs(exact.perplexity / exact.ref_perplexity - 1) < 0.01
    weights = sum(t.nbytes for t in [*packed.model.parameters(), *packed.model.buffers()])
    assert weights < 0.3 * sum(t.nbytes for t in model_270m.model.parameters())  # vs float32
    del packed  # one model beside the reference at a time (the suite's peak RSS)
    bf16 = gemrun.load(model_270m.loaded.path, device="cpu", dtype="bfloat16")
    dense_path = evaluate(bf16, ids, ref=model_270m, chunk=64)  # 64 rows and more: dequantized tiles
    print("bf16 packed", dense_path.as_dict())
    assert dense_path.top1_agreement >= 0.95 and dense_path.kl_mean < 5e-3
    del bf16
    dense = gemrun.load(model_270m.loaded.path, device="cpu", dtype="bfloat16", packed=False)
    assert type(dense.model.embed_tokens).__name__ == "Embedding"


def test_packed_tiny_q4_gguf(tmp_path):
    from tiny import hf_model, write_gguf

    ref = hf_model(seed=13, query_pre_attn_scalar=16)
    write_gguf(tmp_path / "q4.gguf", ref, Q.Q4_0, Q.Q8_0)
    dense = gemrun.load(tmp_path / "q4.gguf", device="cpu", dtype="float32")
    packed = gemrun.load(tmp_path / "q4.gguf", device="cpu", dtype="bfloat16")
    assert type(packed.model.layers[0].self_attn.q_proj).__name__ == "Int4Linear"
    ids = list(range(3, 40))
    a, b = dense.logits(ids), packed.logits(ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_bench_cli(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gemrun.cli", "bench", "--prompt-tokens", "32", "--gen-tokens",
                          "4", "--repeat", "1", "--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["packed"] and res["prompt_tokens"] == 32 and res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0
    assert 0 < res["peak_rss_gib"] < 8


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_quantize_hf_at_load(tmp_path, kind):
    from tiny import hf_model

    from gemrun.weights.load import load_hf

    ref = hf_model(seed=14)
    ref.save_pretrained(tmp_path / "m")

    base = load_hf(tmp_path / "m", torch.float32, torch.device("cpu")).model
    quant = load_hf(tmp_path / "m", torch.bfloat16, torch.device("cpu"), quantize=kind).model
    kinds = {type(m).__name__ for m in quant.modules()}
    assert ("Int4Linear" in kinds) == (kind == "q4") and "Int8Embedding" in kinds and "Linear" not in kinds
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = base(ids, base.make_caches()).float()
        b = quant(ids, quant.make_caches()).float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    print(kind, "cosine", cos)
    assert cos > (0.9 if kind == "q4" else 0.995)  # tiny random weights: int4 groups are coarse there
    with pytest.raises(gemrun.GemrunError, match="quantize"):
        load_hf(tmp_path / "m", torch.bfloat16, torch.device("cpu"), quantize="q3")
