"""The AVX-512 VNNI kernels (gemrun/quant/q4q8.c) against float64 math; the PyTorch fallback they replace."""

from __future__ import annotations

import pytest
import torch

from gemrun.quant import native, packed

pytestmark = pytest.mark.skipif(not native.available(), reason="CPU without AVX-512 VNNI or no C compiler")


def q4_case(n=96, k=640, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, k // 32, generator=g) * 0.05).half()
    m = (-8 * s.float() + torch.randn(n, k // 32, generator=g) * 0.01).half()
    w = q.double() * s.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)
    return native.pack_nibbles(q), s, m, w


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 70])
def test_q4_matches_float64(rows):
    nib, s, m, w = q4_case()
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(rows))
    ref = x.double() @ w.T
    got = native.q4_mm(x, nib, s, m)
    # two int8 levels per activation (~14 bits) below 64 rows; bf16 dense matmul from 64 rows on
    tol = 1e-4 if rows < native.DENSE_ROWS else 1e-2
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 6, 70])
def test_q8_matches_float64(rows):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (80, 1152), generator=g)
    s = (torch.rand(80, 36, generator=g) * 0.01).half()
    m = (-128 * s.float() + torch.randn(80, 36, generator=g) * 0.01).half()
    w = q.double() * s.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)
    x = torch.randn(rows, 1152, generator=g) * 3
    ref = x.double() @ w.T
    got = native.q8_mm(x, native.q8_reorder(q), s, m)
    tol = 1e-4 if rows < native.DENSE_ROWS else 1e-2
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()


def test_a_row_gets_the_same_bits_in_any_batch():
    nib, s, m, _ = q4_case(seed=2)
    x = torch.randn(7, 640)
    batch = native.q4_mm(x, nib, s, m)
    for i in range(7):
        assert torch.equal(native.q4_mm(x[i:i + 1], nib, s, m)[0], batch[i])


def test_embedding_lookup_undoes_the_kernel_layout():
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    w = torch.randn(300, 640)
    emb = packed.Int8Embedding.from_float(w, chunk=64)
    assert emb.native and emb.qweight.dtype == torch.uint8
    ids = torch.tensor([[0, 7, 299]])
    want = dequantize(quantize(w.numpy(), Q.Q8_0), Q.Q8_0).reshape(300, 640)  # Q8_0, bit for bit
    assert np.array_equal(emb(ids)[0].numpy(), want[ids[0].numpy()])


def test_q4_0_embedding_stays_4_bit():
    """A Q4_0 token table loads as `Int4Embedding`: half an 8-bit table's bytes, lookups the file's values bit for
    bit, the head the product of those values (as the 8-bit table of the same values gives it), row shards too."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    w = torch.randn(300, 640)
    raw = quantize(w.numpy(), Q.Q4_0)
    emb = packed.Int4Embedding.of(packed.repacked(raw, Q.Q4_0, (300, 640), packed.Int4Linear))
    as8 = packed.Int8Embedding.from_parts(300, 640, [packed.int8_module(raw, Q.Q4_0, (300, 640))])
    assert emb.nibbles.nbytes == as8.qweight.nbytes // 2
    want = dequantize(raw, Q.Q4_0).reshape(300, 640)
    ids = torch.tensor([[0, 7, 299], [5, 5, 1]])
    assert np.array_equal(emb(ids).numpy(), want[ids.numpy()])
    x = torch.randn(2, 640)
    ref = x.double() @ torch.from_numpy(want).double().T
    assert (emb.project(x).double() - ref).abs().max() < 1e-3 * ref.abs().max()
    assert (emb.project(x) - as8.project(x)).abs().max() < 1e-4 * ref.abs().max()
    shard = emb.narrow(0, 100, 50)
    assert isinstance(shard, packed.Int4Embedding) and np.array_equal(shard(torch.tensor([0, 49])).numpy(),
                                                                       want[[100, 149]])


def test_pytorch_fallback_agrees(monkeypatch):
    """Where the kernels are unavailable the modules use PyTorch's int4/int8 kernels with bf16 activations."""
    q = torch.randint(0, 16, (64, 640))
    s, z = torch.rand(64, 20) * 0.05, torch.randn(64, 20) * 0.01
    fast = packed.Int4Linear.from_quants(q, s, z)
    monkeypatch.setattr(native, "supports", lambda k: False)
    slow = packed.Int4Linear.from_quants(q, s, z)
    assert fast.native and not slow.native
    x = torch.randn(2, 640, dtype=torch.bfloat16)
    a, b = fast(x).float(), slow(x).float()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


@pytest.mark.parametrize("bits, zero", [(4, 8), (8, 128), (8, 16)])
def test_symmetric_formats_keep_no_minimum(bits, zero):
    """Q4_0 / Q8_0 / Q5_0 (min = -zero * scale): no fp16 minimum is stored, and the products stay exact."""
    g = torch.Generator().manual_seed(bits + zero)
    q = torch.randint(0, 16 if bits == 4 else 32 if zero == 16 else 256, (72, 640), generator=g)
    s = (torch.rand(72, 20, generator=g) * 0.05).half().float()
    w = (q.double() - zero) * s.double().repeat_interleave(32, 1)
    lin = (packed.Int4Linear if bits == 4 else packed.Int8Linear).from_quants(q, s, -zero * s)
    assert lin.mins is None and lin.zero == zero
    for rows in (1, 5, 70):
        x = torch.randn(rows, 640, generator=g)
        ref = x.double() @ w.T
        tol = 1e-4 if rows < native.DENSE_ROWS else 1e-2
        assert (lin(x).double() - ref).abs().max() <= tol * ref.abs().max()


def test_q4_0_reads_the_files_bytes():
    """A Q4_0 matrix packed for the kernels is as large as in the GGUF file (18 bytes per 32 weights)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    raw = quantize(np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32), Q.Q4_0)
    lin = packed.pack_gguf(raw, Q.Q4_0, (64, 512))
    assert lin.mins is None and sum(b.nbytes for b in lin.buffers()) == raw.nbytes


@pytest.mark.parametrize("qtype_name, k", [("Q4_0", 128), ("Q4_0", 640), ("Q4_0", 1152), ("Q8_0", 640),
                                           ("Q8_0", 3840)])
def test_repacking_the_files_blocks_equals_the_reference_packing(qtype_name, k):
    """Q4_0 / Q8_0 blocks repacked in one native pass hold the same bytes as the numpy unpacking followed by the
    lane-order packing (every chunk size: 4, 8 and 16 groups), and refuse a non-finite scale."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    qtype = Q[qtype_name]
    raw = quantize(np.random.default_rng(k).standard_normal((70, k)).astype(np.float32), qtype)
    fast = packed.pack_gguf(raw, qtype, (70, k))
    cls = packed.Int4Linear if qtype == Q.Q4_0 else packed.Int8Linear
    blocks = packed.q4_blocks if qtype == Q.Q4_0 else packed.int8_blocks
    slow = cls.from_quants(*blocks(raw, qtype, 70, k))
    assert fast.zero == slow.zero and fast.mins is None and slow.mins is None
    for name in ("nibbles", "qweight", "scales"):
        if hasattr(slow, name):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    bad = raw.copy()
    bad[3, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="non-finite"):
        packed.pack_gguf(bad, qtype, (70, k))


def test_embedding_slices_of_mixed_kinds_keep_minimums():
    """An embedding made of slices, some symmetric and some not, stores mins for all of them."""
    w = torch.randn(64, 128)
    sym = packed.Int8Linear.from_float(w[:32])
    q, s = torch.randint(0, 256, (32, 128)), torch.rand(32, 4) * 0.01
    asym = packed.Int8Linear.from_quants(q, s, torch.randn(32, 4) * 0.01)
    emb = packed.Int8Embedding.from_parts(64, 128, [sym, asym])
    assert sym.mins is None and emb.mins is not None
    ids = torch.arange(64)
    assert torch.allclose(emb(ids), torch.cat([sym.weight_rows(ids[:32]), asym.weight_rows(ids[:32])]), atol=1e-3)


def test_matrices_together_equal_each_alone_in_any_batch():
    """Several packed weights on one input (one kernel call) give each weight's own outputs, bit for bit, and a
    row's outputs do not depend on the batch (weight rows are worked on 4 at a time at M=1, 2 at M=2, 1 above)."""
    g = torch.Generator().manual_seed(3)
    s = torch.rand(37, 20, generator=g) * 0.05
    mods = [packed.Int4Linear.from_quants(torch.randint(0, 16, (37, 640), generator=g), s, -8 * s),
            packed.Int8Linear.from_quants(torch.randint(0, 256, (6, 640), generator=g), s[:6], torch.rand(6, 20) * 0.1),
            packed.Int4Linear.from_quants(torch.randint(0, 16, (64, 640), generator=g), s[:32].repeat(2, 1),
                                          torch.rand(64, 20, generator=g) * 0.1)]
    x = torch.randn(9, 640, generator=g)
    together = packed.together(x, mods)
    for m, y in zip(mods, together):
        assert torch.equal(y, m(x))
    for rows in (1, 2, 3, 5):
        for m, y in zip(mods, packed.together(x[:rows], mods)):
            assert torch.equal(y, together[mods.index(m)][:rows])
    assert packed.together(torch.randn(native.DENSE_ROWS, 640), mods) is None


def test_fused_norms_match_pytorch():
    """RMSNorm (Gemma 3: 1 + w; Gemma 4: w, or none) and QK-norm + RoPE as one kernel vs PyTorch's formulas."""
    from gemrun.model.gemma4 import RMSNorm as Norm4
    from gemrun.model.layers import RMSNorm, apply_rope, norm_rope, rope_cos_sin

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 640, generator=g) * 5
    for norm in (RMSNorm(640), Norm4(640), Norm4(640, scale=False)):
        if norm.weight is not None:
            norm.weight.data = torch.randn(640, generator=g)
        with torch.no_grad():
            got = norm(x)  # the fused kernel; below, the PyTorch formula it replaces
        xf = x.float()
        if isinstance(norm, RMSNorm):
            want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
        else:
            want = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + norm.eps, -0.5)
            want = want if norm.weight is None else want * norm.weight
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    q = torch.randn(2, 4, 1, 256, generator=g)
    cos, sin = rope_cos_sin(torch.tensor([[37], [900]]), torch.rand(128, generator=g), torch.float32)
    norm = RMSNorm(256)
    norm.weight.data = torch.randn(256, generator=g)
    with torch.no_grad():
        got = norm_rope(q, norm, cos[:, None], sin[:, None])
        xf = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
        assert torch.allclose(got, apply_rope(xf, cos[:, None], sin[:, None]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, softcap, kv_heads", [(None, None, 1), (5, None, 2), (None, 30.0, 4), (7, 20.0, 1)])
def test_one_token_attention_matches_the_masked_reference(window, softcap, kv_heads):
    """The fused one-token attention reads only the slots the mask lets through (GQA, windows, soft-capping)."""
    from gemrun.model.layers import attend, attend_positions, attention_mask

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 64, generator=g)
    k, v = torch.randn(1, kv_heads, 12, 64, generator=g), torch.randn(1, kv_heads, 12, 64, generator=g)
    kv_pos = torch.tensor([8, 9, 10, 3, 4, 5, 6, 7, -1, -1, 11, 2])  # a ring with empty slots and a future one
    pos = torch.tensor([10])
    got = attend_positions(q, k, v, pos, kv_pos, window, 0.125, softcap)
    want = attend(q, k, v, attention_mask(pos, kv_pos, window), 0.125, softcap)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    full = attend_positions(q, k[:, :, :6], v[:, :, :6], pos, kv_pos[:6], window, 0.125, softcap)  # a view
    assert torch.allclose(full, attend(q, k[:, :, :6], v[:, :, :6], attention_mask(pos, kv_pos[:6], window), 0.125,
                                       softcap), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, window", [(8, 1, None), (8, 2, 5), (8, 4, None), (12, 4, 9), (16, 1, 5),
                                                     (8, 8, None)])
def test_one_token_attention_reads_a_bf16_cache_as_stored(heads, kv_heads, window):
    """A bfloat16 cache is read by the fused kernel as it is stored (no float copy) and gives the attention over its
    values widened to float32; shapes the kernel cannot take are declined (None), so the cache is read in chunks."""
    from gemrun.model.layers import attend, attend_positions, attention_mask

    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, 1, 64, generator=g)
    k = torch.randn(1, kv_heads, 300, 64, generator=g).bfloat16()
    v = torch.randn(1, kv_heads, 300, 64, generator=g).bfloat16()
    kv_pos = torch.randperm(300, generator=g)
    kv_pos[::17] = -1
    pos = torch.tensor([250])
    got = attend_positions(q, k, v, pos, kv_pos, window, 0.125, None, stored=True)
    want = attend(q, k.float(), v.float(), attention_mask(pos, kv_pos, window), 0.125)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert attend_positions(q[..., :24], k[..., :24], v[..., :24], pos, kv_pos, window, 0.125, stored=True) is None


def test_a_bf16_cache_is_decoded_without_a_float_copy(monkeypatch):
    """Decoding over a bf16 cache hands the kernel the stored bf16 tensors (the depth cost is their bytes)."""
    from tiny import hf_model, ours_from

    m = ours_from(hf_model(seed=3, head_dim=32))
    m.kv_type = "bf16"
    seen = []
    real = native.attend1
    monkeypatch.setattr(native, "attend1", lambda q, k, *a: seen.append(k.dtype) or real(q, k, *a))
    caches = m.make_caches()
    with torch.no_grad():
        m(torch.randint(0, 512, (1, 12)), caches)
        m(torch.tensor([[5]]), caches)
    assert seen and set(seen) == {torch.bfloat16}


def packed_tiny(seed: int = 5):
    """A tiny Gemma 3 whose linear layers are packed (4- and 8-bit, asymmetric and symmetric) at sizes the kernels
    take (every input a multiple of 128)."""
    from tiny import hf_model, ours_from

    m = ours_from(hf_model(seed=seed, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32))
    for i, block in enumerate(m.layers):
        for parent, name in [(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                            [(block.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]:
            w = getattr(parent, name).weight.data
            kind = packed.Int8Linear if (i + len(name)) % 3 == 0 else packed.Int4Linear
            setattr(parent, name, kind.from_float(w))
    return m


@pytest.mark.parametrize("kv_type", ["auto", "bf16"])
def test_fused_blocks_give_the_unfused_bits(monkeypatch, kv_type):
    """A Gemma 3 block on packed weights runs as two native calls around attention (input norm, q/k/v, QK-norm
    and RoPE; o_proj, residuals, norms and the MLP), or, for one new token of one sequence, as one call that also
    stores its k and v and attends: the same bits as the PyTorch path, for a prompt chunk, single decode steps
    (the sliding rings wrapping, after a checkpoint, after a rewind to it), sequences decoded together; float32
    and bfloat16 caches."""
    from gemrun.model.gemma3 import Block

    m = packed_tiny()
    m.kv_type = kv_type
    calls = {"ffn": 0, "decode": 0}
    real_ffn, real_decode = native.block_ffn, native.block_decode

    def counted(name, real):
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or real(*a)

    monkeypatch.setattr(native, "block_ffn", counted("ffn", real_ffn))
    monkeypatch.setattr(native, "block_decode", counted("decode", real_decode))
    ids = torch.randint(0, 512, (1, 26), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            caches = m.make_caches()
            out = [m(ids[:, :12], caches)] + [m(ids[:, i:i + 1], caches) for i in range(12, 20)]
            for c in caches:
                c.checkpoint()  # as a prefix pool does at a prompt's end: new positions go after the rings
            out += [m(ids[:, i:i + 1], caches) for i in range(20, 23)]
            for c in caches:
                c.trim(3)
            out += [m(ids[:, i:i + 1], caches) for i in range(23, 26)]
            seqs = [m.make_caches() for _ in range(3)]
            for n, c in zip((5, 9, 14), seqs):
                m(ids[:, :n], c)
            return out + [m.decode(ids[0, [5, 9, 14]][:, None], seqs)]

    fused = run()
    layers = len(m.layers)
    assert calls == {"ffn": layers * (1 + 3 + 1), "decode": layers * (8 + 3 + 3)}  # every block took a fused path
    monkeypatch.setattr(Block, "fused", lambda self, x, rope: False)
    for a, b in zip(fused, run(), strict=True):
        assert torch.equal(a, b)


def test_fused_gelu_is_pytorchs():
    """The fused MLP's gelu-tanh (Sleef's tanh from PyTorch's library) gives PyTorch's bits here; were it ever
    not to (another build), `_tanh16` would be None and blocks would take the PyTorch path."""
    assert native._tanh16() is not None
    a = torch.randn(1 << 14) * 4
    u = torch.randn(1 << 14)
    got = torch.empty_like(a)
    native.library().gemrun_gelu_mul(a.data_ptr(), u.data_ptr(), a.numel(), native._tanh16(), got.data_ptr())
    assert torch.equal(got, torch.nn.functional.gelu(a, approximate="tanh") * u)


def test_one_call_decode_follows_replaced_weights(monkeypatch):
    """The one-call decode keeps its weights' pointers between steps: a linear module swapped for another, or a
    norm weight given new memory, after a step is what the next step uses (as the PyTorch path does)."""
    from gemrun.model.gemma3 import Block

    m = packed_tiny()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))

    def steps():
        with torch.no_grad():
            caches = m.make_caches()
            m(ids[:, :4], caches)
            return [m(ids[:, i:i + 1], caches) for i in (4, 5)]

    steps()  # the blocks' arguments are made here
    down = torch.nn.Linear(256, 128, bias=False)
    down.weight.data = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    m.layers[1].mlp.down_proj = down  # a float module: that block leaves the fused path
    m.layers[2].post_feedforward_layernorm.weight.data = torch.randn(128, generator=torch.Generator().manual_seed(4))
    fused = steps()
    monkeypatch.setattr(Block, "fused", lambda self, x, rope: False)
    monkeypatch.setattr(Block, "decode_args", lambda self: None)
    for a, b in zip(fused, steps(), strict=True):
        assert torch.equal(a, b)


def one_level(x: torch.Tensor) -> torch.Tensor:
    """x as the long-prompt int8 kernel sees it: per block of 32, d = max|x| / 127 and round-half-even(x / d)
    clamped to -127..127, times d (float64)."""
    b = x.float().reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127  # in float32, as the kernel
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(b * inv).clamp(-127, 127)
    return (q.double() * d.double()).reshape(x.shape)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (5, True), (8, True), (8, False)])
@pytest.mark.parametrize("rows, n, k", [(64, 96, 640), (69, 37, 1152), (130, 12, 384)])
def test_long_prompt_int8_kernel_is_one_level_q8_arithmetic(bits, symmetric, rows, n, k):
    """The long-prompt int8 kernel (4 x 2 tiles, panels of rows; odd rows and weight rows, chunks of 16, 8 and 4
    groups) computes exactly x quantized to one int8 level per block of 32 times the packed weights (up to float32
    summation), for every packed format, symmetric or with minimums."""
    g = torch.Generator().manual_seed(rows + n + bits)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (n, k), generator=g)
    s = (torch.rand(n, k // 32, generator=g) * 0.05 + 1e-3).half()
    zero = (top + 1) // 2
    m = None if symmetric else (-zero * s.float() + torch.randn(n, k // 32, generator=g) * 0.01).half()
    mins = -zero * s.double() if m is None else m.double()
    w = q.double() * s.double().repeat_interleave(32, 1) + mins.repeat_interleave(32, 1)
    x = torch.randn(rows, k, generator=g) * 2
    x[3, :32] = 0  # an all-zero block
    stored = native.q8_reorder(q) if bits == 8 else native.pack_nibbles(q & 15)  # kept alive: `matrix` points in
    high = native.pack_high(q) if bits == 5 else None
    got = native.mm(x, [native.matrix(bits, stored, s, m, zero, high)], levels=1).double()
    want = one_level(x) @ w.T
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()
    exact = x.double() @ w.T  # one level is ~q8_0 away from the float product: near, not equal
    assert 1e-5 * exact.abs().max() < (got - exact).abs().max() <= 2e-2 * exact.abs().max()


def test_the_prefill_kernel_setting(monkeypatch):
    """auto: one int8 level for symmetric formats (Q4_0 / Q8_0 / Q5_0), bf16 tiles where minimums are stored;
    a set kernel applies to every format; a wrong name is refused; long prompts follow it, short ones never."""
    nib, s, m, _ = q4_case()
    monkeypatch.setattr(native, "PREFILL", "auto")
    assert native.prefill_kernel(None) == "int8" and native.prefill_kernel(m) == "bf16"
    with pytest.raises(ValueError, match="prefill must be one of"):
        native.set_prefill("fp8")
    x = torch.randn(70, 640, generator=torch.Generator().manual_seed(9))
    exact = native.mm(x, [native.matrix(4, nib, s, None, 8)])
    results = {}
    for kind in native.PREFILLS:
        native.set_prefill(kind)
        assert native.prefill_kernel(m) == (kind if kind != "auto" else "bf16")
        results[kind] = native.q4_mm(x, nib, s, None, 8)
        assert torch.equal(native.q4_mm(x[:5], nib, s, None, 8), exact[:5])  # short: the decode kernel always
    assert torch.equal(results["exact"], exact)  # each row as alone
    assert torch.equal(results["auto"], results["int8"]) and not torch.equal(results["int8"], exact)
    assert not torch.equal(results["bf16"], results["int8"])


def _open_reference(q, k, v, scale):
    """float64 attention where every query sees every key -> out (B, H, T, D), lse (B, H, T, 1)."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    s = q.double().reshape(b, kv, h // kv * t, d) @ k.double().transpose(-1, -2) * scale
    out = torch.softmax(s, -1) @ v.double()
    return out.reshape(b, h, t, d), torch.logsumexp(s, -1, keepdim=True).reshape(b, h, t, 1)


bf16_dots = pytest.mark.skipif(not native._bf16_dots(), reason="CPU without AVX-512 BF16")


@bf16_dots
@pytest.mark.parametrize("heads, kv_heads, t, d, s", [(4, 1, 128, 256, 1300), (4, 1, 37, 256, 1025),
                                                       (16, 8, 64, 256, 700), (8, 2, 20, 512, 513),
                                                       (2, 2, 33, 32, 3), (8, 4, 16, 128, 2049)])
def test_open_attention_in_bf16_products(heads, kv_heads, t, d, s):
    """The long-cache kernel (attn.c): a bfloat16 cache read as stored, query and weights rounded to bfloat16,
    float32 sums. Against float64: the output within bf16 rounding (~0.3% of its norm), the log-sum-exp within
    bf16 rounding of the scores; ragged tiles (rows not a multiple of 64, keys of no block size, odd) included."""
    g = torch.Generator().manual_seed(heads * s + t)
    q = torch.randn(1, heads, t, d, generator=g)
    k = (torch.randn(1, kv_heads, s, d, generator=g) * 1.5).bfloat16()
    v = torch.randn(1, kv_heads, s, d, generator=g).bfloat16()
    scale = d ** -0.5
    out, lse = native.flash_open(q, k, v, scale)
    want, want_lse = _open_reference(q, k, v, scale)
    assert (out.double() - want).norm() <= 1e-2 * want.norm()
    assert (lse.double() - want_lse).abs().max() <= 2e-2
    exact_q, _ = _open_reference(q.bfloat16(), k, v, scale)  # q rounded alone costs about as much as the kernel
    assert (out.double() - want).norm() <= 4 * (exact_q - want).norm() + 1e-3 * want.norm()


@bf16_dots
def test_open_attention_rescales_when_the_maximum_moves():
    """Scores that grow along the keys (every block's maximum passes the kept one) and one key far above the rest
    late in the sequence: the lazy maximum is moved and the sums rescaled, so the late key carries the output."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 32, 64, generator=g)
    k = torch.randn(1, 1, 2000, 64, generator=g) * torch.linspace(0.1, 4, 2000)[None, None, :, None]
    k[0, 0, 1700] = q[0, :, :, :].mean((0, 1)) * 40
    k, v = k.bfloat16(), torch.randn(1, 1, 2000, 64, generator=g).bfloat16()
    out, lse = native.flash_open(q, k, v, 0.125)
    want, want_lse = _open_reference(q, k, v, 0.125)
    assert torch.isfinite(out).all() and (out.double() - want).norm() <= 1e-2 * want.norm()
    assert ((lse.double() - want_lse).abs() <= 1e-2 * want_lse.abs().clamp(min=1)).all()


@bf16_dots
def test_open_attention_is_declined_where_it_does_not_apply(monkeypatch):
    """float32 keys, too few query rows, a head_dim not a multiple of 32, and `--prefill exact` all keep the
    float32 path (None)."""
    q, k = torch.randn(1, 4, 16, 64), torch.randn(1, 1, 100, 64).bfloat16()
    assert native.flash_open(q, k, k, 0.1) is not None
    assert native.flash_open(q, k.float(), k.float(), 0.1) is None
    assert native.flash_open(q[:, :, :7], k, k, 0.1) is None
    assert native.flash_open(q[..., :48], k[..., :48], k[..., :48], 0.1) is None
    monkeypatch.setattr(native, "PREFILL", "exact")
    assert native.flash_open(q, k, k, 0.1) is None


@bf16_dots
@pytest.mark.parametrize("prefill", ["auto", "exact"])
def test_a_chunk_deep_in_a_bf16_cache_reads_it_as_stored(monkeypatch, prefill):
    """A chunk of new tokens over a long bfloat16 cache under float32 activations: the keys every query sees go to
    the bf16 kernel as stored, the chunk's own keys take the causal mask, merged by log-sum-exp; the result is the
    masked attention within bf16 rounding. Under `--prefill exact` the stored cache is declined (read in float32
    chunks instead)."""
    from gemrun.model.layers import OPEN_KEYS, attend, attend_positions, attention_mask

    g = torch.Generator().manual_seed(11)
    s, t = OPEN_KEYS + 300, 40
    q = torch.randn(1, 4, t, 64, generator=g)
    k = torch.randn(1, 2, s, 64, generator=g).bfloat16()
    v = torch.randn(1, 2, s, 64, generator=g).bfloat16()
    pos, kv_pos = torch.arange(s - t, s), torch.arange(s)
    want = attend(q.double(), k.double(), v.double(), attention_mask(pos, kv_pos, None), 0.125)
    monkeypatch.setattr(native, "PREFILL", prefill)
    calls = []
    real = native.flash_open
    monkeypatch.setattr(native, "flash_open", lambda q, k, *a: calls.append(k.shape[2]) or real(q, k, *a))
    got = attend_positions(q, k, v, pos, kv_pos, None, 0.125, stored=True)
    if prefill == "exact":
        assert got is None and not calls
        return
    assert calls == [s - t + 1]  # the keys before the chunk's, and its first (every query sees it)
    assert (got.double() - want).norm() <= 1e-2 * want.norm()
