"""The quantized HF safetensors layout that `gemrun convert` writes and the loader reads.

HF quantized directories (`int4-channel`, `int4-block`, `fp8`) hold, per quantized matrix `W`:
- int4: `W.qweight` (uint8, two values per byte, low nibble first, q + 8 for q in -8..7) and `W.scales`
  (float16, one per output channel or per group), weight = q * scale;
- fp8: `W.weight` (float8_e4m3fn) and `W.weight_scale` (float32, one per tensor or per output channel).
`gemrun_quant.json` names the scheme, the group size and the tensors kept in higher precision.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsError
from ..files import model_file
from . import packed as P

log = logging.getLogger("gemrun.quant")
HF_QUANTS = ("int4-channel", "int4-block", "fp8")
QUANT_FILE = "gemrun_quant.json"
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of `group` inputs (group = K: per output channel): (packed uint8 (N, K/2),
    float16 scales (N, K/group)); q = round(w / scale) in -8..7 with scale = max|w| / 7 (rounded to fp16 first,
    so dequantizing is exact)."""
    n, k = w.shape
    if k % group or group % 2:
        raise ConfigError(f"group size {group} does not divide the {k} inputs of a matrix into even groups")
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(-1) / 7).clamp(min=2**-24).to(torch.float16)
    q = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int16) + 8
    q = q.reshape(n, k).to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float() - 8
    n, k = q.shape
    return (q.reshape(n, scales.shape[1], -1) * scales.float()[..., None]).reshape(n, k)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) values 0..15 (low nibble first)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_fp8(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn with a float32 scale per tensor or per output channel: weight = fp8 * scale."""
    amax = w.abs().amax(-1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w.float() * scale.float()


def read_scheme(root: Path) -> dict | None:
    path = model_file(root, QUANT_FILE)
    if path is None:
        return None
    try:
        scheme = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(scheme, dict) or scheme.get("scheme") not in HF_QUANTS:
        raise WeightsError(f"{path}: not a known quantization scheme ({', '.join(HF_QUANTS)})")
    return scheme


def quantized_parts(names: Iterator[str]) -> dict[str, tuple[str, str]]:
    """Checkpoint tensor names -> {matrix weight name: (values tensor, scales tensor)} of a quantized directory."""
    names = set(names)
    parts = {}
    for n in names:
        if n.endswith(".qweight") and n.removesuffix(".qweight") + ".scales" in names:
            parts[n.removesuffix(".qweight") + ".weight"] = (n, n.removesuffix(".qweight") + ".scales")
        elif n.endswith(".weight_scale") and n.removesuffix("_scale") in names:
            parts[n.removesuffix("_scale")] = (n.removesuffix("_scale"), n)
    return parts


_warned: set[str] = set()


def quantized_module(scheme: dict, values: torch.Tensor, scales: torch.Tensor, packed: bool):
    """An `Int4Linear` for int4 groups that are whole multiples of 32 (exact: weight = q * scale with fp16 scales;
    per channel is the same scale in every group), else the float weight (dequantized on load, with a warning)."""
    if scheme["scheme"] == "fp8":
        if "fp8" not in _warned:
            _warned.add("fp8")
            log.warning("fp8 weights have no packed kernel here: dequantized on load")
        return dequantize_fp8(values, scales)
    group = values.shape[1] * 2 // scales.shape[1]
    if packed and group % P.GROUP == 0:
        s = scales.float().repeat_interleave(group // P.GROUP, dim=1)
        return P.Int4Linear.from_quants(unpack_int4(values), s, -8 * s)
    if packed and "int4" not in _warned:
        _warned.add("int4")
        log.warning("int4 groups of %d have no packed kernel (multiples of 32 do): dequantized on load", group)
    return dequantize_int4(values, scales)
