"""The Gemma 3 text decoder, as transformers' `modeling_gemma3.py` defines it.

Shapes: B batch, T new tokens, S cached keys, H query heads, KV key/value heads, D head_dim, E hidden size.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..config import LayerSpec, TextConfig
from ..quant import native, packed
from ..quant.packed import native_packed
from .decoder import Decoder
from .layers import GatedMLP, RMSNorm, attend_positions, linears, norm_rope


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
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.heads, d).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, kv, d).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(b, t, kv, d).transpose(1, 2)
        q, k = norm_rope(q, self.q_norm, *rope), norm_rope(k, self.k_norm, *rope)
        return self.o_proj(self.cached(q, k, v, cache, positions, blocks))

    def cached(self, q, k, v, cache, positions: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
        """Stores k, v (B, KV, T, D) and attends q (B, H, T, D) over the cache -> (B, T, H * D), before o_proj."""
        b, _, t, d = q.shape
        y = cache.attend(q, k, v, positions, partial(self.attend, blocks=blocks))  # (B, H, T, D)
        return y.transpose(1, 2).reshape(b, t, self.heads * d)

    def attend(self, q, k, v, positions, kv_positions, blocks, lse=False, stored=False):
        """q (B, H, T, D) over the cached k, v (B, KV, S, D), masked by absolute positions (T,) and (S,)."""
        return attend_positions(q, k, v, positions, kv_positions, self.spec.window, self.scale, self.softcap, blocks,
                                lse=lse, stored=stored)


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
        if (x.shape[0] == x.shape[1] == 1 and x.dtype == torch.float32 and x.is_cpu
                and (args := self.decode_args()) is not None and (slot := cache.store_one()) is not None):
            return native.block_decode(args, x.contiguous(), *rope, *slot, positions)  # see fused_forward
        if self.fused(x, rope):
            return self.fused_forward(x, rope, cache, positions, blocks)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, positions, blocks))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def fused(self, x: torch.Tensor, rope) -> bool:
        """The two fused kernels of `fused_forward` apply: packed weights on gemrun's kernels, float32, few rows,
        and one RoPE position for all rows or one per row (not T positions shared by B > 1 rows)."""
        attn, mlp = self.self_attn, self.mlp
        return (rope[0].numel() // rope[0].shape[-1] in (1, x.shape[0] * x.shape[1])
                and native.block_fits(x, mlp.gate_proj.out_features, self.input_layernorm.weight, attn.q_norm.weight)
                and native_packed((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                                   mlp.down_proj)))

    def fused_forward(self, x, rope, cache, positions, blocks=None):
        """`forward`'s arithmetic in two native calls around the cache: the input norm, q/k/v projections, QK-norm
        and RoPE in one; o_proj, both residual adds, the MLP and its norms in the other. (One new token of one
        sequence whose cache the kernel can write takes one call for everything: `native.block_decode`.)"""
        attn, mlp, eps = self.self_attn, self.mlp, self.input_layernorm.eps
        b, t, _ = x.shape
        h, kv, d = attn.heads, attn.spec.num_kv_heads, attn.spec.head_dim
        qkv = native.block_qkv(x, self.input_layernorm.weight, RMSNorm.offset, eps,
                               attn.q_proj.plan(attn.k_proj, attn.v_proj), h, kv, d, attn.q_norm.weight,
                               attn.k_norm.weight, *rope).view(b, t, -1)
        q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in qkv.split([h * d, kv * d, kv * d], dim=-1))
        y = attn.cached(q, k, v, cache, positions, blocks)
        return native.block_ffn(x, y, attn.o_proj.plan(), mlp.gate_proj.plan(mlp.up_proj), mlp.down_proj.plan(),
                                self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                                self.post_feedforward_layernorm.weight, RMSNorm.offset, eps)

    def decode_args(self):
        """`native.BlockArgs` for `block_decode`, or None where the fused kernels do not take this block (float32
        activations are the caller's to check). Made once and kept while the linear modules are the same ones, no
        packed weight's buffers change and the norm weights stay where they are; checked on every call, so read
        through the module dicts (nn.Module's attribute lookup costs more than the rest of the call)."""
        mods, attn, mlp = self._modules, self._modules["self_attn"]._modules, self._modules["mlp"]._modules
        norms = (mods["input_layernorm"]._parameters["weight"], attn["q_norm"]._parameters["weight"],
                 attn["k_norm"]._parameters["weight"], mods["post_attention_layernorm"]._parameters["weight"],
                 mods["pre_feedforward_layernorm"]._parameters["weight"],
                 mods["post_feedforward_layernorm"]._parameters["weight"])
        key = (packed.generation(), attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"], mlp["gate_proj"],
               mlp["up_proj"], mlp["down_proj"], *(w.data_ptr() for w in norms))
        made = self.__dict__.get("_decode_args")
        if made is None or made[0] != key:
            made = self.__dict__["_decode_args"] = (key, self._make_decode_args(norms))
        return made[1]

    def _make_decode_args(self, norms):
        attn, mlp = self.self_attn, self.mlp
        d, kv = attn.spec.head_dim, attn.spec.num_kv_heads
        probe = norms[0].new_empty(1, 1, norms[0].shape[0])  # what fused() asks of x, on a decode step's shape
        if not (self.fused(probe, (probe[0, :, :d], None)) and d % 16 == 0 and d <= 512 and attn.heads % kv == 0):
            return None
        plans = (attn.q_proj.plan(attn.k_proj, attn.v_proj), attn.o_proj.plan(), mlp.gate_proj.plan(mlp.up_proj),
                 mlp.down_proj.plan())
        return native.block_args(attn.heads, kv, d, attn.spec.window, RMSNorm.offset, self.input_layernorm.eps,
                                 attn.scale, attn.softcap, norms, plans)


class Gemma3(Decoder):
    """Token ids in, logits out (the shared `Decoder` with Gemma 3 blocks and norm)."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, Block, RMSNorm)
