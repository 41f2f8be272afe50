"""The Gemma 3 text decoder, as transformers' `modeling_gemma3.py` defines it.

Shapes: B batch, T new tokens, S cached keys, H query heads, KV key/value heads, D head_dim, E hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import make_caches
from ..config import LayerSpec, TextConfig
from .layers import GatedMLP, RMSNorm, apply_rope, attend, attention_mask, rope_cos_sin, rope_inv_freq


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec, self.heads = spec, cfg.num_heads
        d, kv = spec.head_dim, spec.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # QK-norm over head_dim, before RoPE
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache, positions: torch.Tensor,
                blocks: torch.Tensor | None = None):
        b, t, _ = x.shape
        d, kv = self.spec.head_dim, self.spec.num_kv_heads
        q = self.q_proj(x).view(b, t, self.heads, d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, kv, d).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, kv, d).transpose(1, 2)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if isinstance(cache, tuple):  # batched decoding: row i is its own sequence, with its own cache
            y = torch.cat([self.attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], c, positions[i], blocks)
                           for i, c in enumerate(cache)])
        else:
            y = self.attend(q, k, v, cache, positions, blocks)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * d))

    def attend(self, q, k, v, cache, positions, blocks):
        k, v, kv_pos = cache.update(k, v, positions)  # (B, KV, S, D), kv_pos (S,)
        mask = attention_mask(positions, kv_pos, self.spec.window, blocks)
        return attend(q, k, v, mask, self.scale, self.softcap)


class Block(nn.Module):
    """Sandwich norms around attention and MLP."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, rope, cache, positions, blocks=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, positions, blocks))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    """Token ids in, logits out; the KV caches passed in are updated in place."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.specs = cfg.layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in self.specs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ropes = sorted({(s.head_dim, s.rope) for s in self.specs}, key=repr)  # distinct RoPE tables

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the norms: packed low-bit modules have no float weight)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def make_caches(self, batch: int = 1, capacity: int = 256, spare: int = 0) -> list:
        return make_caches(self.specs, batch, self.dtype, self.device, capacity, spare)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # sqrt(E) is rounded to the weight dtype before the multiply (bf16: 62.0 for E=3840), as the reference.
        scale = torch.tensor(self.config.hidden_size**0.5).to(self.dtype)
        return self.embed_tokens(tokens).to(self.dtype) * scale

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output projection (a packed embedding brings its own)."""
        emb = self.embed_tokens
        return emb.project(x) if hasattr(emb, "project") else x @ emb.weight.T

    def forward(self, tokens: torch.Tensor | None, caches: list, embeds: torch.Tensor | None = None,
                last_only: bool = False, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) continuing the caches -> logits (B, T, V), or (B, 1, V) with `last_only`.
        `embeds` (B, T, E), when given, replaces the embedded tokens (prompts with image soft tokens);
        `blocks` (T,) marks image tokens that attend to each other bidirectionally."""
        h = self.hidden(tokens, caches, embeds, blocks)
        return self.project(h[:, -1:] if last_only else h)

    def hidden(self, tokens: torch.Tensor | None, caches: list, embeds: torch.Tensor | None = None,
               blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Like `forward`, but the final-normed hidden states (B, T, E) (what Gemma 4's MTP drafter reads)."""
        start = caches[0].length
        x = self.embed(tokens) if embeds is None else embeds  # (B, T, E)
        positions = torch.arange(start, start + x.shape[1], device=x.device)  # (T,)
        return self.norm(self.layers_forward(x, caches, positions, blocks))

    def decode(self, tokens: torch.Tensor, sequences: list[list]) -> torch.Tensor:
        """One step of B independent sequences batched together: tokens (B, 1), sequences[i] the caches of
        row i (each at its own length) -> logits (B, 1, V). Matmuls run batched; attention runs per row."""
        if len(sequences) == 1:
            return self(tokens, sequences[0])
        x = self.embed(tokens)
        positions = torch.tensor([[s[0].length] for s in sequences], device=x.device)  # (B, 1)
        return self.logits(self.layers_forward(x, list(zip(*sequences)), positions))

    def layers_forward(self, x: torch.Tensor, caches: list, positions: torch.Tensor, blocks=None) -> torch.Tensor:
        """x (B, T, E) through every layer. positions (T,) shared by the rows, or (B, T) per row with one cache
        per row (then each layer's cache is a tuple of B caches)."""
        # inv_freq is recomputed in float32 each call: tiny, and never rounded by a dtype cast of the module
        by_key = {}
        for dim, rope in self.ropes:
            cos, sin = rope_cos_sin(positions, rope_inv_freq(dim, rope).to(x.device), x.dtype)
            by_key[(dim, rope)] = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])
        for layer, spec, cache in zip(self.layers, self.specs, caches):
            x = layer(x, by_key[(spec.head_dim, spec.rope)], cache, positions, blocks)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, E) -> logits (B, T, V), soft-capped where configured."""
        logits = self.head(x)  # (B, T, V)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits
