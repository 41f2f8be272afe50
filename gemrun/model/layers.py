"""Layers shared by the Gemma families: the tied embedding, RMSNorm, rotary embeddings, the gated MLP, masked
attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import merge
from ..config import Rope
from ..quant import native
from ..quant.packed import together


class Embedding(nn.Embedding):
    """The token embedding, tied to the output head: `project` maps hidden states (..., E) onto the vocabulary
    (..., V). A packed `Int8Embedding` swapped in for it provides the same method."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def reset_parameters(self) -> None:
        # Built on `meta` before loading there is nothing to initialise, and normal_ there would import torch's
        # decompositions (about a second of start-up).
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """Gemma 3 RMSNorm: x / rms(x) * (1 + w), computed in float32 and cast back after the scale
    (modeling_gemma3.py:Gemma3RMSNorm; unlike Llama, the multiply happens before the cast)."""

    offset = 1.0  # the weight is scaled by (offset + w)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)  # called four times per layer and token: without nn.Module's hook dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.fits(x, self.weight):  # one fused kernel, the same arithmetic
            return native.rms_norm(x, self.weight, self.offset, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_inv_freq(head_dim: int, rope: Rope) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), float32, as transformers computes them; linear scaling divides them.
    Proportional RoPE (Gemma 4 global layers) keeps the first `partial * head_dim / 2` frequencies, still over the
    full head_dim, and zeroes the rest: those dims pass through (modeling_rope_utils, proportional)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.partial < 1.0:
        inv[int(rope.partial * head_dim // 2):] = 0.0
    return inv / rope.factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin (..., T, head_dim) for absolute positions (..., T), half-split layout (cat(freqs, freqs))."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D). Rotates pairs (i, i + D/2): x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def norm_rope(x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope(norm(x), cos, sin) for x (B, H, T, D): one fused kernel for a new token on the CPU. `norm` is an
    RMSNorm over D (its `weight` may be None, `offset` + weight scales)."""
    w = norm.weight
    if x.shape[2] == 1 and native.fits(x, cos, sin, *([] if w is None else [w])):
        return native.norm_rope(x, w, norm.offset, norm.eps, cos, sin)
    return apply_rope(norm(x), cos, sin)


def linears(x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
    """[m(x) for m in modules]; packed low-bit modules share one kernel call (the input quantized once)."""
    out = together(x, modules)
    return out if out is not None else [m(x) for m in modules]


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def attention_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None,
                   blocks: torch.Tensor | None = None, block_in_window: bool = True) -> torch.Tensor:
    """(T, S) boolean mask from absolute positions: causal, empty slots (position -1) hidden, and on sliding
    layers only keys with kv > q - window (a query sees `window` keys, itself included; masking_utils.py).

    `blocks` (T,) gives the new tokens' image block ids (-1 for text): tokens of one image also see each other's
    later tokens, wherever their keys sit among the cached ones. By default the window still bounds sliding layers
    ((causal | block) & window, as `create_masks_for_vision_model` in modeling_gemma3.py); `block_in_window=False`
    is (causal & window) | block (Gemma 4's `masking_utils.py:create_masks_for_generate` with block ids)."""
    q, kv = q_pos[:, None], kv_pos[None, :]
    mask = (kv >= 0) & (kv <= q)
    if window is not None:
        mask &= kv > q - window
    if blocks is not None and len(q_pos) > 1:
        rel = kv - q_pos[0]  # a key of one of the new tokens (positions q_pos[0] ..) has its token's block
        new = (rel >= 0) & (rel < len(q_pos))
        key_blocks = torch.where(new, blocks[rel.clamp(0, len(q_pos) - 1)], -2)
        same = (blocks[:, None] == key_blocks) & (blocks[:, None] >= 0)
        if window is not None and block_in_window:
            same &= kv > q - window
        mask |= same
    return mask


def attend_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     kv_positions: torch.Tensor, window: int | None, scale: float, softcap: float | None = None,
                     blocks: torch.Tensor | None = None, block_in_window: bool = True, lse: bool = False,
                     stored: bool = False):
    """`attend` under `attention_mask(positions, kv_positions, window, blocks, block_in_window)`. One new token on
    the CPU runs a fused kernel that reads only the slots it may see (empty ring slots cost nothing) and reads a
    bfloat16 cache as it is; with `lse` (a part of a chunked cache) the unfused path also returns the log-sum-exp.
    `stored`: k, v are a cache in its own dtype, which only the fused kernel takes (else None: ask for chunks)."""
    if q.shape[2] == 1 and not lse and native.fits(q) and k.device.type == "cpu":
        out = native.attend1(q, k, v, positions, kv_positions, window, scale, softcap)
        if out is not None:
            return out
    if stored:  # a chunk deep in a bfloat16 cache under float32 activations: its open part read as stored
        if q.shape[2] > 1 and softcap is None and native.flash_open_fits(q, k, v):
            mask = attention_mask(positions, kv_positions, window, blocks, block_in_window)
            if (n := _seen_by_all(mask)) >= OPEN_KEYS:
                return _split(q, k, v, mask, scale, n)
        return None
    mask = attention_mask(positions, kv_positions, window, blocks, block_in_window)
    return attend(q, k, v, mask, scale, softcap, lse)


OPEN_KEYS = 1024  # leading keys every query of a chunk sees, from which they are attended without a mask


def _seen_by_all(mask: torch.Tensor) -> int:
    """How many leading keys every query sees (mask (T, S))."""
    hidden = ~mask.all(0)
    return int(hidden.int().argmax()) if bool(hidden.any()) else mask.shape[1]


def _split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, n: int):
    """Attention of a chunk whose first n keys every query sees (a global layer's cached part, deep in a context):
    those without a mask (a (T, S) additive mask costs the flash kernel ~20% at 24K keys), the rest (the chunk's
    own keys) with the causal one, merged by log-sum-exp."""
    whole = _flash(q, k[:, :, :n], v[:, :, :n], None, scale)
    if n == k.shape[2]:
        return whole[0]
    return merge([whole, _flash(q, k[:, :, n:], v[:, :, n:], mask[:, n:], scale)])


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """PyTorch's CPU flash kernel, no (T, S) scores held -> (out (B, H, T, D), lse (B, H, T, 1)); the query heads
    of a KV head side by side (B, KV, G*T, D), so k and v are never copied per query head. `mask` None: every query
    sees every key, and a bfloat16 k, v go to the native kernel with bfloat16 products where it applies
    (`native.flash_open`). A query that sees no key gets 0 and -inf."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    if mask is not None and bool(mask.all()):
        mask = None  # a part every query sees whole: no additive mask for the kernel to read
    if mask is None and (fast := native.flash_open(q, k, v, scale)) is not None:
        return fast
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf")).repeat(h // kv, 1)
    out, top = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(b, kv, h // kv * t, d), k.to(q.dtype), v.to(q.dtype), 0.0, False, attn_mask=bias, scale=scale)
    out, top = out.reshape(b, h, t, d), top.reshape(b, h, t, 1).float()
    if mask is None:
        return out, top
    seen = mask.any(-1)[:, None]  # (T, 1)
    return out.masked_fill(~seen, 0.0), top.masked_fill(~seen, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None = None, lse: bool = False):
    """q: (B, H, T, D), k/v: (B, KV, S, D), mask: (T, S) -> (B, H, T, D). Grouped-query attention. With `lse`,
    also the log-sum-exp of each query's scores (B, H, T, 1), so that results over parts of the keys can be merged
    (`cache.merge`); a query that sees none of these keys gets 0 and -inf."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    if not lse and softcap is None and q.device.type == "cpu" and t > 1 and (n := _seen_by_all(mask)) >= OPEN_KEYS:
        return _split(q, k, v, mask, scale, n)
    if lse and softcap is None and q.device.type == "cpu":
        return _flash(q, k, v, mask, scale)
    if lse:  # the query heads of a KV head side by side (B, KV, G*T, D): no copy of k, v per query head
        scores = (q.float().reshape(b, kv, h // kv * t, d) @ k.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.view(b, h, t, -1).masked_fill(~mask, float("-inf"))  # (B, H, T, S): head = kv * G + g
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
        total = weights.sum(-1, keepdim=True)
        out = (weights.view(b, kv, h // kv * t, -1) @ v.float()).view(b, h, t, d) / total.clamp(min=1e-30)
        return out.to(q.dtype), torch.where(total > 0, top + torch.log(total), float("-inf"))
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != kv)
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype)) @ v
