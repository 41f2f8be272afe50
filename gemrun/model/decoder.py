"""The decoder stack both Gemma families share: scaled token embedding, blocks, final norm, tied output head, and
one decode step of independent sequences batched together. A family brings its block and norm classes.

Shapes: B batch, T new tokens, E hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import make_caches, row_caches
from ..config import LayerSpec, TextConfig
from .layers import Embedding, rope_cos_sin, rope_inv_freq


class Decoder(nn.Module):
    """Token ids in, logits out; the KV caches passed in are updated in place. `block(cfg, spec)` builds a layer,
    `norm(dim, eps)` the final norm; `specs` overrides the config's layers (Gemma 4's drafter)."""

    def __init__(self, cfg: TextConfig, block: type[nn.Module], norm: type[nn.Module],
                 specs: tuple[LayerSpec, ...] | None = None):
        super().__init__()
        self.config = cfg
        self.specs = specs or cfg.layers
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg, spec) for spec in self.specs)
        self.norm = norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ropes = sorted({(s.head_dim, s.rope) for s in self.specs}, key=repr)  # distinct RoPE tables

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the norms: packed low-bit modules have no float weight)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    kv_type = "auto"  # the KV caches' precision (`cache.KV_TYPES`), set by the runtime

    def make_caches(self, batch: int = 1, capacity: int = 256, spare: int = 0) -> list:
        return make_caches(self.specs, batch, self.dtype, self.device, capacity, spare, self.kv_type)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # sqrt(E) is rounded to the weight dtype before the multiply (bf16: 62.0 for E=3840), as the reference.
        scale = torch.tensor(self.config.hidden_size**0.5).to(self.dtype)
        return self.embed_tokens(tokens).to(self.dtype) * scale

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output projection (a packed embedding swapped in brings its own)."""
        return self.embed_tokens.project(x)

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
        return self.logits(self.layers_forward(x, row_caches(sequences), positions))

    def layers_forward(self, x: torch.Tensor, caches: list, positions: torch.Tensor, blocks=None) -> torch.Tensor:
        """x (B, T, E) through every layer. positions (T,) shared by the rows, or (B, T) per row with one cache
        per row (then each layer's cache is a `RowCaches`)."""
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
