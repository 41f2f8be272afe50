"""GGML's Q4_K block format, written as llama.cpp's reference quantizer writes it (the `gguf` package only
dequantizes it): 256-value super-blocks of eight 32-value sub-blocks, each with a 6-bit scale and min."""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # values per K-quant super-block


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
          nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's `make_qkx2_quants` for rows of `x` (S, n) with importance `w`: an asymmetric grid
    x ~ scale * l + min, l in 0..nmax, min <= 0. Starts from the min/max grid, then tries 21 stretched grids,
    each fitted by weighted least squares, keeping the lowest weighted error; as in the C code, a better fit's
    min becomes the offset of the grids tried after it. Returns (scale, -min), each (S,)."""
    hi = x.amax(1)
    mn = x.amin(1).clamp(max=0)
    flat = hi == mn
    sum_w, sum_x = w.sum(1), (w * x).sum(1)

    def grid(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)

    def span() -> torch.Tensor:
        return (hi - mn).clamp(min=1e-30)

    scale = span() / nmax
    best = (w * (scale[:, None] * grid(nmax / span()) + mn[:, None] - x) ** 2).sum(1)
    for i in range(nstep + 1):
        lv = grid((rmin + rdelta * i + nmax) / span())
        sum_l, sum_l2, sum_xl = (w * lv).sum(1), (w * lv * lv).sum(1), (w * lv * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # the grid must reach down to 0: refit the scale alone through the origin
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale[:, None] * lv + this_min[:, None] - x) ** 2).sum(1)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale, mn = torch.where(better, this_scale, scale), torch.where(better, this_min, mn)
    return torch.where(flat, torch.zeros_like(scale), scale), -mn


def quantize_q4_k(t: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """float32 (..., K) with K % 256 == 0 -> GGML block_q4_K bytes (..., K / 256 * 144), as llama.cpp's
    `quantize_row_q4_K_ref` (no importance matrix) computes them. A block: fp16 d and dmin, then 12 bytes of
    eight 6-bit (scale, min) pairs, then 128 bytes of 4-bit quants; sub-block j of 32 values decodes to
    d * sc_j * q - dmin * m_j. Each sub-block is fitted by `_qkx2` with weights |x| + rms(sub-block), the eight
    scales and mins are quantized to 6 bits against their maxima, and the quants recomputed on that grid."""
    x = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).reshape(-1, 8, 32)
    out = torch.empty(x.shape[0], 144, dtype=torch.uint8)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = _q4_k_blocks(x[s:s + chunk])
    return out.numpy().reshape(*t.shape[:-1], t.shape[-1] // QK_K * 144)


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]  # x: (B, 8, 32)
    w = x.abs() + x.pow(2).mean(-1, keepdim=True).sqrt()
    scales, mins = (v.reshape(b, 8) for v in _qkx2(x.reshape(-1, 32), w.reshape(-1, 32)))
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    ls = torch.round(scales * torch.where(max_scale > 0, 63 / max_scale, 0)).clamp(max=63).to(torch.uint8)
    lm = torch.round(mins * torch.where(max_min > 0, 63 / max_min, 0)).clamp(max=63).to(torch.uint8)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    step, offset = d.float() * ls, dmin.float() * lm  # (B, 8): what the decoder will use, fp16 rounding included
    q = torch.round((x + offset[..., None]) / torch.where(step > 0, step, 1)[..., None]).clamp(0, 15)
    q = torch.where(step[..., None] > 0, q, 0).to(torch.uint8).reshape(b, 4, 2, 32)
    packed = torch.cat([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                        (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4], dim=1)  # (B, 12)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), packed,
                      (q[:, :, 0] | q[:, :, 1] << 4).reshape(b, 128)], dim=1)

