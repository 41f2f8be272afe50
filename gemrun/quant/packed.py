"""Weight-only low-bit modules over PyTorch's CPU kernels, swapped in for `nn.Linear` / `nn.Embedding`.

- `Int4Linear`: 4-bit weights in groups of 32 along the input, value = (q - 8) * scale + zero, through
  `aten._weight_int4pack_mm_for_cpu` (bf16 activations). GGUF Q4_0 and Q4_1 map onto it block for block; the
  only change is the fp16 block scale (and Q4_1 minimum) rounded to bf16, the kernel's scale type.
- `Int8Linear`: 8-bit weights with one scale per output channel, through `aten._weight_int8pack_mm`.
- `Int8Embedding`: the tied embedding as int8 rows with a scale per row: rows are dequantized on lookup and the
  output head runs through the int8 kernel, so the 262k x E table is never held in floating point.

Other GGUF block types are dequantized and requantized (see `pack_gguf`); `docs` in the README say which.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from torch import nn

from . import native

GROUP = 32
INNER_K_TILES = 2


def _flat(x: torch.Tensor, out_features: int, kernel) -> torch.Tensor:
    """Run a 2-D weight-only kernel on (..., K) activations in bfloat16, returning (..., N)."""
    y = kernel(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
    return y.reshape(*x.shape[:-1], out_features)


def _int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers 0..15 -> the CPU kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32: weight = (q - 8) * scale + zero. With the native kernels: Q4_0-ordered
    nibbles and fp16 scale and minimum (zero - 8 * scale) per group; else PyTorch's int4 layout, bf16 scales."""

    def __init__(self, in_features: int, out_features: int, group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.native = group == GROUP and native.supports(in_features)
        if self.native:
            self.register_buffer("nibbles", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(out_features, in_features // group, dtype=torch.float16))
            self.register_buffer("mins", torch.empty(out_features, in_features // group, dtype=torch.float16))
        else:
            self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales_zeros", torch.empty(in_features // group, out_features, 2,
                                                             dtype=torch.bfloat16))

    @classmethod
    def from_quants(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int = GROUP):
        """q (N, K) in 0..15, scales and zeros (N, K / group): weight = (q - 8) * scale + zero."""
        n, k = q.shape
        m = cls(k, n, group)
        if m.native:
            m.nibbles = native.pack_nibbles(q)
            m.scales = scales.to(torch.float16)
            m.mins = (zeros.double() - 8 * scales.double()).to(torch.float16)  # Q4_0: -8 s, Q4_1: m, exactly
        else:
            m.packed = _int4_pack(q)
            m.scales_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()
        return m

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int = GROUP):
        """Asymmetric min/max 4-bit quantization in groups (for weights that are not already 4-bit)."""
        n, k = w.shape
        g = w.float().reshape(n, k // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
        return cls.from_quants(q.reshape(n, k), scale, lo + 8 * scale, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native.q4_mm(x, self.nibbles, self.scales, self.mins).to(x.dtype)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return _flat(x, self.out_features, lambda a: mm(a, self.packed, self.group, self.scales_zeros)).to(x.dtype)


class Int8Linear(nn.Module):
    """int8 weights, one scale per output row; with the native kernels the rows are stored in their pair
    order (`native.q8_reorder`) and the scales in float32."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.native = native.supports(in_features)
        wtype, stype = (torch.uint8, torch.float32) if self.native else (torch.int8, torch.bfloat16)
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=wtype))
        self.register_buffer("scales", torch.empty(out_features, dtype=stype))

    def set_rows(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight_int8 = native.q8_reorder(q) if self.native else q
        self.scales = scale.to(self.scales.dtype)

    @classmethod
    def from_float(cls, w: torch.Tensor):
        n, k = w.shape
        m = cls(k, n)
        m.set_rows(*quantize_rows_int8(w))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            return native.q8_mm(x, self.weight_int8, self.scales).to(x.dtype)
        mm = torch.ops.aten._weight_int8pack_mm
        return _flat(x, self.out_features, lambda a: mm(a, self.weight_int8, self.scales)).to(x.dtype)


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (the scale rounded to bf16 before quantizing, so it is exact)."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Embedding(Int8Linear):
    """The tied embedding: int8 rows with a per-row scale, dequantized on lookup; `project` is the output head."""

    def __init__(self, num: int, dim: int):
        super().__init__(dim, num)
        self.num_embeddings, self.embedding_dim = num, dim

    @classmethod
    def from_float(cls, w: torch.Tensor, chunk: int = 16384):
        return cls.from_slices(*w.shape, (w[i:i + chunk] for i in range(0, w.shape[0], chunk)))

    @classmethod
    def from_slices(cls, num: int, dim: int, slices):
        """From float row slices produced one at a time (the float table is never whole in memory)."""
        m = cls(num, dim)
        parts = [quantize_rows_int8(w) for w in slices]
        m.set_rows(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[ids]
        if self.native:  # stored in the kernels' lane order, + 128
            rows = rows[..., native.natural_order(self.embedding_dim)].int() - 128
        return rows.to(torch.bfloat16) * self.scales[ids].to(torch.bfloat16)[..., None]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def q4_blocks(raw: np.ndarray, qtype: Q, rows: int, cols: int):
    """Q4_0 / Q4_1 raw bytes -> (q (N, K) 0..15, scale (N, K/32), zero (N, K/32)) with weight = (q-8)*s + z."""
    size = 18 if qtype == Q.Q4_0 else 20
    b = raw.reshape(rows, cols // 32, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., size - 16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, cols)  # low nibbles: 0..15, high: 16..31
    if qtype == Q.Q4_0:
        zero = np.zeros_like(d)
    else:
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d  # q * d + m == (q - 8) * d + (m + 8 d)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


def q4k_blocks(raw: np.ndarray, rows: int, cols: int):
    """Q4_K raw bytes -> (q, scale, zero) per group of 32. A Q4_K super-block of 256 holds d, dmin, eight 6-bit
    (scale, min) pairs and 4-bit quants; group j is d*sc_j*q - dmin*m_j = (q - 8)*s + (8 s - dmin*m_j)."""
    b = raw.reshape(rows, cols // 256, 144)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc = b[..., 4:16].astype(np.int32)
    scale = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], axis=-1)
    qs = b[..., 16:144].reshape(rows, cols // 256, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=-2).reshape(rows, cols)  # per 64: low nibbles, then high nibbles
    s = d[..., None] * scale
    zero = 8 * s - dmin[..., None] * mins
    return torch.from_numpy(q), torch.from_numpy(s.reshape(rows, -1)), torch.from_numpy(zero.reshape(rows, -1))


INT4_DIRECT = {Q.Q4_0, Q.Q4_1, Q.Q4_K}
INT4_REQUANT = {Q.Q2_K, Q.Q3_K}  # 2-3 bit types: 4-bit groups of 32 keep their precision
INT8_REQUANT = {Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0}  # 5-8 bit types: per-channel int8


def pack_gguf(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> nn.Module | None:
    """A packed module for a GGUF matrix (N, K), or None for float types (kept dense)."""
    n, k = shape
    if qtype in INT4_DIRECT and k % GROUP == 0:
        blocks = q4k_blocks(raw, n, k) if qtype == Q.Q4_K else q4_blocks(raw, qtype, n, k)
        return Int4Linear.from_quants(*blocks)
    if qtype in INT4_REQUANT and k % GROUP == 0:
        return Int4Linear.from_float(torch.from_numpy(dequantize(raw, qtype).reshape(n, k)))
    if qtype in INT8_REQUANT:
        return Int8Linear.from_float(torch.from_numpy(dequantize(raw, qtype).reshape(n, k)))
    return None
