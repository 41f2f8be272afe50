"""Writing the Gemma 4 GGUF set as llama.cpp's converter writes it (conversion/gemma.py: Gemma4Model,
Gemma4UnifiedModel, Gemma4AssistantModel, Gemma4UnifiedVisionAudioModel): the text model, the mmproj (image and
audio projectors in one `clip` file) and the MTP drafter, tensor by tensor. The layout itself (names, what is
stored how) is `gemma4_gguf.py`'s; this is its inverse.

Tensor types: vectors (norms, layer scalars, `rope_freqs`) F32; the tied embedding Q8_0 under 4- and 5-bit
types, as gemrun's Gemma 3 files (`--embed-quant` to change it); in the mmproj the patch projection F16 (F32 under
f32, as llama.cpp's MmprojModel forces) and the position table F32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType

from ..config import Gemma4TextConfig
from ..errors import ConfigError
from ..model.gemma4 import MediaConfig
from ..tokenizer import Tokenizer
from .gemma4_gguf import CONTROL, USER_DEFINED, VISIBLE, chw_order
from .gguf_config import rope_freqs, write_drafter, write_gemma4
from .gguf_write import GGUF_FILE_TYPES, GGUF_QUANTS, add_tokenizer_metadata, gguf_type_for, write_file
from .mmproj import MMPROJ_QUANTS
from .names import GEMMA4_MMPROJ_OF, ROPE_FREQS, drafter_gguf_name, gemma4_gguf_name

log = logging.getLogger("gemrun.convert")
# data(ours, shape, type) -> float32 values in the HF convention, or uint8 raw blocks of that type
Data = Callable[[str, tuple[int, ...], Q], np.ndarray]
Progress = Callable[[int, int], None]


def tokenizer_meta(root: Path) -> dict:
    """`tokenizer.ggml.*` of an HF directory's tokenizer.json as llama.cpp's Gemma4Model writes it."""
    from ..tokenizer import from_directory

    return tokenizer_meta_of(from_directory(root))


def tokenizer_meta_of(t: Tokenizer) -> dict:
    """`tokenizer.ggml.*` of a tokenizer as llama.cpp's Gemma4Model writes it (LlamaHfVocab): the pieces by id,
    byte tokens BYTE, special tokens CONTROL but the channel / tool-call / `<|"|>` tokens USER_DEFINED, other added
    tokens USER_DEFINED, scores -1000, the BPE merges, BOS always added."""
    n = t.vocab_size
    added = t.backend.get_added_tokens_decoder()
    tokens = [t.id_to_token(i) or f"<unused_id_{i}>" for i in range(n)]
    types = []
    for i, s in enumerate(tokens):
        if i in added:
            types.append(USER_DEFINED if s in VISIBLE or not added[i].special else CONTROL)
        else:
            types.append(6 if len(s) == 6 and s.startswith("<0x") and s.endswith(">") else 1)
    merges = json.loads(t.backend.to_str())["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    meta = {"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [-1000.0] * n,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": t.bos_id, "tokenizer.ggml.eos_token_id": t.eos_id,
            "tokenizer.ggml.padding_token_id": t.pad_id, "tokenizer.ggml.add_bos_token": True}
    if t.token_to_id("<unk>") is not None:
        meta["tokenizer.ggml.unknown_token_id"] = t.token_to_id("<unk>")
    if t.chat_template:
        meta["tokenizer.chat_template"] = t.chat_template
    return meta


def _add_tokenizer(w: GGUFWriter, meta: dict, cfg: Gemma4TextConfig) -> None:
    add_tokenizer_metadata(w, {**meta, "tokenizer.ggml.pre": meta.get("tokenizer.ggml.pre", "gemma4")})
    if cfg.suppress_token_ids:
        w.add_array("tokenizer.ggml.suppress_tokens", [int(i) for i in cfg.suppress_token_ids])


def _check_quants(quant: str, embed_quant: str | None) -> None:
    if quant not in GGUF_QUANTS or (embed_quant and embed_quant not in GGUF_QUANTS):
        raise ConfigError(f"GGUF types are {', '.join(GGUF_QUANTS)}; got {quant!r}")


def _plan(shapes: dict[str, tuple[int, ...]], quant: str, embed_quant: str | None,
          name: Callable[[str], str]) -> list[tuple[str, str, tuple[int, ...], Q]]:
    return [(ours, name(ours), shape, gguf_type_for(ours, shape, quant, embed_quant)) for ours, shape in shapes.items()]


def _rope(cfg: Gemma4TextConfig) -> list[tuple[str, str, tuple[int, ...], Q]]:
    """`rope_freqs.weight` when global layers use proportional RoPE (llama.cpp: generate_extra_tensors)."""
    return [(ROPE_FREQS, ROPE_FREQS, (cfg.global_head_dim // 2,), Q.F32)] if cfg.rope_global.partial < 1 else []


def _values(plan, data: Data, cfg: Gemma4TextConfig) -> Callable[[int], np.ndarray]:
    def get(i: int) -> np.ndarray:
        ours, _, shape, q = plan[i]
        return rope_freqs(cfg) if ours == ROPE_FREQS else data(ours, shape, q)
    return get


def write_text(out: Path, cfg: Gemma4TextConfig, shapes: dict[str, tuple[int, ...]], data: Data, tok_meta: dict,
               quant: str, embed_quant: str | None = None, progress: Progress | None = None) -> Path:
    """The text model (`gemma4`): `shapes` by `Gemma4` parameter name; norms stored as they are."""
    _check_quants(quant, embed_quant)
    plan = _rope(cfg) + _plan(shapes, quant, embed_quant, gemma4_gguf_name)

    def meta(w: GGUFWriter) -> None:
        write_gemma4(w, cfg)
        _add_tokenizer(w, tok_meta, cfg)
        w.add_file_type(GGUF_FILE_TYPES[quant])

    return write_file(out, "gemma4", meta, [p[1:] for p in plan], _values(plan, data, cfg), progress)


def write_drafter_file(out: Path, cfg: Gemma4TextConfig, backbone: int, centroids: tuple[int, int] | None,
                       shapes: dict[str, tuple[int, ...]], data: Data, tok_meta: dict, quant: str,
                       embed_quant: str | None = None) -> Path:
    """The drafter (`gemma4-assistant`): `shapes` by `Drafter` name; a centroid head goes to
    `masked_embd_centroids.weight` (F32) and `masked_embd_ordering` (I32), with `centroid_top_k`."""
    _check_quants(quant, embed_quant)
    if centroids:
        log.warning("the drafter's centroid head is written as masked_embd_*: gemrun uses it; llama.cpp's converter "
                    "leaves it out and its loader may refuse the file")
    plan = _rope(cfg)
    for ours, shape in shapes.items():
        if ours == "masked_embedding.token_ordering":
            q = Q.I32
        elif ours.startswith("masked_embedding."):
            q = Q.F32
        else:
            q = gguf_type_for(ours, shape, quant, embed_quant)
        plan.append((ours, drafter_gguf_name(ours), shape, q))

    def meta(w: GGUFWriter) -> None:
        write_drafter(w, cfg, backbone)
        if centroids:
            w.add_uint32("gemma4-assistant.centroid_top_k", centroids[1])
        _add_tokenizer(w, tok_meta, cfg)
        w.add_file_type(GGUF_FILE_TYPES[quant])

    def values(i: int) -> np.ndarray:
        ours, _, shape, q = plan[i]
        if q == Q.I32:
            return np.ascontiguousarray(data(ours, shape, q), dtype=np.int32).view(np.uint8)
        return _values(plan, data, cfg)(i)

    return write_file(out, "gemma4-assistant", meta, [p[1:] for p in plan], values)


def media_type(name: str, shape: tuple[int, ...], quant: str) -> Q:
    if len(shape) == 1 or name == "v.position_embd.weight":
        return Q.F32
    if name == "v.patch_embd.weight":
        return Q.F16 if quant == "f16" else Q.F32
    return MMPROJ_QUANTS[quant]


def write_media(out: Path, cfg: MediaConfig, text_hidden: int, shapes: dict[str, tuple[int, ...]], data: Data,
                quant: str = "f16") -> Path:
    """The mmproj (`clip`, gemma4uv + gemma4ua): `shapes` by `Gemma4Media` name in the HF layout; the patch
    projection and first LayerNorm are stored in CHW order and the position table as (axis, position, d)."""
    if quant not in MMPROJ_QUANTS:
        raise ConfigError(f"mmproj types are {', '.join(MMPROJ_QUANTS)}; got {quant!r}")
    plan = []
    for ours, shape in shapes.items():
        name = GEMMA4_MMPROJ_OF[ours]
        stored = (shape[1], shape[0], *shape[2:]) if name == "v.position_embd.weight" else shape
        plan.append((ours, name, stored, media_type(name, stored, quant)))
    p = cfg.patch_size * cfg.pooling_kernel_size
    order = chw_order(p).numpy()

    def meta(w: GGUFWriter) -> None:
        w.add_type("mmproj")
        w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                         "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[quant])
        for kind, on, width, eps, projector in (
                ("vision", cfg.vision, cfg.mm_embed_dim, cfg.vision_eps, "gemma4uv"),
                ("audio", cfg.audio_embed_dim is not None, cfg.audio_embed_dim, cfg.audio_eps, "gemma4ua")):
            if not on:
                continue
            w.add_bool(f"clip.has_{kind}_encoder", True)
            w.add_string(f"clip.{kind}.projector_type", projector)
            for key, value in (("projection_dim", text_hidden), ("embedding_length", width),
                               ("feed_forward_length", 0), ("block_count", 0), ("attention.head_count", 0)):
                w.add_uint32(f"clip.{kind}.{key}", value)
            w.add_float32(f"clip.{kind}.attention.layer_norm_epsilon", eps)
        if cfg.vision:
            w.add_vision_image_size(224)  # unused by the encoder-free projector; llama.cpp's converter writes 224
            w.add_vision_patch_size(cfg.patch_size)
            if cfg.pooling_kernel_size != 3:  # read as 3 when absent (clip.cpp)
                w.add_vision_projector_scale_factor(cfg.pooling_kernel_size)
            w.add_vision_image_mean([0.0, 0.0, 0.0])  # the processor does not normalise
            w.add_vision_image_std([1.0, 1.0, 1.0])
        if cfg.audio_embed_dim is not None:
            w.add_uint32("clip.audio.num_mel_bins", cfg.audio_embed_dim)  # gemma4ua: the raw frame size

    def values(i: int) -> np.ndarray:
        ours, name, _, q = plan[i]
        t = data(ours, shapes[ours], q)
        if name in ("v.patch_embd.weight", "v.patch_norm.1.weight", "v.patch_norm.1.bias"):
            t = t[..., order]  # HWC -> CHW (ggml's im2col order)
        return np.ascontiguousarray(t.transpose(1, 0, 2)) if name == "v.position_embd.weight" else t

    return write_file(out, "clip", meta, [p[1:] for p in plan], values)
