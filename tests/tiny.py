"""Tiny random Gemma 3 configurations, in transformers and in gemrun, with the same weights."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from gemrun.config import Rope, TextConfig
from gemrun.model.gemma3 import Gemma3
from gemrun.weights.names import hf_to_gemrun

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
            max_position_embeddings=512)


def hf_config(**over) -> Gemma3TextConfig:
    kw = {**TINY, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, **over}
    return Gemma3TextConfig(**kw)


def ours_config(hf: Gemma3TextConfig) -> TextConfig:
    from gemrun.config import from_hf_config

    return from_hf_config(hf.to_dict())


def hf_model(seed: int = 0, **over) -> Gemma3ForCausalLM:
    """A tiny reference model with randomised norm weights (their init is 0, which would hide bugs)."""
    torch.manual_seed(seed)
    cfg = hf_config(**over)
    cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def ours_from(ref: Gemma3ForCausalLM, dtype=torch.float32) -> Gemma3:
    model = Gemma3(ours_config(ref.config)).eval()
    state = {hf_to_gemrun(k): v for k, v in ref.state_dict().items() if hf_to_gemrun(k)}
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


__all__ = ["Rope", "hf_model", "ours_from", "ours_config", "hf_config"]


# --- a tiny GGUF written by the `gguf` package's writer, with a small but working tokenizer -------------------

def tiny_vocab() -> tuple[list[str], list[int]]:
    """512 tokens: controls, 256 byte tokens, then characters and a few merges (types as in Gemma's GGUF)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    types = [3] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = list("\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\n")
    merges = ["th", "he", "in", "er", "an", "\u2581t", "\u2581a", "\u2581the", "the", "re", "on", "at", "en", "nd"]
    extra = chars + merges
    i = 0
    while len(tokens) < 500:
        tok = extra[i] if i < len(extra) else f"x{i}y"
        if tok not in tokens:
            tokens.append(tok)
            types.append(1)
        i += 1
    # media tokens at the ids the tiny multimodal config uses (boi 500, eoi 501, image 502)
    tokens += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    types += [4, 4, 3]
    tokens += [f"z{i}" for i in range(512 - len(tokens))]
    types += [1] * (512 - len(types))
    return tokens, types


GGUF_NAMES = {v: k for k, v in __import__("gemrun.weights.names", fromlist=["GGUF_LAYER"]).GGUF_LAYER.items()}


def gguf_name(ours: str) -> str:
    if ours == "embed_tokens.weight":
        return "token_embd.weight"
    if ours == "norm.weight":
        return "output_norm.weight"
    _, n, *rest = ours.split(".")
    return f"blk.{n}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"


def write_gguf(path, ref: Gemma3ForCausalLM, qtype=None, embed_qtype=None, meta: dict | None = None) -> None:
    """Write `ref` as a llama.cpp-style Gemma 3 GGUF (norms stored as 1 + w), matrices in `qtype`. `meta` replaces
    or adds metadata entries (key -> (value, GGUFValueType)) or removes them (key -> None), for broken files."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.gguf_writer import GGUFValue
    from gguf.quants import quantize

    c = ref.config
    w = GGUFWriter(str(path), "gemma3")
    w.add_uint32("gemma3.context_length", c.max_position_embeddings)
    w.add_uint32("gemma3.embedding_length", c.hidden_size)
    w.add_uint32("gemma3.block_count", c.num_hidden_layers)
    w.add_uint32("gemma3.feed_forward_length", c.intermediate_size)
    w.add_uint32("gemma3.attention.head_count", c.num_attention_heads)
    w.add_uint32("gemma3.attention.head_count_kv", c.num_key_value_heads)
    w.add_uint32("gemma3.attention.key_length", c.head_dim)
    w.add_uint32("gemma3.attention.value_length", c.head_dim)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32("gemma3.rope.freq_base", c.rope_parameters["full_attention"]["rope_theta"])
    w.add_uint32("gemma3.attention.sliding_window", c.sliding_window)
    full = c.rope_parameters["full_attention"]
    if full.get("rope_type") == "linear":
        w.add_string("gemma3.rope.scaling.type", "linear")
        w.add_float32("gemma3.rope.scaling.factor", full["factor"])
    tokens, types = tiny_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    for name, t in ref.state_dict().items():
        ours = hf_to_gemrun(name)
        if ours is None:
            continue
        data = t.float().numpy()
        if "norm" in ours:
            data = data + 1.0
        q = embed_qtype if ours == "embed_tokens.weight" else (qtype if data.ndim == 2 else None)
        if q is None or q == Q.F32:
            w.add_tensor(gguf_name(ours), data.astype(np.float32))
        elif q == Q.F16:
            w.add_tensor(gguf_name(ours), data.astype(np.float16))
        else:
            w.add_tensor(gguf_name(ours), quantize(data, q), raw_dtype=q)
    for key, entry in (meta or {}).items():
        if entry is None:
            w.kv_data[0].pop(key, None)
        else:
            w.kv_data[0][key] = GGUFValue(*entry)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- a tiny Gemma3ForConditionalGeneration (facts section 7): SigLIP 32 wide, 56 px images, 4 soft tokens -----

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14, vision_use_head=False)


def hf_mm_model(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma3Config(text_config=hf_config().to_dict(), vision_config=VISION, mm_tokens_per_image=4,
                       boi_token_index=500, eoi_token_index=501, image_token_index=502)
    cfg._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:  # both start at zero in the reference init
                p.normal_(0, 0.3)
    return model


def save_mm_dir(model, root) -> None:
    """An HF directory: config, safetensors (hub names) and a tokenizer.json of the tiny vocabulary."""
    from gemrun.tokenizer import build_backend

    model.save_pretrained(root)
    tokens, types = tiny_vocab()
    build_backend(tokens, types).save(str(root / "tokenizer.json"))



def write_hf_dir(root, seed: int = 3):
    """The tiny reference as an HF directory gemrun loads whole: config, safetensors, a tokenizer.json."""
    from pathlib import Path

    from gemrun.tokenizer import build_backend

    root = Path(root)
    hf_model(seed=seed).save_pretrained(root)
    tokens, types = tiny_vocab()
    build_backend(tokens, types).save(str(root / "tokenizer.json"))
    return root


def write_mm_gguf(ref, text_path, mmproj_path, quant: str = "f32") -> None:
    """A tiny Gemma3ForConditionalGeneration as llama.cpp's pair: its text model as a GGUF, its vision tower as an
    mmproj GGUF (GGUF has no query_pre_attn_scalar: the text config's is set to head_dim, 16)."""
    from gemrun.model.vision import vision_from_hf_config
    from gemrun.weights.mmproj import write_mmproj
    from gemrun.weights.names import hf_vision_to_gemrun

    ref.config.text_config.query_pre_attn_scalar = 16
    text_only = type("T", (), {})()
    text_only.config = ref.config.text_config
    text_only.state_dict = lambda: {k.replace("model.language_model.", "model."): v
                                    for k, v in ref.state_dict().items() if "language_model" in k}
    write_gguf(text_path, text_only)
    state = {hf_vision_to_gemrun(k): v.float() for k, v in ref.state_dict().items() if hf_vision_to_gemrun(k)}
    write_mmproj(mmproj_path, vision_from_hf_config(ref.config.to_dict()),
                 {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, quant=quant)
