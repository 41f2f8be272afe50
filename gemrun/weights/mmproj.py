"""llama.cpp-style vision GGUFs ("mmproj", `general.architecture = clip`, `clip.projector_type = gemma3`) paired
with a Gemma 3 text GGUF: read, and written as llama.cpp's converter writes them (`Gemma3VisionModel` in
`convert_hf_to_gguf.py`). Tensors are stored untransposed (GGUF dims reversed from HF shapes) and Gemma's (1 + w)
is baked into `mm.soft_emb_norm.weight`; the SigLIP LayerNorms are plain and stored as they are."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as Q

from ..config import TextConfig
from ..errors import ConfigError, WeightsError
from ..model.vision import Gemma3Vision, VisionConfig
from .gguf import GGUFFile, check_tokenizer_metadata
from .gguf_config import Meta
from .gguf_write import declare_tensor, write_encoded

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


def gemrun_to_mmproj(ours: str) -> str:
    """llama.cpp's name of a `Gemma3Vision` parameter."""
    back = {v: k for k, v in MMPROJ_GLOBAL.items()}
    if ours in back:
        return back[ours]
    n, rest = ours.removeprefix("vision_tower.encoder.layers.").split(".", 1)
    sub, kind = rest.rsplit(".", 1)
    return f"v.blk.{n}.{ {v: k for k, v in MMPROJ_LAYER.items()}[sub]}.{kind}"


MMPROJ_QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def mmproj_type_for(name: str, shape: tuple[int, ...], quant: str) -> Q:
    """llama.cpp's choices for Gemma 3: vectors and the patch / position embeddings F32, the input projection
    F16 (ggml transposes it at run time, which quantized rows do not allow: llama.cpp issue 13025; F32 under
    `f32`, so that an f32 round trip is exact), the attention and MLP matrices in `quant`, F16 where their rows
    do not split into blocks (fc2's 4304 inputs under q8_0)."""
    if len(shape) == 1 or name in ("v.patch_embd.weight", "v.position_embd.weight"):
        return Q.F32
    if name == "mm.input_projection.weight":
        return Q.F32 if quant == "f32" else Q.F16
    q = MMPROJ_QUANTS[quant]
    return q if shape[-1] % GGML_QUANT_SIZES[q][0] == 0 else Q.F16


def write_mmproj(path: Path, cfg: VisionConfig, shapes: dict[str, tuple[int, ...]],
                 read: Callable[[str], torch.Tensor], quant: str = "f16", image_mean: tuple[float, ...] = (0.5,) * 3,
                 image_std: tuple[float, ...] = (0.5,) * 3) -> Path:
    """The vision tower and projector (`Gemma3Vision` names -> shapes, `read` giving float tensors with the
    soft-embedding norm as w) as an mmproj GGUF, streamed tensor by tensor. Gemma 3 normalizes pixels with mean
    and std 0.5."""
    if quant not in MMPROJ_QUANTS:
        raise ConfigError(f"mmproj types are {', '.join(MMPROJ_QUANTS)}; got {quant!r}")
    w = GGUFWriter(str(path), "clip")
    w.add_type("mmproj")
    w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                     "q8_0": LlamaFileType.MOSTLY_Q8_0}[quant])
    w.add_clip_projector_type("gemma3")
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(cfg.text_hidden_size)
    w.add_vision_image_size(cfg.image_size)
    w.add_vision_patch_size(cfg.patch_size)
    w.add_vision_embedding_length(cfg.hidden_size)
    w.add_vision_feed_forward_length(cfg.intermediate_size)
    w.add_vision_block_count(cfg.num_layers)
    w.add_vision_head_count(cfg.num_heads)
    w.add_vision_image_mean(list(image_mean))
    w.add_vision_image_std(list(image_std))
    w.add_vision_attention_layernorm_eps(cfg.layer_norm_eps)
    w.add_vision_use_gelu(True)
    scale = cfg.patches_per_side // round(cfg.mm_tokens_per_image**0.5)
    if scale != 4:  # llama.cpp writes the pooling factor only when it is not Gemma 3's 4
        w.add_vision_projector_scale_factor(scale)
    plan = []
    for ours, shape in shapes.items():
        name = gemrun_to_mmproj(ours)
        q = mmproj_type_for(name, shape, quant)
        plan.append((ours, name, q))
        declare_tensor(w, name, shape, q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for ours, name, q in plan:
        t = read(ours).float().numpy()
        if name == "mm.soft_emb_norm.weight":
            t = t + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores the sum
        write_encoded(w, t, q)
    w.close()
    return path


def vision_config_from_mmproj(meta: dict, text: TextConfig) -> VisionConfig:
    """The vision config an mmproj describes, each key checked for type and range (the error names it)."""
    if meta.get("general.architecture") != "clip" or meta.get("clip.projector_type") != "gemma3":
        raise WeightsError("mmproj GGUF must have general.architecture 'clip' and clip.projector_type 'gemma3', "
                           f"got {str(meta.get('general.architecture'))[:40]!r} / "
                           f"{str(meta.get('clip.projector_type'))[:40]!r}")
    m = Meta(meta, "clip")
    image, patch = m.get("image_size", "vision.image_size"), m.get("patch_size", "vision.patch_size")
    scale = m.get("pooling", "vision.projector.scale_factor", 4)  # 4x4 pooling unless stated
    if m.get("hidden_size", "vision.projection_dim") != text.hidden_size:
        raise WeightsError(f"mmproj projects to {meta['clip.vision.projection_dim']} but the text model is "
                           f"{text.hidden_size} wide")
    side = image // patch // scale
    return VisionConfig(hidden_size=m.get("hidden_size", "vision.embedding_length"),
                        intermediate_size=m.get("intermediate_size", "vision.feed_forward_length"),
                        num_layers=m.get("num_layers", "vision.block_count"),
                        num_heads=m.get("num_heads", "vision.attention.head_count"),
                        image_size=image, patch_size=patch,
                        layer_norm_eps=m.get("rms_norm_eps", "vision.attention.layer_norm_epsilon", 1e-6),
                        mm_tokens_per_image=side * side, text_hidden_size=text.hidden_size)


def open_mmproj(path: Path, text: TextConfig) -> tuple[GGUFFile, VisionConfig, dict[str, str]]:
    """An mmproj file, its vision config and its tensors by `Gemma3Vision` name (-> GGUF name)."""
    if not path.is_file():
        raise WeightsError(f"mmproj file {path} does not exist")
    g = GGUFFile(path)
    check_tokenizer_metadata(g.metadata, required=False)
    cfg = vision_config_from_mmproj(g.metadata, text)
    names = {}
    for name in g.tensors:
        ours = mmproj_to_gemrun(name)
        if ours is None:
            raise WeightsError(f"mmproj tensor {name!r} is not part of a Gemma 3 vision encoder")
        names[ours] = name
    return g, cfg, names


def mmproj_tensor(g: GGUFFile, name: str) -> torch.Tensor:
    """One tensor as float32, the soft-embedding norm as w (stored as 1 + w)."""
    t = torch.from_numpy(g.load(name))
    return t - 1 if name == "mm.soft_emb_norm.weight" else t


def load_mmproj(path: Path, text: TextConfig, dtype: torch.dtype, device: torch.device) -> Gemma3Vision:
    from .load import check_names

    g, cfg, names = open_mmproj(path, text)
    with torch.device("meta"):
        vision = Gemma3Vision(cfg)
    check_names({n: tuple(p.shape) for n, p in vision.named_parameters()},
                {ours: g.tensors[name].shape for ours, name in names.items()})
    state = {ours: mmproj_tensor(g, name).to(device=device, dtype=dtype) for ours, name in names.items()}
    vision.load_state_dict(state, strict=True, assign=True)
    g.close()
    return vision.eval().requires_grad_(False)
