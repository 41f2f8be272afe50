"""Weight-only low-bit modules, swapped in for `nn.Linear` / `nn.Embedding`. Every format is groups of 32 along
the input with weight = q * scale + min (fp16 scale and min per group); the products run through gemrun's AVX-512
VNNI kernels (`native.py`, `q4q8.c`), or PyTorch's CPU kernels where those are missing. Symmetric formats (Q4_0,
Q8_0, Q5_0, HF int4: min = -zero * scale with one integer zero per matrix) keep no minimum (`mins` is None): decode
reads what the GGUF file holds, not 11% more. (Over 400 lines: one module per packed format kind, all sharing the
kernel dispatch here.)

- `Int4Linear`: q in 0..15. GGUF Q4_0 and Q4_1 map onto it exactly, Q4_K with its 6-bit sub-scales times the
  super-block scales rounded to fp16. PyTorch's fallback (`aten._weight_int4pack_mm_for_cpu`) rounds them to bf16.
- `Int5Linear`: q in 0..31, the native kernels only: Q5_0, Q5_1 and Q5_K at their own size (5 bits and the
  scales), exactly as `Int8Linear` holds them.
- `Int8Linear`: q in 0..255. Q8_0, Q5_0, Q5_1 (and any 4-bit type) exactly, Q5_K with fp16-rounded sub-scales,
  Q6_K (16-value sub-blocks with their own scales) by an 8-bit min/max fit per group. PyTorch's fallback
  (`aten._weight_int8pack_mm`) takes int8 with one scale per output row.
- `Int8Embedding`: the tied embedding as an `Int8Linear`: rows are dequantized on lookup and the output head runs
  through the int8 kernel, so the 262k x E table is never held in floating point. `Int4Embedding`: the same for
  a Q4_0 table, kept 4-bit.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from torch import nn

from . import native

GROUP = 32
INNER_K_TILES = 2
ZEROS = {4: (8,), 5: (16,), 8: (128, 16)}  # symmetric zero points: Q4_0 and HF int4; Q5_0; Q8_0 (int8 + 128), Q5_0


_generation = 0  # bumped whenever a packed weight's buffers change: what was made from their pointers is stale


def generation() -> int:
    return _generation


def symmetric_zero(scales: torch.Tensor, mins: torch.Tensor, bits: int) -> int | None:
    """The integer z with min = -z * scale in every group (scales as stored, fp16), or None: then the kernels need
    no minimum and the weights stay exact."""
    s, m = scales.to(torch.float16).float(), mins.float()
    return next((z for z in ZEROS[bits] if torch.equal(m, -z * s)), None)


def _flat(x: torch.Tensor, out_features: int, kernel) -> torch.Tensor:
    """Run a 2-D weight-only kernel on (..., K) activations in bfloat16, returning (..., N)."""
    y = kernel(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
    return y.reshape(*x.shape[:-1], out_features)


def _int4_pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers 0..15 -> the CPU kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)


class Groups:
    """The native layout's per-group parameters: fp16 scales, and mins unless the format is symmetric."""

    zero = 0  # with mins None: min = -zero * scale

    def set_groups(self, scales: torch.Tensor, mins: torch.Tensor | None, zero: int | None) -> None:
        """fp16 scales and mins per group; with `zero` given, no mins (min = -zero * scale)."""
        self.scales = scales.to(torch.float16)
        self.mins = None if zero is not None else mins.to(torch.float16)
        self.zero = zero or 0

    def stored_mins(self) -> torch.Tensor:
        """The fp16 mins per group, made from the scales for a symmetric format."""
        return self.mins if self.mins is not None else (-self.zero * self.scales.float()).to(torch.float16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)  # called several times per layer and token: without nn.Module's hook dispatch

    def _rows(self, stored: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight from their q (..., K) in lane order, dequantized to float32."""
        q = stored[..., native.natural_order(self.in_features)].float().unflatten(-1, (-1, GROUP))
        s = self.scales[ids].float()[..., None]
        return ((q - self.zero) * s if self.mins is None else q * s + self.mins[ids].float()[..., None]).flatten(-2)

    def __setattr__(self, name: str, value) -> None:
        if name in ("qweight", "nibbles", "high", "scales", "mins", "zero"):
            self._forget()
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self._forget()  # buffers converted or moved
        return super()._apply(fn, recurse)

    def _forget(self) -> None:
        global _generation
        _generation += 1
        self.__dict__.pop("_matrix", None)
        self.__dict__.pop("_plans", None)

    def matrix(self) -> native.Matrix:
        """The kernels' descriptor of this weight, made again after a buffer is replaced."""
        m = self.__dict__.get("_matrix")
        if m is None:
            q = self.qweight if self.bits == 8 else self.nibbles
            m = self.__dict__["_matrix"] = native.matrix(self.bits, q, self.scales, self.mins, self.zero,
                                                         self.high if self.bits == 5 else None)
        return m

    def plan(self, *others: Groups) -> native.Plan:
        """This weight and `others` (sharing its input) as one kernel call, made once while their buffers stay."""
        mats = (self.matrix(), *(m.matrix() for m in others))
        plans = self.__dict__.setdefault("_plans", {})
        key = tuple(map(id, mats))  # a plan keeps its matrices alive: an id is never reused while in here
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = native.Plan(list(mats))
        return plan

    def native_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native.mm(x, self.plan())
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def native_packed(modules) -> bool:
    """Every module is a packed linear layer on gemrun's kernels."""
    return all(isinstance(m, (Int4Linear, Int5Linear, Int8Linear)) and m.native for m in modules)


def together(x: torch.Tensor, modules) -> list[torch.Tensor] | None:
    """The outputs of several packed linear modules on the same input x (..., K) from one kernel call (the
    activations quantized once), or None where that does not apply (then call them one by one)."""
    if x.numel() // x.shape[-1] >= native.DENSE_ROWS or len(modules) > native.MAX_TOGETHER:
        return None
    if not native_packed(modules):
        return None
    y = native.mm(x, modules[0].plan(*modules[1:]))
    y = y if x.dtype == torch.float32 else y.to(x.dtype)
    return list(y.split([m.out_features for m in modules], dim=-1))


class Int4Linear(Groups, nn.Module):
    bits = 4

    """4-bit weights in groups of 32: weight = q * scale + min, q in 0..15. Native: nibbles in lane order
    (`native.pack_nibbles`), fp16 scale and min per group (no min for symmetric formats: min = -zero * scale);
    else PyTorch's int4 layout, bf16 scale and zero."""

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
    def from_quants(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int = GROUP):
        """q (N, K) in 0..15, scales and mins (N, K / group): weight = q * scale + min."""
        n, k = q.shape
        m = cls(k, n, group)
        if m.native:
            m.nibbles = native.pack_nibbles(q)
            m.set_groups(scales, mins, symmetric_zero(scales, mins, 4))
        else:  # PyTorch's kernel: weight = (q - 8) * scale + zero
            m.packed = _int4_pack(q)
            zeros = mins.double() + 8 * scales.double()
            m.scales_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()
        return m

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int = GROUP):
        """Asymmetric min/max 4-bit quantization in groups (for weights that are not already 4-bit)."""
        return cls.from_quants(*fit_groups(w, 15, group), group)

    def quants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of `from_quants`: q (N, K) in 0..15 in element order, scales and mins (N, K / group)."""
        n, k = self.out_features, self.in_features
        if self.native:
            stored = _unnibble(self.nibbles)  # lane order, as `pack_nibbles` wrote it
            return stored[:, native.natural_order(k)], self.scales.float(), self.stored_mins().float()
        scales, zeros = self.scales_zeros.double().unbind(-1)  # PyTorch's weight = (q - 8) * scale + zero
        return _int4_unpack(self.packed, n, k), scales.T, (zeros - 8 * scales).T

    def narrow(self, dim: int, start: int, length: int) -> Int4Linear:
        """Output rows (dim 0) or input columns (dim 1, whole groups) start..start+length of the weight, as a
        module of their own holding the same quantized values (a tensor-parallel shard)."""
        return type(self).from_quants(*_narrow(self.quants(), dim, start, length, self.group), self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.numel() // self.in_features < native.DENSE_ROWS:
            return self.native_forward(x)
        if self.native:
            return native.q4_mm(x, self.nibbles, self.scales, self.mins, self.zero).to(x.dtype)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return _flat(x, self.out_features, lambda a: mm(a, self.packed, self.group, self.scales_zeros)).to(x.dtype)


def _unnibble(b: torch.Tensor) -> torch.Tensor:
    """Native 4-bit rows (..., K/2) bytes -> q (..., K) in lane order (`native.pack_nibbles` undone)."""
    b = b.reshape(*b.shape[:-1], -1, 64)
    return torch.cat([b & 15, b >> 4], dim=-1).flatten(-2)


class _Table:
    """A packed linear read as the tied embedding: `forward` looks rows up (dequantized, float32; the model casts
    to its dtype), `project` is the output head."""

    def __init__(self, num: int, dim: int):
        super().__init__(dim, num)
        self.num_embeddings, self.embedding_dim = num, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_rows(ids)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class Int4Embedding(_Table, Int4Linear):
    """The tied embedding kept 4-bit where the file's table is (Q4_0: half the bytes `Int8Embedding` would read for
    every decoded token's head)."""

    @classmethod
    def of(cls, m: Int4Linear) -> Int4Embedding:
        """The same quantized table (native layout) as an embedding."""
        e = cls(m.out_features, m.in_features)
        e.nibbles = m.nibbles
        e.set_groups(m.scales, m.mins, m.zero if m.mins is None else None)
        return e

    def narrow(self, dim: int, start: int, length: int) -> Int4Embedding:
        """Rows start..start+length of the table (a vocabulary shard)."""
        if dim != 0:
            raise ValueError("an embedding is cut by rows only")
        return Int4Embedding.of(Int4Linear.from_quants(*_narrow(self.quants(), 0, start, length, GROUP)))

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the table, dequantized to float32."""
        return self._rows(_unnibble(self.nibbles[ids]), ids)


def _int4_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """q (N, K) from PyTorch's CPU int4 layout: blocks of 64 output rows stored (K, 32) bytes, row j of a block
    in the low nibbles and row j + 32 in the high ones (`_convert_weight_to_int4pack_for_cpu`)."""
    if n % 64:
        raise ValueError(f"cannot cut a {n}-row int4 weight in PyTorch's layout (rows must be a multiple of 64)")
    b = packed.reshape(n // 64, k, 32)
    return torch.cat([b & 15, b >> 4], dim=-1).permute(0, 2, 1).reshape(n, k)


def _narrow(quants: tuple[torch.Tensor, ...], dim: int, start: int, length: int, group: int) -> tuple:
    """(q, scales, mins) cut to output rows or to input columns (whole groups of `group`)."""
    q, scales, mins = quants
    if dim == 0:
        return q[start:start + length], scales[start:start + length], mins[start:start + length]
    if start % group or length % group:
        raise ValueError(f"input columns {start}..{start + length} do not fall on groups of {group}")
    g = slice(start // group, (start + length) // group)
    return q[:, start:start + length], scales[:, g], mins[:, g]


def fit_groups(w: torch.Tensor, top: int, group: int = GROUP):
    """Asymmetric min/max fit per group: (q in 0..top, scale, min) with weight ~ q * scale + min."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / top).clamp(min=1e-10).to(torch.float16).float()
    mins = lo.to(torch.float16).float()
    q = torch.round((g - mins[..., None]) / scale[..., None]).clamp(0, top)
    return q.reshape(n, k).to(torch.uint8), scale, mins


class Int5Linear(Groups, nn.Module):
    bits = 5

    """5-bit weights in groups of 32 for the native kernels: weight = q * scale + min, q in 0..31 kept as the low
    nibbles (`native.pack_nibbles`) and a plane of high bits (`native.pack_high`), fp16 scale and min per group (no
    min for Q5_0: min = -16 * scale). `from_quants` gives an `Int8Linear` where the kernels are not there."""

    native = True

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("nibbles", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("high", torch.empty(out_features, in_features // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // GROUP, dtype=torch.float16))
        self.register_buffer("mins", torch.empty(out_features, in_features // GROUP, dtype=torch.float16))

    @classmethod
    def from_quants(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        """q (N, K) in 0..31, scales and mins (N, K / 32): weight = q * scale + min."""
        n, k = q.shape
        if not native.supports(k):
            return Int8Linear.from_quants(q, scales, mins)
        m = cls(k, n)
        m.nibbles, m.high = native.pack_nibbles(q & 15), native.pack_high(q)
        m.set_groups(scales, mins, symmetric_zero(scales, mins, 5))
        return m

    def quants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of `from_quants`: q (N, K) in 0..31 in element order, scales and mins (N, K / 32)."""
        n, k = self.out_features, self.in_features
        b = self.nibbles.reshape(n, k // 128, 64)
        stored = torch.cat([b & 15, b >> 4], dim=-1).reshape(n, k)
        bits = (self.high[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1
        stored = stored | (bits.reshape(n, k) << 4)
        return stored[:, native.natural_order(k)], self.scales.float(), self.stored_mins().float()

    def narrow(self, dim: int, start: int, length: int) -> nn.Module:
        """Output rows (dim 0) or input columns (dim 1, whole groups) of the weight (a tensor-parallel shard)."""
        return Int5Linear.from_quants(*_narrow(self.quants(), dim, start, length, GROUP))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features < native.DENSE_ROWS:
            return self.native_forward(x)
        return native.q5_mm(x, self.nibbles, self.high, self.scales, self.mins, self.zero).to(x.dtype)


class Int8Linear(Groups, nn.Module):
    bits = 8

    """8-bit weights. Native: groups of 32, weight = q * scale + min, q in 0..255 in lane order (`native.q8_reorder`),
    fp16 scale and min per group (none for symmetric formats: min = -zero * scale). Else PyTorch's layout: int8
    with one bf16 scale per output row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.native = native.supports(in_features)
        if self.native:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(out_features, in_features // GROUP, dtype=torch.float16))
            self.register_buffer("mins", torch.empty(out_features, in_features // GROUP, dtype=torch.float16))
        else:
            self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))

    @classmethod
    def from_quants(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        """q (N, K) in 0..255, scales and mins (N, K / 32): weight = q * scale + min."""
        n, k = q.shape
        m = cls(k, n)
        if m.native:
            m.qweight = native.q8_reorder(q)
            m.set_groups(scales, mins, symmetric_zero(scales, mins, 8))
        else:
            w = q.float().reshape(n, -1, GROUP) * scales.float()[..., None] + mins.float()[..., None]
            m.weight_int8, m.scales = quantize_rows_int8(w.reshape(n, k))
        return m

    @classmethod
    def from_float(cls, w: torch.Tensor):
        """Symmetric 8-bit per group of 32, bit for bit the `gguf` package's Q8_0 (without the native kernels:
        int8 per output row)."""
        n, k = w.shape
        m = cls(k, n)
        if not m.native:
            m.weight_int8, m.scales = quantize_rows_int8(w)
            return m
        return cls.from_quants(*int8_blocks(quantize(w.float().numpy(), Q.Q8_0), Q.Q8_0, n, k))

    def quants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of `from_quants` (native layout): q (N, K) in 0..255 in element order, scales, mins."""
        return self.qweight[:, native.natural_order(self.in_features)], self.scales.float(), self.stored_mins().float()

    def narrow(self, dim: int, start: int, length: int) -> Int8Linear:
        """Output rows (dim 0) or input columns (dim 1, whole groups of 32) of the weight, as an `Int8Linear` of
        their own holding the same quantized values (a tensor-parallel shard)."""
        if self.native:
            return Int8Linear.from_quants(*_narrow(self.quants(), dim, start, length, GROUP))
        # PyTorch's layout, int8 with one scale per output row: rows and columns are cut as they are
        rows = slice(start, start + length) if dim == 0 else slice(None)
        cols = slice(start, start + length) if dim == 1 else slice(None)
        m = Int8Linear(self.weight_int8[rows, cols].shape[1], self.weight_int8[rows, cols].shape[0])
        if m.native:  # a column slice of a weight the kernels could not take is no multiple of 128 either
            raise ValueError("cannot cut an int8 weight of PyTorch's layout into the native one")
        m.weight_int8, m.scales = self.weight_int8[rows, cols].contiguous(), self.scales[rows].contiguous()
        return m

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized to float32."""
        if not self.native:
            return self.weight_int8[ids].float() * self.scales[ids].float()[..., None]
        return self._rows(self.qweight[ids], ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.numel() // self.in_features < native.DENSE_ROWS:
            return self.native_forward(x)
        if self.native:
            return native.q8_mm(x, self.qweight, self.scales, self.mins, self.zero).to(x.dtype)
        mm = torch.ops.aten._weight_int8pack_mm
        return _flat(x, self.out_features, lambda a: mm(a, self.weight_int8, self.scales)).to(x.dtype)


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (the scale rounded to bf16 before quantizing, so it is exact)."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Embedding(_Table, Int8Linear):
    """The tied embedding as 8-bit rows, dequantized on lookup; `project` is the output head."""

    @classmethod
    def from_float(cls, w: torch.Tensor, chunk: int = 16384):
        return cls.from_parts(*w.shape, (Int8Linear.from_float(w[i:i + chunk]) for i in range(0, w.shape[0], chunk)))

    @classmethod
    def from_parts(cls, num: int, dim: int, parts):
        """From `Int8Linear`s of consecutive row slices, made one at a time (the float table is never whole)."""
        m = cls(num, dim)
        if not m.native:
            parts = list(parts)
            for name, _ in list(m.named_buffers()):
                setattr(m, name, torch.cat([getattr(p, name) for p in parts]))
            return m
        # each slice is copied into place as it comes: the whole table exists once, never twice
        q, scales, mins = torch.empty_like(m.qweight), torch.empty_like(m.scales), None
        row, zero = 0, None  # zero: the common zero point of the symmetric slices so far (None: mins kept)
        for p in parts:
            r, z = p.out_features, p.zero if p.mins is None else None
            if row == 0:
                zero = z
            if mins is None and (z is None or z != zero):  # slices of differing kinds keep mins
                mins = torch.empty_like(scales)
                mins[:row] = (-(zero or 0) * scales[:row].float()).to(torch.float16)
            q[row:row + r], scales[row:row + r] = p.qweight, p.scales
            if mins is not None:
                mins[row:row + r] = p.stored_mins()
            row += r
        m.qweight = q
        m.set_groups(scales, mins, zero if mins is None else None)
        return m

    def narrow(self, dim: int, start: int, length: int) -> Int8Embedding:
        """Rows start..start+length of the table (a vocabulary shard)."""
        if dim != 0:
            raise ValueError("an embedding is cut by rows only")
        return Int8Embedding.from_parts(length, self.embedding_dim, [Int8Linear.narrow(self, 0, start, length)])


def parameter_count(model: nn.Module) -> int:
    """Weights as the float model holds them: packed modules count by their shape."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear)))
    return packed + sum(p.numel() for p in model.parameters())


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return b[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 packed 6-bit (scale, min) pairs of a Q4_K / Q5_K super-block (bytes 4..16)."""
    sc = b[..., 4:16].astype(np.int32)
    scale = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], axis=-1)
    return scale, mins


def _bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit planes of uint8 bytes: (..., nbytes) -> (..., nbytes * 8) in bit order."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :count]


def q4_blocks(raw: np.ndarray, qtype: Q, rows: int, cols: int):
    """Q4_0 / Q4_1 / Q4_K raw bytes -> (q (N, K) 0..15, scale (N, K/32), min (N, K/32)), weight = q * s + m.
    Q4_K: a super-block of 256 holds d, dmin, eight 6-bit (scale, min) pairs and 4-bit quants; group j is
    d*sc_j*q - dmin*m_j."""
    if qtype == Q.Q4_K:
        b = raw.reshape(rows, cols // 256, 144)
        scale, mins = _k_scales(b)
        qs = b[..., 16:144].reshape(rows, cols // 256, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=-2).reshape(rows, cols)  # per 64: low nibbles, then high nibbles
        s, m = _f16(b, 0)[..., None] * scale, -_f16(b, 2)[..., None] * mins
    else:
        size = 18 if qtype == Q.Q4_0 else 20
        b = raw.reshape(rows, cols // 32, size)
        qs = b[..., size - 16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, cols)  # low nibbles: 0..15, high: 16..31
        s = _f16(b, 0)
        m = -8 * s if qtype == Q.Q4_0 else _f16(b, 2)
    return torch.from_numpy(q), torch.from_numpy(s.reshape(rows, -1)), torch.from_numpy(m.reshape(rows, -1))


def int8_blocks(raw: np.ndarray, qtype: Q, rows: int, cols: int):
    """Q8_0 / Q5_0 / Q5_1 / Q5_K (and the 4-bit types) raw bytes -> (q (N, K) 0..255, scale, min), exact."""
    if qtype in INT4_DIRECT:
        return q4_blocks(raw, qtype, rows, cols)
    if qtype == Q.Q8_0:
        b = raw.reshape(rows, cols // 32, 34)
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        s = _f16(b, 0)
        m = -128 * s
    elif qtype in (Q.Q5_0, Q.Q5_1):
        at = 2 if qtype == Q.Q5_0 else 4
        b = raw.reshape(rows, cols // 32, at + 20)
        qs, high = b[..., at + 4:], _bits(b[..., at:at + 4], 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=-1) | (high << 4)
        s = _f16(b, 0)
        m = -16 * s if qtype == Q.Q5_0 else _f16(b, 2)
    elif qtype == Q.Q5_K:
        b = raw.reshape(rows, cols // 256, 176)
        scale, mins = _k_scales(b)
        high = _bits(b[..., 16:48], 256).reshape(rows, cols // 256, 32, 8)  # bit j of byte l: group j, element l
        qs = b[..., 48:176].reshape(rows, cols // 256, 4, 32)
        low = np.stack([qs & 15, qs >> 4], axis=-2).reshape(rows, cols // 256, 8, 32)
        q = low | (high.transpose(0, 1, 3, 2) << 4)
        s, m = _f16(b, 0)[..., None] * scale, -_f16(b, 2)[..., None] * mins
    else:
        raise ValueError(f"{qtype.name} has no exact 8-bit form")
    return (torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols)), torch.from_numpy(s.reshape(rows, -1)),
            torch.from_numpy(m.reshape(rows, -1)))


INT4_DIRECT = {Q.Q4_0, Q.Q4_1, Q.Q4_K}
INT4_REQUANT = {Q.Q2_K, Q.Q3_K}  # 2-3 bit types: 4-bit groups of 32 keep their precision
INT8_DIRECT = {Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q5_K}
INT5_DIRECT = {Q.Q5_0, Q.Q5_1, Q.Q5_K}  # 5-bit: kept at their size where the kernels are there
INT8_REQUANT = {Q.Q6_K}  # 16-value sub-blocks with their own scales: an 8-bit fit per group of 32


REPACKED = {Q.Q4_0: (4, 8), Q.Q8_0: (8, 128)}  # formats the kernels take straight from the file: bits, zero


def repackable(qtype: Q, k: int, bits: int) -> bool:
    """Whether `repacked` takes a matrix of this type, row length and module width (it checks the scales)."""
    return qtype in REPACKED and REPACKED[qtype][0] == bits and k % GROUP == 0 and native.supports(k)


def repacked(raw: np.ndarray, qtype: Q, shape: tuple[int, int], cls):
    """`cls` (an `Int4Linear` for Q4_0, an `Int8Linear` for Q8_0) made from the file's blocks in one native pass
    (a 12B loads in seconds), or None where that does not apply. ValueError for non-finite scales."""
    n, k = shape
    if not repackable(qtype, k, cls.bits):
        return None
    if raw.size != n * (k // GROUP) * (18 if qtype == Q.Q4_0 else 34):
        raise ValueError(f"{qtype.name} matrix {shape} holds {raw.size} bytes")
    q, scales = native.from_gguf(raw, qtype.name, n, k)
    m = cls(k, n)
    if cls.bits == 4:
        m.nibbles = q
    else:
        m.qweight = q
    m.set_groups(scales, None, REPACKED[qtype][1])
    return m


def int8_module(raw: np.ndarray, qtype: Q, shape: tuple[int, int], cls=Int8Linear) -> Int8Linear:
    """An 8-bit module (`cls`) for any quantized GGUF matrix: exact where the block format allows."""
    n, k = shape
    if (m := repacked(raw, qtype, shape, cls)) is not None:
        return m
    if qtype in INT8_DIRECT | INT4_DIRECT and k % GROUP == 0:
        return cls.from_quants(*int8_blocks(raw, qtype, n, k))
    w = torch.from_numpy(dequantize(raw, qtype).reshape(n, k))
    if qtype in INT8_REQUANT | INT4_REQUANT and k % GROUP == 0 and native.supports(k):
        return cls.from_quants(*fit_groups(w, 255))
    return cls.from_float(w)


def pack_gguf(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> nn.Module | None:
    """A packed module for a GGUF matrix (N, K), or None for float types (kept dense)."""
    n, k = shape
    if (m := repacked(raw, qtype, shape, Int4Linear if qtype == Q.Q4_0 else Int8Linear)) is not None:
        return m
    if qtype in INT4_DIRECT and k % GROUP == 0:
        return Int4Linear.from_quants(*q4_blocks(raw, qtype, n, k))
    if qtype in INT4_REQUANT and k % GROUP == 0:
        return Int4Linear.from_float(torch.from_numpy(dequantize(raw, qtype).reshape(n, k)))
    if qtype in INT5_DIRECT and k % GROUP == 0:
        return Int5Linear.from_quants(*int8_blocks(raw, qtype, n, k))
    if qtype in INT8_DIRECT | INT8_REQUANT:
        return int8_module(raw, qtype, shape)
    return None
