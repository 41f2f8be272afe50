"""Gemma 3's image encoder: a SigLIP vision tower (transformers `SiglipVisionModel`, no pooling head) and the
multimodal projector (`Gemma3MultiModalProjector`): 4096 patch vectors -> 256 soft tokens in the text space.

Shapes: N images, P patches (64x64 = 4096 at 896 px), C vision width (1152), E text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import RMSNorm


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    mm_tokens_per_image: int = 256
    text_hidden_size: int = 3840
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000
    image_token_id: int = 262_144

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size",
                    "mm_tokens_per_image", "text_hidden_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"vision config field {key} must be a positive integer, got {v!r}")
        side = self.image_size // self.patch_size
        per_side = round(self.mm_tokens_per_image**0.5)
        if self.image_size % self.patch_size or per_side**2 != self.mm_tokens_per_image or side % per_side:
            raise ConfigError("vision config: image_size/patch_size must be a whole grid that pools evenly to "
                              "mm_tokens_per_image (a square number)")
        if self.hidden_size % self.num_heads:
            raise ConfigError("vision hidden_size is not a multiple of num_heads")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def siglip_896(text_hidden_size: int) -> VisionConfig:
    """The SigLIP so400m-style tower of Gemma 3 4B/12B/27B."""
    return VisionConfig(text_hidden_size=text_hidden_size)


VISION_PRESETS = {"gemma-3-4b": siglip_896(2560), "gemma-3-12b": siglip_896(3840), "gemma-3-27b": siglip_896(5376)}


def vision_from_hf_config(raw: dict[str, Any]) -> VisionConfig | None:
    """The vision part of a multimodal HF config.json, or None for text-only files."""
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        return None
    text = raw.get("text_config") or {}
    try:
        return VisionConfig(
            hidden_size=v.get("hidden_size", 1152), intermediate_size=v.get("intermediate_size", 4304),
            num_layers=v.get("num_hidden_layers", 27), num_heads=v.get("num_attention_heads", 16),
            image_size=v.get("image_size", 896), patch_size=v.get("patch_size", 14),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            mm_tokens_per_image=raw.get("mm_tokens_per_image", 256),
            text_hidden_size=text.get("hidden_size", 2304),
            boi_token_id=raw.get("boi_token_index", raw.get("boi_token_id", 255_999)),
            eoi_token_id=raw.get("eoi_token_index", raw.get("eoi_token_id", 256_000)),
            image_token_id=raw.get("image_token_index", raw.get("image_token_id", 262_144)))
    except TypeError as e:
        raise ConfigError(f"bad vision_config value: {e}") from None


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.v_proj, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        q, k, v = (proj(x).view(n, p, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                  self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale head_dim**-0.5
        return self.out_proj(y.transpose(1, 2).reshape(n, p, c))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    """Pre-LayerNorm transformer layer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, C, 64, 64)
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (N, P, C), row-major patches


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)  # (N, P, C)


class Projector(nn.Module):
    """Average-pool the patch grid to sqrt(mm_tokens) per side, RMSNorm (1 + w), then x @ W (no bias)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.patches_per_side
        self.kernel = self.side // round(cfg.mm_tokens_per_image**0.5)
        self.mm_soft_emb_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(cfg.hidden_size, cfg.text_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        grid = x.transpose(1, 2).reshape(n, c, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # (N, tokens, C)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(x)  # (N, tokens, E)


class Gemma3Vision(nn.Module):
    """Pixels (N, 3, 896, 896) in [-1, 1] -> soft tokens (N, 256, E)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower(cfg)
        self.multi_modal_projector = Projector(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixels))
