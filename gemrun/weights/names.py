"""Checkpoint tensor names -> gemrun parameter names, as data.

gemrun's parameter names follow the HF text model (`layers.N.self_attn.q_proj.weight`, ...), so HF names only
lose a prefix; GGUF names (llama.cpp's) go through a table.
"""

from __future__ import annotations

import re

# Prefixes of the text decoder in HF checkpoints: Gemma3ForCausalLM, the original multimodal hub files, and
# files saved by transformers 5.x (`model.language_model.*`).
HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Tensors of other parts (vision tower, projector) and the tied head, which the text model does not read.
HF_IGNORED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                       "model.multi_modal_projector.", "lm_head.", "language_model.lm_head.")

GGUF_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
}
GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def hf_to_gemrun(name: str) -> str | None:
    """The gemrun name of an HF tensor, or None for tensors the text model does not use."""
    if name.startswith(HF_IGNORED_PREFIXES):
        return None
    for prefix in HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


HF_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                      "vision_tower.")
HF_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def hf_vision_to_gemrun(name: str) -> str | None:
    """The gemrun name (inside `Gemma3Vision`) of an HF vision-tower or projector tensor; None otherwise.
    The SigLIP pooling head (`head.*`) is not used by Gemma 3 and is skipped."""
    for prefix in HF_VISION_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return None if rest.startswith("head.") else "vision_tower." + rest
    for prefix in HF_PROJECTOR_PREFIXES:
        if name.startswith(prefix):
            return "multi_modal_projector." + name[len(prefix):]
    return None


def gguf_to_gemrun(name: str) -> str | None:
    """The gemrun name of a GGUF tensor; None when the name is not part of a Gemma 3 text model."""
    if name in GGUF_GLOBAL:
        return GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in GGUF_LAYER:
        return f"layers.{m.group(1)}.{GGUF_LAYER[m.group(2)]}.weight"
    return None


def is_gemma_norm(name: str) -> bool:
    """llama.cpp bakes Gemma's (1 + w) into stored norm weights; these get 1 subtracted on load."""
    return name.endswith("norm.weight")


# Gemma 4 Unified: hub checkpoints name the vision embedder `model.vision_embedder.*` and its final projection
# `model.embed_vision.embedding_projection`; transformers' modules are `model.embed_vision.*` (conversion_mapping).
GEMMA4_RENAMES = (
    ("model.language_model.", "text."),
    ("model.embed_vision.embedding_projection.", "media.embed_vision.multimodal_embedder.embedding_projection."),
    ("model.vision_embedder.", "media.embed_vision."),
    ("model.embed_vision.", "media.embed_vision."),
    ("model.embed_audio.", "media.embed_audio."),
)


def gemma4_hf_to_gemrun(name: str) -> str | None:
    """gemrun name (`text.*`, `media.*`) of a Gemma 4 Unified HF tensor; None for the tied head."""
    if name.startswith(("lm_head.", "model.lm_head.")):
        return None
    for prefix, ours in GEMMA4_RENAMES:
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return "text." + name.removeprefix("model.")  # text-only files (Gemma4UnifiedForCausalLM)


# --- Gemma 4 GGUF (llama.cpp's gemma4, clip gemma4uv/gemma4ua and gemma4-assistant tables) ---------------------

GEMMA4_SCALAR = "layer_output_scale"  # blk.N.layer_output_scale.weight (1,) = layers.N.layer_scalar
ROPE_FREQS = "rope_freqs.weight"  # proportional RoPE as frequency divisors, not a parameter (gguf_config.py)


def gemma4_gguf_to_gemrun(name: str) -> str | None:
    """The gemrun name (inside `Gemma4`) of a Gemma 4 text GGUF tensor; None otherwise (`rope_freqs` included)."""
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) == GEMMA4_SCALAR:
        return f"layers.{m.group(1)}.layer_scalar"
    return gguf_to_gemrun(name)


def gemma4_gguf_name(ours: str) -> str:
    """llama.cpp's name of a `Gemma4` (or `Drafter` layer) parameter."""
    if ours in GGUF_NAME_OF:
        return GGUF_NAME_OF[ours]
    _, n, rest = ours.split(".", 2)
    if rest == "layer_scalar":
        return f"blk.{n}.{GEMMA4_SCALAR}.weight"
    return f"blk.{n}.{GGUF_LAYER_OF[rest.rsplit('.', 1)[0]]}.weight"


GGUF_NAME_OF = {v: k for k, v in GGUF_GLOBAL.items()}
GGUF_LAYER_OF = {v: k for k, v in GGUF_LAYER.items()}

# mmproj (clip, gemma4uv + gemma4ua) -> names inside `Gemma4Media`; `v.patch_norm.3` is the position norm
# (conversion/gemma.py renames pos_norm to patch_ln3), the position table is stored (axis, position, d).
GEMMA4_MMPROJ = {
    "v.patch_embd.weight": "embed_vision.patch_dense.weight",
    "v.patch_embd.bias": "embed_vision.patch_dense.bias",
    "v.patch_norm.1.weight": "embed_vision.patch_ln1.weight",
    "v.patch_norm.1.bias": "embed_vision.patch_ln1.bias",
    "v.patch_norm.2.weight": "embed_vision.patch_ln2.weight",
    "v.patch_norm.2.bias": "embed_vision.patch_ln2.bias",
    "v.patch_norm.3.weight": "embed_vision.pos_norm.weight",
    "v.patch_norm.3.bias": "embed_vision.pos_norm.bias",
    "v.position_embd.weight": "embed_vision.pos_embedding",
    "mm.input_projection.weight": "embed_vision.multimodal_embedder.embedding_projection.weight",
    "mm.a.input_projection.weight": "embed_audio.embedding_projection.weight",
}
GEMMA4_MMPROJ_OF = {v: k for k, v in GEMMA4_MMPROJ.items()}

# drafter (gemma4-assistant) -> names inside `Drafter`; the centroid head is optional
DRAFTER_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "nextn.pre_projection.weight": "pre_projection.weight",
    "nextn.post_projection.weight": "post_projection.weight",
    "masked_embd_centroids.weight": "masked_embedding.centroids.weight",
    "masked_embd_ordering": "masked_embedding.token_ordering",
}
DRAFTER_GLOBAL_OF = {v: k for k, v in DRAFTER_GLOBAL.items()}
# the other published layouts (`gemma4-mtp`, and conversions before llama.cpp's rename) -> llama.cpp's names
DRAFTER_VARIANTS = {
    "mtp_pre_proj.weight": "nextn.pre_projection.weight", "mtp.pre_projection.weight": "nextn.pre_projection.weight",
    "mtp_post_proj.weight": "nextn.post_projection.weight",
    "mtp.post_projection.weight": "nextn.post_projection.weight",
    "mtp_centroids.weight": "masked_embd_centroids.weight", "mtp.centroids.weight": "masked_embd_centroids.weight",
    "mtp_token_ordering": "masked_embd_ordering", "mtp_token_ordering.weight": "masked_embd_ordering",
    "mtp.token_ordering.weight": "masked_embd_ordering",
}
DRAFTER_LAYER = {"attn_q", "attn_q_norm", "attn_output", "attn_norm", "post_attention_norm", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down", "post_ffw_norm", GEMMA4_SCALAR}


def drafter_gguf_to_gemrun(name: str) -> str | None:
    """The gemrun name (inside `Drafter`) of a drafter GGUF tensor, any published layout; None otherwise."""
    name = DRAFTER_VARIANTS.get(name, name)
    if name in DRAFTER_GLOBAL:
        return DRAFTER_GLOBAL[name]
    m = _GGUF_BLOCK.match(name)
    return gemma4_gguf_to_gemrun(name) if m and m.group(2) in DRAFTER_LAYER else None


def drafter_gguf_name(ours: str) -> str:
    return DRAFTER_GLOBAL_OF.get(ours) or gemma4_gguf_name(ours)
