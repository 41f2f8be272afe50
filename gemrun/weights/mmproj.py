"""llama.cpp-style vision GGUFs ("mmproj", `general.architecture = clip`, `clip.projector_type = gemma3`) paired
with a Gemma 3 text GGUF. The converter stores tensors untransposed (GGUF dims reversed from HF shapes) and bakes
Gemma's (1 + w) into `mm.soft_emb_norm.weight`."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import TextConfig
from ..errors import WeightsError
from ..model.vision import Gemma3Vision, VisionConfig
from .gguf import GGUFFile

MMPROJ_GLOBAL = {
    "v.patch_embd.weight": "vision_tower.embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "vision_tower.embeddings.patch_embedding.bias",
    "v.position_embd.weight": "vision_tower.embeddings.position_embedding.weight",
    "v.post_ln.weight": "vision_tower.post_layernorm.weight",
    "v.post_ln.bias": "vision_tower.post_layernorm.bias",
    "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
    "mm.soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",
}
MMPROJ_LAYER = {
    "ln1": "layer_norm1", "ln2": "layer_norm2", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
}
_BLOCK = re.compile(r"^v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def mmproj_to_gemrun(name: str) -> str | None:
    if name in MMPROJ_GLOBAL:
        return MMPROJ_GLOBAL[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in MMPROJ_LAYER:
        return f"vision_tower.encoder.layers.{m.group(1)}.{MMPROJ_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def vision_config_from_mmproj(meta: dict, text: TextConfig) -> VisionConfig:
    if meta.get("general.architecture") != "clip" or meta.get("clip.projector_type") != "gemma3":
        raise WeightsError("mmproj GGUF must have general.architecture 'clip' and clip.projector_type 'gemma3', "
                           f"got {meta.get('general.architecture')!r} / {meta.get('clip.projector_type')!r}")

    def get(key: str, default=None):
        value = meta.get(f"clip.vision.{key}", default)
        if value is None:
            raise WeightsError(f"mmproj GGUF is missing clip.vision.{key}")
        return value

    image, patch = int(get("image_size")), int(get("patch_size"))
    scale = int(meta.get("clip.vision.projector.scale_factor", 4))  # 4x4 pooling unless stated
    if int(get("projection_dim")) != text.hidden_size:
        raise WeightsError(f"mmproj projects to {get('projection_dim')} but the text model is {text.hidden_size} wide")
    side = image // patch // max(scale, 1)
    return VisionConfig(hidden_size=int(get("embedding_length")), intermediate_size=int(get("feed_forward_length")),
                        num_layers=int(get("block_count")), num_heads=int(get("attention.head_count")),
                        image_size=image, patch_size=patch,
                        layer_norm_eps=float(get("attention.layer_norm_epsilon", 1e-6)),
                        mm_tokens_per_image=side * side, text_hidden_size=text.hidden_size)


def load_mmproj(path: Path, text: TextConfig, dtype: torch.dtype, device: torch.device) -> Gemma3Vision:
    from .load import check_names

    if not path.is_file():
        raise WeightsError(f"mmproj file {path} does not exist")
    g = GGUFFile(path)
    cfg = vision_config_from_mmproj(g.metadata, text)
    names = {}
    for name in g.tensors:
        ours = mmproj_to_gemrun(name)
        if ours is None:
            raise WeightsError(f"mmproj tensor {name!r} is not part of a Gemma 3 vision encoder")
        names[ours] = name
    with torch.device("meta"):
        vision = Gemma3Vision(cfg)
    check_names({n: tuple(p.shape) for n, p in vision.named_parameters()},
                {ours: g.tensors[name].shape for ours, name in names.items()})
    state = {}
    for ours, name in names.items():
        t = torch.from_numpy(g.load(name))
        if name == "mm.soft_emb_norm.weight":
            t = t - 1  # stored as 1 + w
        state[ours] = t.to(device=device, dtype=dtype)
    vision.load_state_dict(state, strict=True, assign=True)
    g.close()
    return vision.eval().requires_grad_(False)
