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
from gemrun.convert import convert, dequantize_fp8, dequantize_int4
from gemrun.weights.gguf import GGUFFile
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


LLAMA_PY = Path("/opt/llamacpp-venv/bin/python")


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_PY.exists(), reason="llama-cpp-python venv not built (see benchmarks/vs_llamacpp.py)")
def test_llama_cpp_loads_our_gguf(tmp_path):
    """The real 270M, GGUF -> HF -> our Q8_0 GGUF: llama.cpp loads it and its greedy text equals gemrun's."""
    from gemrun.api import default_model_path

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
