"""Strict GGUF reading: the header, metadata and tensor table are parsed and validated here, bounds-checked
against the file, before any tensor is allocated (the `gguf` package's own reader accepts broken files and can
hang on mutated ones). Tensor data is then dequantized with the `gguf` package's reference code.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..config import MAX_VOCAB
from ..errors import WeightsError

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_STRING = 1 << 24  # 16 MiB: no legitimate value (a chat template, say) is longer
MAX_KEY = (1 << 16) - 1  # the GGUF spec's limit on a key
MAX_ITEM = 4096  # one string in an array (a token, merge or tag); Gemma's longest token is 48 bytes
MAX_DEPTH = 2  # arrays of arrays, at most

# Tensor types gemrun dequantizes (those real Gemma GGUFs use).
SUPPORTED = {GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
UINT32, STRING, ARRAY = 4, 8, 9
# Non-finite values: the exponent bits of float tensors, and the byte range of each quantized block's float16
# scales (d, and dmin or m where there is one): a block's values are finite exactly when these are (its other
# fields are small integers).
_EXPONENT = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}
_SCALES = {"Q4_0": (0, 2), "Q4_1": (0, 4), "Q5_0": (0, 2), "Q5_1": (0, 4), "Q8_0": (0, 2), "Q2_K": (80, 84),
           "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first): reversed GGUF dims
    qtype: GGMLQuantizationType
    offset: int  # absolute offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise WeightsError(f"GGUF truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                               f"file has {len(self.buf)}")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.scalar("<Q", what)
        if n > limit:
            raise WeightsError(f"GGUF corrupt: {what} declares a string of {n} bytes (at most {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WeightsError(f"GGUF corrupt: {what} is not valid UTF-8") from None

    def strings(self, count: int, what: str) -> list[str]:
        """An array of strings (a vocabulary, BPE merges: 262k and 500k of them), in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    break
                (n,) = length(buf, pos)
                if n > MAX_ITEM or pos + 8 + n > end:
                    break
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            raise WeightsError(f"GGUF corrupt: {what} is not valid UTF-8") from None
        self.pos = pos
        if len(out) < count:  # the same errors as one string at a time
            self.string(what, MAX_ITEM)
            raise WeightsError(f"GGUF corrupt: {what} ends early")
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype], what)
            return bool(v) if vtype == 7 else v
        if vtype == STRING:
            return self.string(what, MAX_ITEM if depth else MAX_STRING)
        if vtype == ARRAY:
            if depth >= MAX_DEPTH:
                raise WeightsError(f"GGUF corrupt: {what} nests arrays too deeply")
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize
                self.need(count * size, what)  # count is a Python int: no overflow
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * size
                return arr.astype(bool) if etype == 7 else arr
            if etype == STRING:
                self.need(count * 8, what)  # every element has at least an 8-byte length
                return self.strings(count, what)
            if etype == ARRAY:
                self.need(count * 8, what)
                return [self.value(etype, what, depth + 1) for _ in range(count)]
            raise WeightsError(f"GGUF corrupt: {what} has unknown array element type {etype}")
        raise WeightsError(f"GGUF corrupt: {what} has unknown value type {vtype}")


class GGUFFile:
    """A validated GGUF file: `metadata` (dict), `tensors` (name -> TensorInfo), `load(name)` -> float32 array."""

    def __init__(self, path: str | Path | None = None, *, data: bytes | bytearray | None = None):
        """Open a file (memory-mapped), or parse bytes already in memory (`data`, used by the fuzz tests)."""
        self._file = self._map = None
        if data is not None:
            self.path = Path("<memory>")
            self._buf = memoryview(data)
        else:
            self.path = Path(path)
            try:
                self._file = open(self.path, "rb")
                size = self.path.stat().st_size
                if size < 24:
                    self._file.close()
                    raise WeightsError(f"{self.path}: not a GGUF file (only {size} bytes)")
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise WeightsError(f"cannot read {self.path}: {e.strerror or e}") from None
            self._buf = memoryview(self._map)
        self._parse()

    def close(self) -> None:
        self._buf.release()
        if self._map is not None:
            self._map.close()
            self._file.close()

    def _parse(self) -> None:
        c = _Cursor(self._buf)
        c.need(4, "magic")
        if bytes(self._buf[:4]) != MAGIC:
            raise WeightsError(f"{self.path}: not a GGUF file (bad magic)")
        c.pos = 4
        version = c.scalar("<I", "version")
        if version not in (2, 3):
            raise WeightsError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = c.scalar("<Q", "tensor count"), c.scalar("<Q", "metadata count")
        left = len(self._buf) - c.pos
        if n_kv * 13 > left or n_tensors * 24 > left:  # smallest possible entries: no allocation on a lie
            raise WeightsError(f"GGUF corrupt: {n_kv} metadata entries / {n_tensors} tensors cannot fit the file")
        meta: dict[str, Any] = {}
        self.types: dict[str, int] = {}  # key -> GGUF value type
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", MAX_KEY)
            if not key or not key.isascii():
                raise WeightsError(f"GGUF corrupt: metadata key #{i} {key[:40]!r} is empty or not ASCII")
            if key in meta:
                raise WeightsError(f"GGUF corrupt: duplicate metadata key {key[:80]!r}")
            what = key if len(key) <= 80 else key[:80] + "..."
            self.types[key] = c.scalar("<I", what)
            meta[key] = c.value(self.types[key], what)
        self.metadata = meta
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.types.get("general.alignment", UINT32) != UINT32 or align <= 0 or align & (align - 1):
            raise WeightsError(f"GGUF corrupt: general.alignment {align!r} is not a power of two of type uint32")
        raw: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}")
            if name in names:
                raise WeightsError(f"GGUF corrupt: duplicate tensor {name!r}")
            names.add(name)
            n_dims = c.scalar("<I", name)
            if not 1 <= n_dims <= 4:
                raise WeightsError(f"GGUF corrupt: tensor {name!r} has {n_dims} dimensions")
            dims = tuple(c.scalar("<Q", name) for _ in range(n_dims))
            if any(d < 1 or d > 1 << 40 for d in dims):
                raise WeightsError(f"GGUF corrupt: tensor {name!r} has dimensions {dims}")
            t = c.scalar("<I", name)
            try:
                qtype = GGMLQuantizationType(t)
                block, _ = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise WeightsError(f"GGUF corrupt: tensor {name!r} has unknown type {t}") from None
            if dims[0] % block:
                raise WeightsError(f"GGUF corrupt: tensor {name!r} row of {dims[0]} is not whole {qtype.name} "
                                   f"blocks of {block}")
            raw.append((name, dims, qtype, c.scalar("<Q", name)))
        data_start = -(-c.pos // align) * align
        file_size = len(self._buf)
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, dims, qtype, rel in raw:
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(dims, dtype=object)) // block * type_size
            start = data_start + rel
            if rel % align:
                raise WeightsError(f"GGUF corrupt: tensor {name!r} data offset {rel} is not {align}-aligned")
            if start + nbytes > file_size:
                raise WeightsError(f"GGUF truncated: tensor {name!r} ends at byte {start + nbytes}, "
                                   f"file has {file_size}")
            spans.append((start, start + nbytes, name))
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise WeightsError(f"GGUF corrupt: tensors {a!r} and {b!r} overlap")
        # llama.cpp reads tensor data in one layout only (gguf.cpp: each tensor where the one before it in the table
        # ends, padded to the alignment): a file laid out otherwise (gaps: a tensor's type or shape changed to fewer
        # bytes than written) is refused there and here
        expected = 0
        for name, _, _, rel in raw:
            if rel != expected:
                raise WeightsError(f"GGUF corrupt: tensor {name!r} data is at offset {rel}, not at {expected} where "
                                   f"the tensor before it ends (padded to {align} bytes)")
            expected += -(-self.tensors[name].nbytes // align) * align

    def release(self, name: str, start: int = 0, end: int | None = None) -> None:
        """Let the kernel drop the pages of a tensor already converted (they count as resident memory while
        mapped), or of its bytes start..end; a later read simply faults them in again."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        first = info.offset + start
        first -= first % mmap.PAGESIZE
        last = info.offset + (info.nbytes if end is None else min(end, info.nbytes))
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, (rows, bytes per row), without copying."""
        info = self.tensors[name]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(rows, -1)

    def check_finite(self, name: str) -> None:
        """WeightsError unless every value of the tensor is finite, read from its bytes (float values, or the
        float16 scales of quantized blocks) a few MiB at a time: a NaN or an infinity in the weights makes every
        logit NaN."""
        info = self.tensors[name]
        data = self.raw(name)
        kind = info.qtype.name
        step = max(1, (16 << 20) // max(1, data.shape[1]))
        for r in range(0, data.shape[0], step):
            chunk = data[r:r + step]
            if kind in _EXPONENT:
                dtype, mask = _EXPONENT[kind]
                bits = chunk.reshape(-1).view(dtype)
            elif kind in _SCALES:
                a, b = _SCALES[kind]
                blocks = chunk.reshape(-1, GGML_QUANT_SIZES[info.qtype][1])
                bits, mask = np.ascontiguousarray(blocks[:, a:b]).view(np.uint16), 0x7C00
            else:
                return
            if ((bits & mask) == mask).any():
                raise WeightsError(f"tensor {name!r} holds non-finite values (NaN or infinity)")

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in torch order (slowest dimension first); non-finite values are
        refused."""
        info = self.tensors[name]
        self._check_loadable(name)
        return self._dequantize(self.raw(name), info.qtype).reshape(info.shape)

    def load_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantized into a tensor of `dtype`, a slice of rows at a time: a bfloat16 copy of a large
        quantized matrix never has its whole float32 form beside it."""
        import torch  # here: reading metadata (`gemrun info`) needs no torch

        info = self.tensors[name]
        if dtype == torch.float32 or len(info.shape) != 2:
            return torch.from_numpy(self.load(name)).to(dtype)
        self._check_loadable(name)
        data, out = self.raw(name), torch.empty(info.shape, dtype=dtype)
        step = max(1, (32 << 20) // (4 * info.shape[1]))
        for r in range(0, info.shape[0], step):
            rows = self._dequantize(data[r:r + step], info.qtype).reshape(-1, info.shape[1])
            out[r:r + step] = torch.from_numpy(rows)
        return out

    def _check_loadable(self, name: str) -> None:
        info = self.tensors[name]
        if info.qtype not in SUPPORTED:
            raise WeightsError(f"tensor {name!r} has type {info.qtype.name}, which gemrun does not support "
                               f"(supported: {', '.join(sorted(t.name for t in SUPPORTED))})")
        self.check_finite(name)

    @staticmethod
    def _dequantize(data: np.ndarray, qtype) -> np.ndarray:
        if qtype == GGMLQuantizationType.F32:
            out = data.view(np.float32).copy()
        elif qtype == GGMLQuantizationType.F16:
            out = data.view(np.float16).astype(np.float32)
        else:
            out = dequantize(data, qtype)
        return out.astype(np.float32, copy=False)


def check_tokenizer_metadata(meta: dict[str, Any], required: bool = True) -> None:
    """Tokenizer metadata typed and consistent: tokens strings (at most MAX_VOCAB), scores f32 and types i32 of
    the tokens' length, special ids inside the vocabulary, flags booleans, the template a string. Not `required`
    (files whose tokenizer goes unused, a drafter's): checked only where the file has tokens."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None and not required:
        return
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise WeightsError("GGUF tokenizer.ggml.tokens is missing or not an array of strings")
    n = len(tokens)
    if n > MAX_VOCAB:
        raise WeightsError(f"GGUF tokenizer.ggml.tokens has {n} tokens; at most {MAX_VOCAB} are supported")
    for key, kind in (("model", str), ("add_bos_token", bool), ("add_eos_token", bool)):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not isinstance(value, kind):
            raise WeightsError(f"GGUF tokenizer.ggml.{key} must be a {kind.__name__}, got {type(value).__name__}")
    if not isinstance(meta.get("tokenizer.chat_template", ""), str):
        raise WeightsError("GGUF tokenizer.chat_template must be a string")
    for key, dtype in (("tokenizer.ggml.scores", np.float32), ("tokenizer.ggml.token_type", np.int32)):
        arr = meta.get(key)
        if key == "tokenizer.ggml.scores" and arr is None:
            continue
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (n,):
            raise WeightsError(f"GGUF {key} must be {np.dtype(dtype).name}[{n}]")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n):
            raise WeightsError(f"GGUF tokenizer.ggml.{key} = {value!r} is outside the vocabulary of {n}")
