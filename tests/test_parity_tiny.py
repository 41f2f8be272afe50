"""Tiny random Gemma 3 configs: gemrun against transformers in float32 (max |logit diff| <= 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import hf_model, ours_config, ours_from

import gemrun
from gemrun.weights.load import load_hf

TOL = 1e-4


def full_logits(model, ids):
    return model(ids, model.make_caches(batch=ids.shape[0]))


@pytest.mark.parametrize("over", [
    {},  # linear-scaled global RoPE, window 8, query_pre_attn_scalar 24 != head_dim
    {"rope_scaling": None, "sliding_window": 5, "num_key_value_heads": 1},  # MQA, no scaling, odd window
    {"num_hidden_layers": 7, "query_pre_attn_scalar": 16, "num_key_value_heads": 4},  # MHA, 2 global layers
])
def test_full_forward_matches_reference(over):
    ref = hf_model(**over)
    ours = ours_from(ref)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))  # > window, batch of 2
    with torch.no_grad():
        expected = ref(ids).logits
        got = full_logits(ours, ids)
    assert (expected - got).abs().max().item() <= TOL


def test_incremental_decoding_matches_full_forward_past_the_window():
    ref = hf_model()
    ours = ours_from(ref)
    ids = torch.randint(0, 512, (1, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits
        full = full_logits(ours, ids)
        caches = ours.make_caches(capacity=4)  # forces the global cache to grow
        steps = [ours(ids[:, :11], caches)] + [ours(ids[:, i:i + 1], caches) for i in range(11, 45)]
        chunked_caches = ours.make_caches()
        chunks = [ours(ids[:, i:i + 6], chunked_caches) for i in range(0, 45, 6)]  # chunks shorter than window
        big = ours.make_caches()
        big_chunks = [ours(ids[:, i:i + 20], big) for i in range(0, 45, 20)]  # chunks longer than window
    for got in (torch.cat(steps, 1), torch.cat(chunks, 1), torch.cat(big_chunks, 1)):
        assert (got - full).abs().max().item() <= 1e-5
        assert (got - expected).abs().max().item() <= TOL
    sliding = [c for c, s in zip(caches, ours.specs) if s.sliding]
    assert all(c.k.shape[2] == 8 for c in sliding)  # ring buffer never grows past the window


def test_greedy_generation_matches_reference_generate():
    ref = hf_model(seed=3)
    ours = ours_from(ref)
    prompt = torch.randint(5, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, 12:].tolist()
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams

    got = list(generate_ids(ours, prompt[0].tolist(), SamplingParams(temperature=0, max_tokens=20), set(), 512,
                            512, Stats()))
    assert got == expected


def test_bfloat16_runs_close_to_float32():
    ref = hf_model()
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        f32 = full_logits(ours_from(ref), ids)
        bf16 = full_logits(ours_from(ref, torch.bfloat16), ids).float()
        ref_bf16 = ref.to(torch.bfloat16)(ids).logits.float()
    assert (bf16 - f32).abs().max().item() < 0.5
    assert (bf16 - ref_bf16).abs().max().item() < 0.1  # same rounding points as the reference


def _save(ref, path, **kw):
    ref.save_pretrained(path, **kw)
    return path


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_safetensors_directory_loads_exactly(tmp_path, shard):
    ref = hf_model(seed=5)
    root = _save(ref, tmp_path / "m", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (root / "model.safetensors.index.json").is_file()
    loaded = load_hf(root, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ref(ids).logits - full_logits(loaded.model, ids)).abs().max().item() <= TOL


def test_multimodal_config_nested_text_config_and_prefixes(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint: text_config nested, weights under model.language_model.*,
    vision tensors present; the text model loads from it."""
    from tiny import hf_config
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = hf_config().to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=500,
                       eoi_token_index=501, image_token_index=502)
    torch.manual_seed(6)
    ref = Gemma3ForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path / "mm")
    raw = json.loads((tmp_path / "mm" / "config.json").read_text())
    assert "text_config" in raw
    m = gemrun.load(tmp_path / "mm", device="cpu") if (tmp_path / "mm" / "tokenizer.json").exists() else None
    assert m is None  # no tokenizer saved: load the weights alone
    loaded = load_hf(tmp_path / "mm", torch.float32, torch.device("cpu"))
    assert loaded.config.sliding_window == 8 and loaded.config.rope_global.factor == 8.0
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = full_logits(loaded.model, ids)
    assert (expected - got).abs().max().item() <= TOL


def test_config_from_official_style_files():
    from gemrun.config import PRESETS, from_hf_config

    # the official 12B hub file lists only non-default text keys (vocab 262208 comes from the class default)
    official = {"architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
                "model_type": "gemma3",
                "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
                                "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    cfg = from_hf_config(official)
    expected = PRESETS["gemma-3-12b"]
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "sliding_window", "rope_global", "rope_local", "max_position_embeddings"):
        assert getattr(cfg, field) == getattr(expected, field), field
    assert [i for i, s in enumerate(cfg.layers) if not s.sliding] == [5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.stop_token_ids[:2] == (1, 106)
    # transformers 5.x dump: rope_parameters keyed by layer type
    cfg2 = from_hf_config({"model_type": "gemma3_text", **{k: v for k, v in official["text_config"].items()
                                                           if k != "rope_scaling"},
                           "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert cfg2.rope_global == expected.rope_global and cfg2.rope_local == expected.rope_local
    assert ours_config(hf_model().config).query_pre_attn_scalar == 24


def test_hf_directory_hardening(tmp_path):
    from safetensors.torch import save_file

    from gemrun.errors import WeightsError

    ref = hf_model(seed=8)
    root = _save(ref, tmp_path / "m")
    cfg = (root / "config.json").read_text()

    def fresh(name):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        return d

    d = fresh("escape")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../m/model.safetensors"}}))
    with pytest.raises(WeightsError, match="outside"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("absolute")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": str(root / "model.safetensors")}}))
    with pytest.raises(WeightsError, match="relative"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("pickle")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="pickled"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("int8")
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64, dtype=torch.int8)}, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match="dtype"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("corrupt")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="safetensors"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("partial")
    state = {k: v for k, v in ref.state_dict().items() if "layers.2.mlp" not in k and k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing: text\.layers\.2\.mlp\.down_proj\.weight"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("badconfig")
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="JSON"):
        load_hf(d, torch.float32, torch.device("cpu"))
    d = fresh("wrongshape")
    bad = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match="mis-shaped"):
        load_hf(d, torch.float32, torch.device("cpu"))
