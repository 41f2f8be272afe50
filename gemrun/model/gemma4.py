"""Gemma 4 (Unified): the text decoder and the encoder-free image/audio embedders, as transformers'
`modeling_gemma4_unified.py` defines them.

What differs from Gemma 3 (`Gemma4UnifiedTextDecoderLayer`, `Gemma4UnifiedTextAttention`): RMSNorm scales by
w (not 1 + w); attention has no scaling (1.0) and normalises Q, K and V (V without a weight); global layers have
their own head size and KV heads, take V from the key projection and use proportional RoPE; every layer ends by
multiplying the residual stream by its `layer_scalar`; logits are soft-capped. Media have no encoder: image
patches and audio frames are normalised and projected straight into the embedding space.

Shapes: B batch, T new tokens, H query heads, KV key/value heads, D head_dim, E hidden size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Cache, Parts
from ..config import Gemma4TextConfig, LayerSpec
from ..quant import native
from .decoder import Decoder
from .layers import GatedMLP, attend_positions, linears, norm_rope


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: x * (mean(x^2) + eps)^-0.5 * w in float32, w starting at 1; `scale=False` has no weight
    (Gemma4UnifiedRMSNorm; the pow form is the reference's, chosen to match JAX)."""

    offset = 0.0  # the weight scales as is (Gemma 3's is 1 + w)

    def __init__(self, dim: int, eps: float = 1e-6, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.fits(x, *([] if self.weight is None else [self.weight])):  # one fused kernel
            return native.rms_norm(x, self.weight, self.offset, self.eps)
        xf = x.float()
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (y if self.weight is None else y * self.weight.float()).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma4TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec, self.heads = spec, cfg.num_heads
        self.block_in_window = cfg.vision_attention != "all"
        # which layers let one image's tokens see each other: sliding only (default) or all
        self.bidirectional = cfg.vision_attention == "all" or (cfg.vision_attention == "sliding" and spec.sliding)
        d, kv, e = spec.head_dim, spec.num_kv_heads, cfg.hidden_size
        self.q_proj = nn.Linear(e, cfg.num_heads * d, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if spec.kv_source is None:  # layers that share KV have no K/V weights at all
            self.k_proj = nn.Linear(e, kv * d, bias=False)
            self.v_proj = None if spec.k_eq_v else nn.Linear(e, kv * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(d, cfg.rms_norm_eps, scale=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, e, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache, positions: torch.Tensor,
                blocks: torch.Tensor | None = None):
        b, t, _ = x.shape
        d, kv = self.spec.head_dim, self.spec.num_kv_heads
        own = [] if self.spec.kv_source is not None else [self.k_proj] + ([] if self.v_proj is None else [self.v_proj])
        q, *kv_out = linears(x, self.q_proj, *own)
        q = norm_rope(q.view(b, t, self.heads, d).transpose(1, 2), self.q_norm, *rope)  # (B, H, T, D)
        k = v = None
        if kv_out:
            k = kv_out[0].view(b, t, kv, d).transpose(1, 2)  # (B, KV, T, D)
            v = k if self.v_proj is None else kv_out[1].view(b, t, kv, d).transpose(1, 2)
            k, v = norm_rope(k, self.k_norm, *rope), self.v_norm(v)
        blocks = blocks if self.bidirectional else None
        y = cache.attend(q, k, v, positions, partial(self.attend, blocks=blocks))  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * d))

    def attend(self, q, k, v, positions, kv_positions, blocks, lse=False, stored=False):
        """q (B, H, T, D) over the cached k, v (B, KV, S, D), masked by absolute positions (T,) and (S,)."""
        # Gemma 4 attends unscaled: the Q/K norms set the scale
        return attend_positions(q, k, v, positions, kv_positions, self.spec.window, 1.0, None, blocks,
                                self.block_in_window, lse, stored)


class Block(nn.Module):
    """Gemma 3's sandwich, then the whole residual stream scaled by the layer's scalar."""

    def __init__(self, cfg: Gemma4TextConfig, spec: LayerSpec):
        super().__init__()
        eps, e = cfg.rms_norm_eps, cfg.hidden_size
        wide = 2 if cfg.double_wide_mlp and spec.kv_source is not None else 1
        self.self_attn = Attention(cfg, spec)
        self.mlp = GatedMLP(e, cfg.intermediate_size * wide)
        self.input_layernorm = RMSNorm(e, eps)
        self.post_attention_layernorm = RMSNorm(e, eps)
        self.pre_feedforward_layernorm = RMSNorm(e, eps)
        self.post_feedforward_layernorm = RMSNorm(e, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))  # a checkpoint tensor, loaded like a weight

    def forward(self, x, rope, cache, positions, blocks=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, positions, blocks))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class Gemma4(Decoder):
    """Token ids in, logits out (the shared `Decoder`, as Gemma 3's, with Gemma 4 blocks and norm)."""

    def __init__(self, cfg: Gemma4TextConfig, specs: tuple[LayerSpec, ...] | None = None):
        super().__init__(cfg, Block, RMSNorm, specs)


# --- multi-token-prediction drafter (gemma4_unified_assistant) -----------------------------------------------------


class TargetKV(Cache):
    """A drafter layer's "cache": the target's K/V of its last layer of the same type, read as is."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        self.kv = Parts([(k, v, positions)])

    def update(self, k, v, positions):
        return self.kv


class MaskedHead(nn.Module):
    """The drafter's centroid-narrowed output head (Gemma4UnifiedAssistantMaskedEmbedder): the vocabulary is cut
    into `centroids` clusters of equal size (`token_ordering` lists each cluster's token ids); only the `top_k`
    clusters whose centroid scores highest get real logits, every other token the minimum of those minus 1."""

    def __init__(self, hidden: int, vocab: int, centroids: int, top_k: int):
        super().__init__()
        self.top_k, self.per_cluster = top_k, vocab // centroids
        self.centroids = nn.Linear(hidden, centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(vocab, dtype=torch.long))

    def forward(self, h: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        """h (B, T, E), the tied embedding -> logits (B, T, V)."""
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # (B, T, k)
        ids = self.token_ordering.view(-1, self.per_cluster)[top].flatten(-2)  # (B, T, k * per_cluster)
        rows = embedding(ids).to(h.dtype)  # (B, T, k * per_cluster, E): the candidates' embedding rows
        picked = (h.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
        out = torch.full((*h.shape[:-1], self.token_ordering.numel()), float(picked.min()) - 1.0, dtype=h.dtype,
                         device=h.device)
        return out.scatter_(-1, ids, picked)


class Drafter(Gemma4):
    """The MTP assistant: a small Gemma 4 decoder without K/V projections whose every layer attends to the
    target's K/V (last sliding layer / last global layer). One step reads [target embedding of the last token,
    previous hidden state] (2 x backbone width) and gives draft logits and the next hidden state; every step of
    a round sits at the position of the last accepted token (Gemma4UnifiedAssistantForCausalLM). `centroids`
    (count, top k) adds the centroid-narrowed head."""

    def __init__(self, cfg: Gemma4TextConfig, backbone_hidden: int, centroids: tuple[int, int] | None = None):
        # Sliding layers see the last W + 1 target positions: the reference builds an inclusive bidirectional
        # window (|q - kv| <= W) and flips it onto the latest keys; global layers see every position.
        specs = tuple(dataclasses.replace(s, kv_source=-1, window=s.window + 2 if s.sliding else None)
                      for s in cfg.layers)
        super().__init__(cfg, specs)
        self.pre_projection = nn.Linear(2 * backbone_hidden, cfg.hidden_size, bias=False)
        self.post_projection = nn.Linear(cfg.hidden_size, backbone_hidden, bias=False)
        self.masked_embedding = MaskedHead(cfg.hidden_size, cfg.vocab_size, *centroids) if centroids else None

    def step(self, token_embed: torch.Tensor, hidden: torch.Tensor, position: int,
             target_kv: dict[bool, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """token_embed, hidden (B, 1, backbone); target_kv[sliding] = (k, v, positions) -> draft logits (B, 1, V)
        (not soft-capped, as the reference) and the next hidden state (B, 1, backbone)."""
        x = self.pre_projection(torch.cat([token_embed, hidden], dim=-1))
        caches = [TargetKV(*target_kv[s.sliding]) for s in self.specs]
        h = self.norm(self.layers_forward(x, caches, torch.tensor([position], device=x.device)))
        logits = self.head(h) if self.masked_embedding is None else self.masked_embedding(h, self.embed_tokens)
        return logits, self.post_projection(h)


# --- encoder-free media embedders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaConfig:
    """Image/video and audio embedders and their token ids (Gemma4UnifiedConfig and its vision/audio parts)."""

    patch_size: int = 16
    pooling_kernel_size: int = 3  # 3x3 patches of 16 px merge into one 48-px model patch
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    vision_eps: float = 1e-6
    audio_embed_dim: int | None = 640  # None: no audio embedder
    audio_eps: float = 1e-6
    vision: bool = True
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883
    audio_token_id: int = 258_881

    @property
    def patch_dim(self) -> int:
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3


def media_from_hf_config(raw: dict[str, Any]) -> MediaConfig | None:
    """The media part of a Gemma 4 Unified `config.json`, or None for a text-only file."""
    vision, audio = raw.get("vision_config"), raw.get("audio_config")
    if not vision and not audio:
        return None
    kw: dict[str, Any] = {"vision": bool(vision)}
    for key in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size"):
        if vision and vision.get(key) is not None:
            kw[key] = int(vision[key])
    if vision:
        kw["vision_eps"] = float(vision.get("rms_norm_eps", 1e-6))
        if vision.get("output_proj_dims", kw.get("mm_embed_dim", 3840)) != kw.get("mm_embed_dim", 3840):
            raise ValueError("vision output_proj_dims must equal mm_embed_dim")  # the projection's input width
    kw["audio_embed_dim"] = int(audio.get("audio_embed_dim", 640)) if audio else None
    if audio:
        kw["audio_eps"] = float(audio.get("rms_norm_eps", 1e-6))
    for key in ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id", "audio_token_id"):
        if isinstance(raw.get(key), int):
            kw[key] = raw[key]
    if isinstance(raw.get("eoa_token_index"), int):
        kw["eoa_token_id"] = raw["eoa_token_index"]
    return MediaConfig(**kw)


class Projection(nn.Module):
    """RMSNorm without weight, then a bias-free linear into the text width (Gemma4UnifiedMultimodalEmbedder)."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(dim, eps, scale=False)
        self.embedding_projection = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionEmbedder(nn.Module):
    """48x48x3 pixel patches (values in [0, 1]) -> soft tokens: LayerNorm, linear, LayerNorm, plus a factorised
    2-D position embedding, LayerNorm, then the projection. The LayerNorms use torch's default eps 1e-5, as the
    reference's `nn.LayerNorm` does (not the config eps)."""

    def __init__(self, cfg: MediaConfig, hidden: int):
        super().__init__()
        d = cfg.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, d)
        self.patch_ln2 = nn.LayerNorm(d)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.mm_posemb_size, 2, d))  # (position, axis x|y, d)
        self.pos_norm = nn.LayerNorm(d)
        self.multimodal_embedder = Projection(d, hidden, cfg.vision_eps)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches (N, 6912), positions (N, 2) as (column, row) -> (N, E). The first LayerNorm and the 6912-wide
        projection run in float32 whatever the weights' dtype (llama.cpp accumulates them in float32 too)."""
        dtype, ln1, dense = self.patch_ln2.weight.dtype, self.patch_ln1, self.patch_dense
        x = F.layer_norm(patches.float(), ln1.normalized_shape, ln1.weight.float(), ln1.bias.float(), ln1.eps)
        x = self.patch_ln2(F.linear(x, dense.weight.float(), dense.bias.float()).to(dtype))
        if int(positions.max()) >= self.pos_embedding.shape[0] or int(positions.min()) < 0:
            raise ValueError(f"patch positions must lie in [0, {self.pos_embedding.shape[0]})")
        x = x + self.pos_embedding[positions[:, 0], 0] + self.pos_embedding[positions[:, 1], 1]
        return self.multimodal_embedder(self.pos_norm(x))


class Gemma4Media(nn.Module):
    """The embedders of a Unified checkpoint: `embed_vision` (images and video frames), `embed_audio`."""

    def __init__(self, cfg: MediaConfig, hidden: int):
        super().__init__()
        self.config = cfg
        self.embed_vision = VisionEmbedder(cfg, hidden) if cfg.vision else None
        self.embed_audio = (Projection(cfg.audio_embed_dim, hidden, cfg.audio_eps)
                            if cfg.audio_embed_dim else None)

    def image(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.embed_vision is None:
            raise ValueError("this checkpoint has no image embedder")
        return self.embed_vision(patches, positions)

    def audio(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (M, 640) raw 16 kHz samples, one soft token per 40 ms -> (M, E)."""
        if self.embed_audio is None:
            raise ValueError("this checkpoint has no audio embedder")
        return self.embed_audio(frames.to(self.embed_audio.embedding_projection.weight.dtype))


__all__ = ["Drafter", "Gemma4", "Gemma4Media", "MaskedHead", "MediaConfig", "RMSNorm", "media_from_hf_config"]
