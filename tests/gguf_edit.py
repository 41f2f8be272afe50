"""Copies of GGUF files with metadata or tensors changed, for tests of broken files (written with the `gguf`
package's writer from what gemrun's reader parsed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from gemrun.weights.gguf import GGUFFile

_ELEMENT = {np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
            np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
            np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
            np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(bool): GGUFValueType.BOOL,
            np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
            np.dtype(np.float64): GGUFValueType.FLOAT64}


def rewrite(src: Path, dst: Path, meta: dict | None = None, add: dict | None = None, drop: set | None = None,
            replace: dict | None = None, rename: dict | None = None, arch: str | None = None) -> Path:
    """`src` copied to `dst` with metadata keys set (`meta`: key -> value, typed like the original or inferred),
    F32 tensors added, replaced or dropped, tensors renamed, and with `arch` the architecture changed (its keys
    renamed with it)."""
    g = GGUFFile(src)
    meta, add, drop, replace, rename = meta or {}, add or {}, drop or set(), replace or {}, rename or {}
    old = g.metadata["general.architecture"]
    arch = arch or meta.get("general.architecture", old)
    w = GGUFWriter(str(dst), arch)
    for key, value in {**g.metadata, **meta}.items():
        if key in ("general.architecture", "general.alignment") or value is None:
            continue
        if key.startswith(old + ".") and arch != old:
            if key in g.types:
                g.types[arch + key[len(old):]] = g.types[key]
            key = arch + key[len(old):]
        vtype = GGUFValueType(g.types[key]) if key in g.types else GGUFValueType.get_type(value)
        sub = None
        if isinstance(value, np.ndarray):
            sub, value = _ELEMENT[value.dtype], value.tolist()
        elif isinstance(value, list):
            vtype = GGUFValueType.ARRAY
            sub = GGUFValueType.get_type(value[0]) if value else GGUFValueType.INT32
            if key in g.metadata and isinstance(g.metadata[key], np.ndarray):
                sub = _ELEMENT[g.metadata[key].dtype]
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, info in g.tensors.items():
        if name in drop:
            continue
        if name in replace:
            w.add_tensor(rename.get(name, name), replace[name])
        else:
            w.add_tensor(rename.get(name, name), np.array(g.raw(name)).reshape(_byte_shape(info)),
                         raw_dtype=info.qtype)
    for name, t in add.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _byte_shape(info) -> tuple[int, ...]:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.qtype)]
    return (*info.shape[:-1], info.shape[-1] // block * size)
