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
