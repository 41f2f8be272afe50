"""GGUF loading: tiny models in every supported tensor type, and broken files that must fail cleanly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as _T
from gguf.quants import dequantize
from tiny import hf_model, write_gguf

import gemrun
from gemrun.errors import ConfigError, WeightsError
from gemrun.weights.gguf import SUPPORTED, GGUFFile


@pytest.fixture(scope="module")
def ref():
    return hf_model(seed=7, query_pre_attn_scalar=16)  # GGUF has no query_pre_attn_scalar: head_dim is used


@pytest.fixture(scope="module")
def tiny_gguf(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf"
    write_gguf(path, ref, Q.Q8_0, Q.Q8_0)
    return path


def test_float_gguf_matches_reference(ref, tmp_path):
    write_gguf(tmp_path / "f32.gguf", ref)
    m = gemrun.load(tmp_path / "f32.gguf", device="cpu")
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(ids).logits[0] - m.logits(ids[0].tolist())).abs().max().item() <= 1e-4
    assert m.config.rope_global.factor == 8.0 and m.config.sliding_window == 8


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_gguf_equals_dequantized_reference(ref, tmp_path, qtype):
    """Each matrix loads as exactly what the gguf package's reference dequantizer gives."""
    path = tmp_path / f"{qtype.name}.gguf"
    write_gguf(path, ref, qtype, qtype)
    g = GGUFFile(path)
    loaded = gemrun.load(path, device="cpu", dtype="float32").model.state_dict()
    name = "blk.0.attn_q.weight"
    info = g.tensors[name]
    assert info.qtype == qtype
    expected = dequantize(g.raw(name), qtype).reshape(info.shape)
    assert np.array_equal(loaded["layers.0.self_attn.q_proj.weight"].numpy(), expected)
    orig = ref.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.abs(expected - orig).max() < 0.2 * np.abs(orig).max()  # and it is close to the original


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_blocks_dequantize_like_reference(tmp_path, qtype):
    """K-quant tensors (no reference quantizer in the gguf package): random blocks with finite scales."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (4, size * 2), dtype=np.uint8)  # 4 rows of 2 blocks (512 values)
    w = GGUFWriter(str(tmp_path / "k.gguf"), "gemma3")
    w.add_tensor("t", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = GGUFFile(tmp_path / "k.gguf")
    assert g.tensors["t"].shape == (4, 2 * block)
    np.testing.assert_array_equal(g.load("t"), dequantize(raw, qtype))
    assert qtype in SUPPORTED


def test_real_gguf_table(gguf_path):
    g = GGUFFile(gguf_path)
    assert g.metadata["general.architecture"] == "gemma3"
    assert len(g.tensors) == 236 and g.tensors["token_embd.weight"].shape == (262144, 640)
    assert {t.qtype.name for t in g.tensors.values()} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}


# --- broken files ------------------------------------------------------------------------------------------

def _header_end(data: bytes) -> int:
    g = GGUFFile(data=bytearray(data))
    return min(t.offset for t in g.tensors.values())


def _tensor_table_offsets(data: bytes):
    """Byte positions of each tensor entry's fields in the table (found by re-parsing)."""
    g = GGUFFile(data=bytearray(data))
    out = {}
    for name in g.tensors:
        pos = data.find(struct.pack("<Q", len(name)) + name.encode())
        p = pos + 8 + len(name)
        n_dims = struct.unpack_from("<I", data, p)[0]
        out[name] = {"n_dims": p, "dims": p + 4, "type": p + 4 + 8 * n_dims, "offset": p + 8 + 8 * n_dims}
    return out


def _load(data: bytes):
    g = GGUFFile(data=bytearray(data))
    for name in g.tensors:
        g.load(name)
    return g


def test_truncated_and_garbage_files_fail_cleanly(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (0, 3, 4, 8, 23, 24, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(WeightsError):
            _load(data[:cut])
    with pytest.raises(WeightsError, match="magic"):
        _load(b"GGUX" + data[4:])
    with pytest.raises(WeightsError, match="version"):
        _load(data[:4] + struct.pack("<I", 99) + data[8:])
    (tmp_path / "trunc.gguf").write_bytes(data[:1000])
    with pytest.raises(WeightsError):
        gemrun.load(tmp_path / "trunc.gguf", device="cpu")


def test_lying_counts_are_refused_without_allocating(tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    for field_at in (8, 16):  # tensor count, metadata count
        bad = bytearray(data)
        bad[field_at:field_at + 8] = struct.pack("<Q", 2**62)
        with pytest.raises(WeightsError, match="cannot fit"):
            _load(bad)
    # a string length far past the end of the file
    bad = bytearray(data)
    bad[24:32] = struct.pack("<Q", 2**40)
    with pytest.raises(WeightsError):
        _load(bad)


def test_bad_tensor_entries(tiny_gguf):
    data = tiny_gguf.read_bytes()
    fields = _tensor_table_offsets(data)
    name = "blk.0.attn_q.weight"
    f = fields[name]

    def patched(at, fmt, value):
        bad = bytearray(data)
        struct.pack_into(fmt, bad, at, value)
        return bad

    with pytest.raises(WeightsError, match="dimensions"):
        _load(patched(f["dims"], "<Q", 0))  # a zero dimension
    with pytest.raises(WeightsError, match="dimensions"):
        _load(patched(f["n_dims"], "<I", 9))
    with pytest.raises(WeightsError, match="unknown type"):
        _load(patched(f["type"], "<I", 77))
    offset = struct.unpack_from("<Q", data, f["offset"])[0]
    with pytest.raises(WeightsError, match="aligned"):
        _load(patched(f["offset"], "<Q", offset + 1))
    with pytest.raises(WeightsError, match="truncated"):
        _load(patched(f["offset"], "<Q", 2**40))
    other = fields["blk.0.attn_k.weight"]
    other_off = struct.unpack_from("<Q", data, other["offset"])[0]
    with pytest.raises(WeightsError, match="overlap"):
        _load(patched(f["offset"], "<Q", other_off))
    # re-typed to fewer bytes (Q8_0 -> Q4_0): a gap before the next tensor, where llama.cpp refuses the file; before,
    # the Q4_0 blocks read their float16 scales from Q8_0 bytes and loaded (NaN logits: found by the GGUF fuzz)
    with pytest.raises(WeightsError, match="not at .* where the tensor before it ends"):
        _load(patched(f["type"], "<I", Q.Q4_0.value))


def test_non_finite_weights_are_refused(tmp_path):
    """A NaN or an infinity in the weights (a float value, or the float16 scale of a quantized block) makes every
    logit NaN; refused on load, dense or packed, naming the tensor. Before, such files loaded."""
    bad = hf_model(seed=7, query_pre_attn_scalar=16)
    with torch.no_grad():
        bad.model.layers[1].self_attn.q_proj.weight[3, 5] = float("nan")
    write_gguf(tmp_path / "nan-q8.gguf", bad, Q.Q8_0, Q.Q8_0)  # the block's scale is NaN
    for dtype in ("float32", "bfloat16"):  # dense, and packed low-bit
        with pytest.raises(WeightsError, match="'blk.1.attn_q.weight' holds non-finite values"):
            gemrun.load(tmp_path / "nan-q8.gguf", device="cpu", dtype=dtype)
    bad = hf_model(seed=7, query_pre_attn_scalar=16)
    with torch.no_grad():
        bad.model.norm.weight[0] = float("inf")
    for qtype in (None, Q.F16):
        write_gguf(tmp_path / "inf.gguf", bad, qtype, qtype)
        with pytest.raises(WeightsError, match="'output_norm.weight' holds non-finite values"):
            gemrun.load(tmp_path / "inf.gguf", device="cpu")


def test_more_tokens_than_embedding_rows_is_refused(tmp_path):
    """A tokenizer of 512 tokens over an embedding of 500 rows loaded, and every prompt with one of the last 12 ids
    failed in the embedding lookup."""
    write_gguf(tmp_path / "short.gguf", hf_model(seed=1, vocab_size=500, query_pre_attn_scalar=16))
    with pytest.raises(WeightsError, match="512 tokens, more than the 500 rows"):
        gemrun.load(tmp_path / "short.gguf", device="cpu")


def test_unsupported_type_and_tokenizer_arrays(tmp_path):
    from gguf import GGUFWriter

    from gemrun.weights.gguf import check_tokenizer_metadata

    w = GGUFWriter(str(tmp_path / "iq.gguf"), "gemma3")
    w.add_tensor("t", np.zeros((2, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match="does not support"):
        GGUFFile(tmp_path / "iq.gguf").load("t")
    tokens = ["<pad>", "<eos>", "a"]
    good = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": np.zeros(3, np.float32),
            "tokenizer.ggml.token_type": np.ones(3, np.int32)}
    check_tokenizer_metadata(good)
    for key, value in (("tokenizer.ggml.scores", np.zeros(2, np.float32)),
                       ("tokenizer.ggml.token_type", np.ones(3, np.float32)),
                       ("tokenizer.ggml.tokens", [1, 2, 3]), ("tokenizer.ggml.eos_token_id", 7)):
        with pytest.raises(WeightsError):
            check_tokenizer_metadata({**good, key: value})


def _bad(name: str, key: str, value, vtype, match: str, sub=None):
    return pytest.param(key, (value, vtype) if sub is None else (value, vtype, sub), match, id=name)


EPS = "gemma3.attention.layer_norm_rms_epsilon"
BAD_METADATA = [
    _bad("width-nan", "gemma3.embedding_length", float("nan"), _T.FLOAT32, "embedding_length = nan: must be an int"),
    _bad("width-2^63", "gemma3.embedding_length", 2**63, _T.UINT64, "embedding_length = 9223372036854775808"),
    _bad("layers-str", "gemma3.block_count", "6", _T.STRING, "gemma3.block_count = '6': must be an integer"),
    _bad("layers-2^31", "gemma3.block_count", 2**31, _T.UINT32, r"block_count = 2147483648: .* in \[1, 1024\]"),
    _bad("layers-7-of-6", "gemma3.block_count", 7, _T.UINT32, r"missing: text\.layers\.6\."),  # vs the tensors
    _bad("heads-0", "gemma3.attention.head_count", 0, _T.UINT32, "gemma3.attention.head_count = 0"),
    _bad("context-2^40", "gemma3.context_length", 2**40, _T.UINT64, "gemma3.context_length = 1099511627776"),
    _bad("theta-nan", "gemma3.rope.freq_base", float("nan"), _T.FLOAT32, "freq_base = nan: must be a finite number"),
    _bad("theta-0", "gemma3.rope.freq_base", 0.0, _T.FLOAT32, "gemma3.rope.freq_base = 0.0"),
    _bad("theta-neg", "gemma3.rope.freq_base", -1e6, _T.FLOAT32, "gemma3.rope.freq_base = -1000000.0"),
    _bad("theta-1e-45", "gemma3.rope.freq_base", 1e-45, _T.FLOAT32, "gemma3.rope.freq_base = 1.4"),  # NaN logits
    _bad("theta-1", "gemma3.rope.freq_base", 1.0, _T.FLOAT32, "gemma3.rope.freq_base = 1.0"),
    _bad("factor-1e-45", "gemma3.rope.scaling.factor", 1e-45, _T.FLOAT32, "rope.scaling.factor = 1.4"),
    _bad("eps-inf", EPS, float("inf"), _T.FLOAT32, "layer_norm_rms_epsilon = inf"),
    _bad("eps-1e30", EPS, 1e30, _T.FLOAT32, "layer_norm_rms_epsilon = 1.000"),
    _bad("eps-bool", EPS, True, _T.BOOL, "layer_norm_rms_epsilon = True"),
    _bad("scaling-yarn", "gemma3.rope.scaling.type", "yarn", _T.STRING, "only linear"),
    _bad("factor-nan", "gemma3.rope.scaling.factor", float("nan"), _T.FLOAT32, "rope.scaling.factor = nan"),
    _bad("alignment-u64", "general.alignment", 32, _T.UINT64, "alignment 32 is not a power of two of type uint32"),
    _bad("alignment-48", "general.alignment", 48, _T.UINT32, "alignment 48 is not a power of two"),
    _bad("eos-bool", "tokenizer.ggml.eos_token_id", True, _T.BOOL, "eos_token_id = True is outside the vocabulary"),
    _bad("add-bos-u32", "tokenizer.ggml.add_bos_token", 1, _T.UINT32, "add_bos_token must be a bool"),
    _bad("model-u32", "tokenizer.ggml.model", 7, _T.UINT32, "tokenizer.ggml.model must be a str"),
    _bad("template-array", "tokenizer.chat_template", [1, 2], _T.ARRAY, "chat_template must be a string", _T.INT32),
    _bad("key-empty", "", "x", _T.STRING, "key #.* is empty"),
    _bad("key-70k", "k" * 70_000, "x", _T.STRING, "key #.* declares a string of 70000 bytes"),
    _bad("token-1MB", "tokenizer.ggml.tokens", [f"t{i}" for i in range(511)] + ["q" * 1_000_000], _T.ARRAY,
         "tokenizer.ggml.tokens declares a string of 1000000 bytes", _T.STRING),
]


@pytest.mark.parametrize("key, entry, match", BAD_METADATA)
def test_metadata_of_the_wrong_type_or_range_is_refused(ref, tmp_path, key, entry, match):
    """Every metadata key gemrun reads is checked for type and range, the error naming it. Before: NaN and 2^63
    widths escaped as ValueError/TypeError, a string block count, a uint64 alignment, NaN/0/negative RoPE bases and
    infinite epsilons loaded (RoPE ones giving NaN logits), and a 1 MB token took ~110 CPU-s deriving merges."""
    write_gguf(tmp_path / "bad.gguf", ref, meta={key: entry})
    with pytest.raises((WeightsError, ConfigError), match=match):
        gemrun.load(tmp_path / "bad.gguf", device="cpu")


def test_wrong_model_tensors_are_named(ref, tmp_path):
    """A GGUF with a missing layer tensor names it in one error."""
    from gguf import GGUFWriter

    path = tmp_path / "full.gguf"
    write_gguf(path, ref)
    g = GGUFFile(path)
    w = GGUFWriter(str(tmp_path / "missing.gguf"), "gemma3")
    for k, v in g.metadata.items():
        if k.startswith("GGUF.") or k in ("general.architecture", "general.alignment"):
            continue
        if isinstance(v, np.ndarray):
            if v.dtype == np.float32:
                w.add_array(k, v.tolist())
            else:
                from gguf import GGUFValueType
                w.add_key_value(k, v.tolist(), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    for name in g.tensors:
        if name != "blk.3.ffn_up.weight":
            w.add_tensor(name, g.load(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightsError, match=r"missing: text\.layers\.3\.mlp\.up_proj\.weight"):
        gemrun.load(tmp_path / "missing.gguf", device="cpu")


def _fuzz(path, count, seed, mode="all", timeout=600):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("gguf_fuzz.py")
    root = str(script.parent.parent)  # gemrun importable in the child with or without an installed package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(script), str(path), str(count), str(seed), mode],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mutation_fuzz_tiny(tiny_gguf):
    stats = _fuzz(tiny_gguf, 400, 1)
    print(stats)
    assert stats["crashes"] == 0 and stats["hangs"] == 0 and stats["oom"] == 0, stats
    assert stats["rejected"] > 200


@pytest.mark.slow
def test_mutation_fuzz_real_270m(gguf_path):
    stats = _fuzz(gguf_path, 1500, 2, mode="header", timeout=3000)
    print(stats)
    assert stats["crashes"] == 0 and stats["hangs"] == 0 and stats["oom"] == 0, stats
