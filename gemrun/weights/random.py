"""Full-shape checkpoints of random weights (speed and memory do not depend on the values), written tensor by
tensor: HF safetensors directories (optionally with the SigLIP vision tower) and GGUF files whose tokenizer
metadata is copied from the embedded Gemma 3 270M."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from ..config import Gemma4TextConfig, TextConfig, preset
from ..errors import ConfigError
from ..model.gemma3 import Gemma3
from ..model.gemma4 import Gemma4, Gemma4Media, MediaConfig
from ..model.vision import VISION_PRESETS, Gemma3Vision, VisionConfig
from .embedded import default_model_path
from .gguf_config import write_gemma3
from .gguf_write import GGUF_QUANTS, add_tokenizer_metadata, declare_tensor, gguf_name
from .safetensors import ShardWriter

Progress = Callable[[int, int], None]
STD = 0.02
HF_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
GGUF_TYPES = {k: GGUF_QUANTS[k] for k in ("f32", "f16", "bf16", "q8_0", "q4_0")}  # floats, or `_random_blocks`


def _shapes(module_factory) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        m = module_factory()
    return [(n, tuple(p.shape)) for n, p in m.named_parameters()]


def _values(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Biases 0, SigLIP LayerNorm scales 1, Gemma RMSNorm weights 0 (their scale is 1 + w), the rest N(0, 0.02)."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if "layer_norm" in name or "layernorm" in name:
        return torch.ones(shape)
    if name.endswith("norm.weight"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * STD


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x  # transformers' strict config wants an int for a whole number


def hf_config_dict(cfg: TextConfig, v: VisionConfig | None) -> dict:
    """config.json of a Gemma3ForCausalLM, or with `v` of a Gemma3ForConditionalGeneration."""
    text = {"model_type": "gemma3_text", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar), "sliding_window": cfg.sliding_window,
            "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_global.theta,
            "rope_local_base_freq": cfg.rope_local.theta}
    if cfg.rope_global.factor != 1.0:
        text["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_global.factor}
    if v is None:
        return {**text, "architectures": ["Gemma3ForCausalLM"], "eos_token_id": [1, 106]}
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
            "text_config": text, "mm_tokens_per_image": v.mm_tokens_per_image, "boi_token_index": v.boi_token_id,
            "eoi_token_index": v.eoi_token_id, "image_token_index": v.image_token_id,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
                              "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                              "num_attention_heads": v.num_heads, "image_size": v.image_size,
                              "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps,
                              "vision_use_head": False}}


# Gemma 4's control tokens at their real ids (Gemma4UnifiedConfig's media token ids; the tokens of Google's Gemma 4
# `chat_template.jinja`). No Gemma 4 tokenizer can be downloaded: random checkpoints and tests put them over
# unused control tokens of the embedded Gemma 3 vocabulary.
GEMMA4_SPECIALS = {
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>", 255999: "<|image>", 256000: "<|audio>", 258880: "<|image|>",
    258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>",
}


def gemma4_stand_in_metadata(template: str | None = None) -> dict:
    """GGUF tokenizer metadata of the embedded Gemma 3 270M with Gemma 4's special tokens at their ids (no BOS
    added: the template writes it)."""
    from ..tokenizer import CONTROL
    from .gguf import GGUFFile

    meta = dict(GGUFFile(default_model_path()).metadata)
    tokens, types = list(meta["tokenizer.ggml.tokens"]), [int(t) for t in meta["tokenizer.ggml.token_type"]]
    for i, token in GEMMA4_SPECIALS.items():
        tokens[i], types[i] = token, CONTROL
    meta.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                 "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": template})
    return meta


def gemma4_config_dict(cfg: Gemma4TextConfig, media: MediaConfig | None) -> dict:
    """config.json of a Gemma4UnifiedForConditionalGeneration (official key names); without `media` a text-only
    one."""
    text = {"model_type": "gemma4_unified_text", "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "global_head_dim": cfg.global_head_dim,
            "num_global_key_value_heads": cfg.num_global_kv_heads, "attention_k_eq_v": cfg.attention_k_eq_v,
            "num_kv_shared_layers": cfg.num_kv_shared_layers, "use_double_wide_mlp": cfg.double_wide_mlp,
            "sliding_window": cfg.sliding_window, "max_position_embeddings": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps, "layer_types": list(cfg.layer_kinds),
            "final_logit_softcapping": cfg.final_logit_softcapping, "use_bidirectional_attention": "vision",
            "rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": cfg.rope_global.theta,
                                                   "partial_rotary_factor": cfg.rope_global.partial},
                                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local.theta}}}
    out = {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
           "text_config": text, "eos_token_id": [1, 106]}
    if media is None:
        return out
    if media.vision:
        out["vision_config"] = {"model_type": "gemma4_unified_vision", "patch_size": media.patch_size,
                                "pooling_kernel_size": media.pooling_kernel_size, "mm_embed_dim": media.mm_embed_dim,
                                "output_proj_dims": media.mm_embed_dim, "mm_posemb_size": media.mm_posemb_size,
                                "rms_norm_eps": media.vision_eps}
    if media.audio_embed_dim is not None:
        out["audio_config"] = {"model_type": "gemma4_unified_audio", "audio_embed_dim": media.audio_embed_dim,
                               "rms_norm_eps": media.audio_eps}
    return out | {"boi_token_id": media.boi_token_id, "eoi_token_id": media.eoi_token_id,
                  "image_token_id": media.image_token_id, "video_token_id": media.video_token_id,
                  "boa_token_id": media.boa_token_id, "eoa_token_index": media.eoa_token_id,
                  "audio_token_id": media.audio_token_id}


def write_random_hf(preset_name: str, out: Path, vision: bool = False, dtype: str = "bf16", seed: int = 0,
                    shard_bytes: int = 2 << 30, progress: Progress | None = None) -> Path:
    """An HF directory (config.json, sharded safetensors with index, tokenizer.json) of random weights. Gemma 4
    presets always carry their image and audio embedders."""
    from ..tokenizer import from_gguf_metadata
    from .gguf import GGUFFile

    cfg = preset(preset_name)
    if isinstance(cfg, Gemma4TextConfig):
        return _write_random_gemma4(cfg, out, dtype, seed, shard_bytes, progress)
    if vision and cfg.name not in VISION_PRESETS:
        raise ConfigError(f"{preset_name} has no vision tower")
    out.mkdir(parents=True, exist_ok=True)
    prefix = "language_model.model." if vision else "model."
    tensors = [(prefix + n, s) for n, s in _shapes(lambda: Gemma3(cfg))]
    if vision:
        for n, s in _shapes(lambda: Gemma3Vision(VISION_PRESETS[cfg.name])):
            tensors.append((n.replace("vision_tower.", "vision_tower.vision_model.", 1), s))
    gen = torch.Generator().manual_seed(seed)
    shards = ShardWriter(out, shard_bytes)
    for i, (name, shape) in enumerate(tensors):
        shards.put(name, _values(name, shape, gen).to(HF_DTYPES[dtype]))
        if progress:
            progress(i + 1, len(tensors))
    shards.close()
    config = hf_config_dict(cfg, VISION_PRESETS[cfg.name] if vision else None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = from_gguf_metadata(GGUFFile(default_model_path()).metadata, image_token=vision)
    tok.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                           "pad_token": "<pad>", "add_bos_token": True}))
    return out


def _random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw blocks of a block-quantized type: random quants with a small fixed fp16 scale (values ~ 0.01)."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.array([0.002 if qtype == GGMLQuantizationType.Q4_0 else 0.0002], dtype=np.float16).view(np.uint8)
    raw[:, :, 0], raw[:, :, 1] = scale[0], scale[1]  # the block's d comes first in both Q4_0 and Q8_0
    return raw.reshape(rows, -1)


def write_random_gguf(preset_name: str, out: Path, quant: str = "q4_0", embed_quant: str = "q8_0", seed: int = 0,
                      progress: Progress | None = None, mmproj: Path | None = None,
                      draft: Path | None = None) -> dict[str, Path]:
    """A llama.cpp-layout Gemma 3 GGUF of random weights: matrices in `quant`, the embedding in `embed_quant`,
    norms F32 (stored as 1 + w), tokenizer metadata of the embedded model. A Gemma 4 preset writes the set
    (`write_random_gemma4_gguf`), the mmproj and drafter by default beside OUT as mmproj-OUT and
    OUT-assistant.gguf. Returns the companion files written, by kind."""
    from .gguf import GGUFFile

    if quant not in GGUF_TYPES or embed_quant not in GGUF_TYPES:
        raise ConfigError(f"quant types must be among {sorted(GGUF_TYPES)}")
    if isinstance(preset(preset_name), Gemma4TextConfig):
        files = {"mmproj": mmproj or out.with_name(f"mmproj-{out.name}"),
                 "draft": draft or out.with_name(f"{out.stem}-assistant.gguf")}
        write_random_gemma4_gguf(preset_name, out, quant, embed_quant, seed, files["mmproj"], files["draft"],
                                 progress)
        return files
    if mmproj is not None or draft is not None:
        raise ConfigError(f"{preset_name}: --mmproj and --draft are for Gemma 4 presets (random mmproj and drafter)")
    meta = GGUFFile(default_model_path()).metadata
    # llama.cpp's files (and loader) size the embedding to the tokenizer: 262144 rows, not HF's 262208
    cfg = preset(preset_name).replace(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    w = GGUFWriter(str(out), "gemma3")
    write_gemma3(w, cfg)
    add_tokenizer_metadata(w, {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")})
    tensors = _shapes(lambda: Gemma3(cfg))
    plan = []
    for name, shape in tensors:
        q = GGUF_TYPES[embed_quant if name == "embed_tokens.weight" else quant]
        if len(shape) == 1:
            q = GGMLQuantizationType.F32
        if shape[-1] % GGML_QUANT_SIZES[q][0]:
            q = GGMLQuantizationType.F16
        plan.append((name, shape, q))
        declare_tensor(w, gguf_name(name), shape, q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for i, (name, shape, q) in enumerate(plan):
        if q in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0):
            data = _random_blocks(q, shape, rng)
        else:
            t = _values(name, shape, gen) + (1.0 if name.endswith("norm.weight") else 0.0)
            np_dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(q)
            data = (t.numpy().astype(np_dtype) if np_dtype else t.to(torch.bfloat16).view(torch.uint8).numpy())
        w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
        if progress:
            progress(i + 1, len(plan))
    w.close()
    return {}


def _write_random_gemma4(cfg: Gemma4TextConfig, out: Path, dtype: str, seed: int, shard_bytes: int,
                         progress: Progress | None) -> Path:
    from ..tokenizer import from_gguf_metadata

    out.mkdir(parents=True, exist_ok=True)
    media = MediaConfig(mm_embed_dim=cfg.hidden_size)
    tensors = [("model.language_model." + n, s) for n, s in _shapes(lambda: Gemma4(cfg))]
    tensors += [("model." + n, s) for n, s in _shapes(lambda: Gemma4Media(media, cfg.hidden_size))]
    gen = torch.Generator().manual_seed(seed)
    shards = ShardWriter(out, shard_bytes)
    for i, (name, shape) in enumerate(tensors):
        # Gemma 4 norms scale by w (not 1 + w) and LayerNorms by their weight: ones; layer scalars 1
        ones = name.endswith(("norm.weight", "layer_scalar", "ln1.weight", "ln2.weight"))
        shards.put(name, (torch.ones(shape) if ones else _values(name, shape, gen)).to(HF_DTYPES[dtype]))
        if progress:
            progress(i + 1, len(tensors))
    shards.close()
    (out / "config.json").write_text(json.dumps(gemma4_config_dict(cfg, media), indent=2))
    from_gguf_metadata(gemma4_stand_in_metadata()).backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                           "pad_token": "<pad>", "add_bos_token": False}))
    return out


# google/gemma-4-12B-it-assistant (facts sheet section 6): 4 layers (S, S, S, F) 1024 wide over the 3840-wide target
ASSISTANTS = {"gemma-4-12b": (Gemma4TextConfig(name="gemma-4-12b-assistant", hidden_size=1024, intermediate_size=8192,
                                               num_layers=4, num_heads=16, num_kv_heads=8, head_dim=256,
                                               global_head_dim=512, num_global_kv_heads=1, attention_k_eq_v=True),
                              3840)}


def small_gemma4(hidden: int = 256) -> tuple[Gemma4TextConfig, tuple[Gemma4TextConfig, int]]:
    """A small Gemma 4 (6 layers, `hidden` wide) and a 2-layer drafter for it, the 12B's geometry scaled down: a
    random set of these runs in seconds (tests, a quick check of the benchmark scripts)."""
    head = hidden // 4
    common = dict(num_heads=4, num_kv_heads=2, head_dim=head, global_head_dim=2 * head, num_global_kv_heads=1,
                  attention_k_eq_v=True, sliding_window=128)
    text = Gemma4TextConfig(name="small", hidden_size=hidden, intermediate_size=4 * hidden, num_layers=6,
                            final_logit_softcapping=30.0, **common)
    drafter = Gemma4TextConfig(name="small-assistant", hidden_size=hidden // 2, intermediate_size=2 * hidden,
                               num_layers=2, **common)
    return text, (drafter, hidden)


def _gemma4_values(rng: np.random.Generator, gen: torch.Generator) -> Callable:
    """data(name, shape, type) for the Gemma 4 writers: random blocks for Q4_0 / Q8_0, else floats (Gemma 4
    norms and LayerNorm scales 1, layer scalars 1, biases 0, the rest N(0, 0.02))."""
    def data(name: str, shape: tuple[int, ...], q: GGMLQuantizationType) -> np.ndarray:
        if q in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0):
            return _random_blocks(q, shape, rng)
        if name.endswith(("norm.weight", "layer_scalar", "ln1.weight", "ln2.weight")):
            return np.ones(shape, dtype=np.float32)
        return _values(name, shape, gen).numpy()
    return data


def write_random_gemma4_gguf(preset_name: str | Gemma4TextConfig, out: Path, quant: str = "q4_0",
                             embed_quant: str = "q8_0", seed: int = 0, mmproj: Path | None = None,
                             draft: Path | None = None, progress: Progress | None = None,
                             assistant: tuple[Gemma4TextConfig, int] | None = None) -> list[Path]:
    """A full-shape Gemma 4 GGUF set of random weights in llama.cpp's layout: the text model, and with `mmproj` /
    `draft` paths the image + audio projectors (f16) and the MTP drafter (in `quant`; `assistant` = its config and
    target width, else the preset's); the tokenizer is the stand-in (the embedded 270M vocabulary with Gemma 4's
    control tokens at their ids, as `gemma4` BPE). A config instead of a preset name makes small test sets."""
    from ..model.gemma4 import Drafter
    from ..tokenizer import from_gguf_metadata
    from .gemma4_write import tokenizer_meta_of, write_drafter_file, write_media, write_text

    if quant not in GGUF_TYPES or embed_quant not in GGUF_TYPES:
        raise ConfigError(f"quant types must be among {sorted(GGUF_TYPES)}")
    cfg = preset(preset_name) if isinstance(preset_name, str) else preset_name
    tok_meta = tokenizer_meta_of(from_gguf_metadata(gemma4_stand_in_metadata()))
    cfg = cfg.replace(vocab_size=len(tok_meta["tokenizer.ggml.tokens"]), suppress_token_ids=(258_883, 258_882))
    data = _gemma4_values(np.random.default_rng(seed), torch.Generator().manual_seed(seed))
    written = [write_text(out, cfg, dict(_shapes(lambda: Gemma4(cfg))), data, tok_meta, quant, embed_quant, progress)]
    if mmproj is not None:
        media = MediaConfig(mm_embed_dim=cfg.hidden_size)
        shapes = dict(_shapes(lambda: Gemma4Media(media, cfg.hidden_size)))
        written.append(write_media(mmproj, media, cfg.hidden_size, shapes, data, "f16"))
    if draft is not None:
        if assistant is None and preset_name not in ASSISTANTS:
            raise ConfigError(f"no drafter is known for {preset_name}")
        dcfg, backbone = assistant or ASSISTANTS[preset_name]
        dcfg = dcfg.replace(vocab_size=cfg.vocab_size, suppress_token_ids=cfg.suppress_token_ids)
        shapes = dict(_shapes(lambda: Drafter(dcfg, backbone)))
        written.append(write_drafter_file(draft, dcfg, backbone, None, shapes, data, tok_meta, quant, embed_quant))
    return written
