"""Mutation fuzz of the GGUF loaders, run in a child process with a memory cap and a per-mutant alarm (the harness
and its outcomes: tests/fuzz.py).

    python tests/gguf_fuzz.py FILE COUNT SEED [all|header]  ->  one JSON line of counts
    python tests/gguf_fuzz.py FILE COUNT SEED gemma3-text|gemma4-text
    python tests/gguf_fuzz.py FILE COUNT SEED gemma3-mmproj|gemma4-mmproj|gemma4-draft TEXT_GGUF
    options: --start I (begin at mutant I of the same sequence), --progress (a JSON line per mutant: fuzz.supervise)

Half the mutants are random (header bytes, extreme 32/64-bit values anywhere in the header, truncation, bytes
inserted or deleted, the two counts), half aimed at one field of the file's layout (`layout`): a key's length or
value type, a scalar value (extremes, NaN, infinities), a string's length, an array's element type, count or one
element (a token, a score, a token type), a tensor's name length, dimension count, dimensions, type or data offset
(near another tensor's), duplicated keys and tensor names.

`all`/`header` parse each mutant with `GGUFFile` and read its tensors (all, or the three smallest), any
WeightsError/ConfigError being a clean refusal. The other modes run each mutant through gemrun's whole loader
(`gemrun.load`: a Gemma 3 or Gemma 4 text model with its tokenizer, a Gemma 3 or Gemma 4 mmproj for the model
TEXT_GGUF, a drafter for it), where any GemrunError is a clean refusal. A mutant that loads is checked by
`violations`, an independent reader of the checklist's invariants (tensor data aligned, inside the file, not
overlapping and laid out as llama.cpp reads it, known types, 1-4 dimensions of at least 1, unique keys and names,
tokenizer arrays typed and as long as the vocabulary, special ids inside it), then by a 3-token forward (finite
logits; with an image for an mmproj; a drafter drafts 4 tokens) and a check that every token id the tokenizer can
produce has an embedding row: a broken file that loads is a silent accept.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field

from fuzz import EXTREMES, fuzz, limit_memory, main_args, model_problems
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemrun.errors import ConfigError, WeightsError
from gemrun.weights.gguf import GGUFFile

_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY, UINT32, INT32, FLOAT32 = 8, 9, 4, 5, 6
FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 1e-3, 1e30, 3.4e38, 65504.0]
QTYPES = [t.value for t in GGMLQuantizationType]


class Unreadable(Exception):
    pass


@dataclass
class Layout:
    """Where the fields of a GGUF are (field lists: (position, width, role)) and what they hold."""

    fields: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    elements: list[tuple] = field(default_factory=list)  # ("num", start, count, etype) | ("str", [positions])
    keys: dict[str, tuple[int, object]] = field(default_factory=dict)  # key -> (type, value or array summary)
    key_spans: list[tuple[int, int]] = field(default_factory=list)  # (position of the bytes, length)
    names: list[tuple[int, int]] = field(default_factory=list)
    tensors: list[tuple[str, tuple[int, ...], int, int]] = field(default_factory=list)  # name, dims, type, offset
    problems: list[str] = field(default_factory=list)
    data_start: int = 0


def layout(data: bytes) -> Layout:
    """An independent reading of a GGUF (nothing of gemrun's parser): its fields, and the checklist's problems
    with it in `problems` (the first that makes it unreadable ends the reading)."""
    lay = Layout(fields={k: [] for k in ("count", "kv", "value", "tensor")})
    n = len(data)

    def u(fmt: str, at: int):
        if at < 0 or at + struct.calcsize(fmt) > n:
            raise Unreadable(f"field at {at} past the end")
        return struct.unpack_from(fmt, data, at)[0]

    def string(at: int, role_list: list) -> tuple[bytes, int]:
        length = u("<Q", at)
        role_list.append((at, 8, "strlen"))
        if at + 8 + length > n:
            raise Unreadable(f"string of {length} bytes at {at} past the end")
        return data[at + 8:at + 8 + length], at + 8 + length

    def value(t: int, at: int, depth: int) -> tuple[object, int]:
        if t in _SIZE:
            lay.fields["value"].append((at, _SIZE[t], f"scalar:{t}"))
            return u(_FMT[t], at), at + _SIZE[t]
        if t == STRING:
            raw, at = string(at, lay.fields["value"])
            return raw, at
        if t == ARRAY and depth == 0:
            lay.fields["value"] += [(at, 4, "etype"), (at + 4, 8, "acount")]
            et, count = u("<I", at), u("<Q", at + 4)
            at += 12
            if et in _SIZE:
                if at + count * _SIZE[et] > n:
                    raise Unreadable(f"array of {count} past the end")
                lay.elements.append(("num", at, count, et))
                return ("array", et, count, at), at + count * _SIZE[et]
            if et == STRING:
                if at + count * 8 > n:
                    raise Unreadable(f"array of {count} strings past the end")
                spots = []
                for _ in range(count):
                    spots.append(at)
                    _, at = string(at, [])
                lay.elements.append(("str", spots))
                return ("array", et, count, spots), at
            raise Unreadable(f"array element type {et}")
        raise Unreadable(f"value type {t}")

    if n < 24 or data[:4] != b"GGUF":
        raise Unreadable("no GGUF magic")
    if u("<I", 4) not in (2, 3):
        lay.problems.append("version not 2 or 3")
    n_tensors, n_kv = u("<Q", 8), u("<Q", 16)
    if n_kv * 13 > n or n_tensors * 24 > n:
        raise Unreadable(f"{n_kv} keys / {n_tensors} tensors cannot fit")
    lay.fields["count"] += [(8, 8, "count"), (16, 8, "count")]
    at = 24
    for _ in range(n_kv):
        key_at = at
        raw, at = string(at, lay.fields["kv"])
        lay.key_spans.append((key_at + 8, len(raw)))
        lay.fields["kv"].append((at, 4, "vtype"))
        t = u("<I", at)
        v, at = value(t, at + 4, 0)
        key = raw.decode("utf-8", "replace")
        if key in lay.keys:
            lay.problems.append(f"duplicate key {key[:60]!r}")
        lay.keys[key] = (t, v)
    seen = set()
    for _ in range(n_tensors):
        name_at = at
        raw, at = string(at, lay.fields["tensor"])
        lay.names.append((name_at + 8, len(raw)))
        name = raw.decode("utf-8", "replace")
        if name in seen:
            lay.problems.append(f"duplicate tensor {name[:60]!r}")
        seen.add(name)
        nd = u("<I", at)
        lay.fields["tensor"].append((at, 4, "ndims"))
        if not 1 <= nd <= 4:
            raise Unreadable(f"tensor {name!r} has {nd} dimensions")
        dims = tuple(u("<Q", at + 4 + 8 * k) for k in range(nd))
        lay.fields["tensor"] += [(at + 4 + 8 * k, 8, "dim") for k in range(nd)]
        at += 4 + 8 * nd
        lay.fields["tensor"] += [(at, 4, "ttype"), (at + 4, 8, "offset")]
        lay.tensors.append((name, dims, u("<I", at), u("<Q", at + 4)))
        at += 12
    align_type, align = lay.keys.get("general.alignment", (UINT32, 32))
    if align_type != UINT32 or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise Unreadable("alignment not a power of two of type uint32")
    lay.data_start = -(-at // align) * align
    spans = []
    for name, dims, t, offset in lay.tensors:
        if t not in QTYPES or GGMLQuantizationType(t) not in GGML_QUANT_SIZES or min(dims) < 1:
            lay.problems.append(f"tensor {name!r}: type {t} or dimensions {dims}")
            continue
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        count = 1
        for d in dims:
            count *= d
        if dims[0] % block:
            lay.problems.append(f"tensor {name!r}: rows of {dims[0]} not whole blocks of {block}")
            continue
        start = lay.data_start + offset
        spans.append((start, start + count // block * size, name))
        if offset % align:
            lay.problems.append(f"tensor {name!r}: offset {offset} not {align}-aligned")
    spans.sort()
    if spans and spans[-1][1] > n or any(e > n for _, e, _ in spans):
        lay.problems.append("tensor data past the end of the file")
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            lay.problems.append(f"tensors {a!r} and {b!r} overlap")
    _tokenizer_problems(lay)
    return lay


def _tokenizer_problems(lay: Layout) -> None:
    tokens = lay.keys.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    t, v = tokens
    if t != ARRAY or v[1] != STRING or v[2] == 0:
        lay.problems.append("tokenizer.ggml.tokens is not a non-empty array of strings")
        return
    n = v[2]
    for key, etype in (("tokenizer.ggml.scores", FLOAT32), ("tokenizer.ggml.token_type", INT32)):
        entry = lay.keys.get(key)
        if entry is not None and (entry[0] != ARRAY or entry[1][1] != etype or entry[1][2] != n):
            lay.problems.append(f"{key} is not {etype}-typed with {n} elements")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        entry = lay.keys.get(f"tokenizer.ggml.{key}")
        if entry is not None and (entry[0] not in (0, 1, 2, 3, 4, 5, 10, 11) or not 0 <= entry[1] < n):
            lay.problems.append(f"tokenizer.ggml.{key} = {entry[1]!r} (type {entry[0]}) outside the vocabulary")


def violations(data: bytes) -> str | None:
    """The first of the checklist's invariants a file breaks (None: none)."""
    try:
        problems = layout(data).problems
    except Unreadable as e:
        return f"unreadable: {e}"
    return problems[0] if problems else None


def mutate(data: bytes, header_end: int, rng) -> bytearray:
    """A random mutation of the header: bytes, extreme values, truncation, insertion or deletion, the counts."""
    m = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flip random bytes in the header region
        for _ in range(rng.randint(1, 8)):
            m[rng.randrange(header_end)] = rng.randrange(256)
    elif kind in (1, 2):  # overwrite a 64- or 32-bit field with an extreme value
        width = 8 if kind == 1 else 4
        at = rng.randrange(max(1, header_end - width))
        struct.pack_into("<Q" if width == 8 else "<I", m, at, rng.choice(EXTREMES) % (1 << (8 * width)))
    elif kind == 3:  # truncate
        m = m[:rng.randrange(len(m))]
    elif kind == 4:  # delete or insert bytes inside the header
        at = rng.randrange(header_end)
        if rng.random() < 0.5:
            del m[at:at + rng.randint(1, 16)]
        else:
            m[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # the count fields themselves
        struct.pack_into("<Q", m, rng.choice([8, 16]), rng.choice(EXTREMES))
    return m


def _new_value(role: str, raw: bytes, rng, lay: Layout) -> bytes:
    width = len(raw)
    old = int.from_bytes(raw, "little")
    kind = role.rsplit(":", 1)[-1]
    if kind in ("6", "12"):
        return struct.pack("<f" if kind == "6" else "<d", rng.choice(FLOATS))
    if role == "offset" and rng.random() < 0.6:
        align = lay.keys.get("general.alignment", (UINT32, 32))[1]
        v = rng.choice(lay.tensors)[3] + rng.choice([0, 0, 1, -1, align, -align, 2 * align])
    elif role == "ttype" and rng.random() < 0.7:
        v = rng.choice(QTYPES)
    elif role in ("vtype", "etype") and rng.random() < 0.7:
        v = rng.randrange(14)
    elif role == "ndims" and rng.random() < 0.7:
        v = rng.randrange(6)
    else:
        r = rng.random()
        if r < 0.35:
            v = old + rng.choice([-1, 1, -2, 2])
        elif r < 0.55:
            v = rng.choice([old * 2, old // 2, 0, -1, -old])
        else:
            v = rng.choice(EXTREMES)
    return (v % (1 << (8 * width))).to_bytes(width, "little")


def mutate_field(data: bytes, lay: Layout, rng) -> bytearray:
    """One field of the layout changed (see the module's docstring)."""
    m = bytearray(data)
    r = rng.random()
    if r < 0.05:
        group = "count"
    elif r < 0.25:
        group = "kv"
    elif r < 0.45:
        group = "value"
    elif r < 0.6 and lay.elements:
        group = "element"
    elif r < 0.95:
        group = "tensor"
    else:
        group = "duplicate"
    if group == "element":
        arr = rng.choice(lay.elements)
        if arr[0] == "num":
            _, start, count, et = arr
            if count:
                at = start + rng.randrange(count) * _SIZE[et]
                m[at:at + _SIZE[et]] = _new_value(f"elem:{et}", data[at:at + _SIZE[et]], rng, lay)
        elif arr[1]:
            at = rng.choice(arr[1])
            length = struct.unpack_from("<Q", data, at)[0]
            if rng.random() < 0.4 or not length:
                m[at:at + 8] = _new_value("strlen", data[at:at + 8], rng, lay)
            elif rng.random() < 0.5:  # another token of the same length: a duplicate token
                same = [p for p in rng.sample(arr[1], min(200, len(arr[1])))
                        if struct.unpack_from("<Q", data, p)[0] == length]
                if same:
                    src = rng.choice(same)
                    m[at + 8:at + 8 + length] = data[src + 8:src + 8 + length]
            else:  # random bytes (maybe not UTF-8)
                for _ in range(rng.randint(1, 3)):
                    m[at + 8 + rng.randrange(length)] = rng.randrange(256)
        return m
    if group == "duplicate":
        spans = lay.names if rng.random() < 0.6 else lay.key_spans
        a = rng.choice(spans)
        same = [s for s in spans if s[1] == a[1] and s != a]
        if same:
            b = rng.choice(same)
            m[a[0]:a[0] + a[1]] = data[b[0]:b[0] + b[1]]
        return m
    fields = lay.fields[group]
    at, width, role = rng.choice(fields)
    if role == "offset" and rng.random() < 0.15:  # swap two tensors' data
        other = rng.choice([f for f in fields if f[2] == "offset"])[0]
        m[at:at + 8], m[other:other + 8] = data[other:other + 8], data[at:at + 8]
    else:
        m[at:at + width] = _new_value(role, data[at:at + width], rng, lay)
    return m


def mutations(data: bytes):
    """make(rng): half random mutations of the header, half aimed at one field."""
    lay = layout(data)
    header_end = lay.data_start

    def make(rng) -> bytearray:
        return mutate(data, header_end, rng) if rng.random() < 0.5 else mutate_field(data, lay, rng)

    return make


# --- whole-loader checks -----------------------------------------------------------------------------------------

def _memoized_dequantization(original: str) -> None:
    """Dequantizing the 270M's tensors takes seconds; a mutant's tensor whose type, shape and bytes are those of
    the original file's tensor of that name gets the original's result (the reference dequantizer on the same
    bytes), copied. Every other tensor is dequantized as usual."""
    import numpy as np

    base = GGUFFile(original)
    real_load, done = GGUFFile.load, {}

    def load(self, name):
        info, ref = self.tensors[name], base.tensors.get(name)
        if self is base or ref is None or (ref.qtype, ref.shape) != (info.qtype, info.shape) or \
                not np.array_equal(self.raw(name), base.raw(name)):
            return real_load(self, name)
        if name not in done:
            done[name] = real_load(base, name)
        return done[name].copy()

    GGUFFile.load = load


def whole_loader(mode: str, original: str, text: str | None):
    """A function loading one mutant file through `gemrun.load` as that kind of GGUF (a text model; an mmproj or
    a drafter for the model TEXT_GGUF), then checking the model (`violations`, `model_problems`; with a drafter,
    4 greedy tokens drafted)."""
    import numpy as np
    from PIL import Image

    import gemrun
    from gemrun.errors import GemrunError

    if original and os.path.getsize(original) > 64 << 20:
        _memoized_dequantization(original)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    media = mode.endswith("-mmproj")

    def load(path: str) -> str | None:
        if mode.endswith("-text"):
            m = gemrun.load(path, device="cpu", dtype="float32")
        else:
            m = gemrun.load(text, device="cpu", dtype="float32", **{"mmproj" if media else "draft": path})
        problem = violations(open(path, "rb").read()) or model_problems(m, image if media else None)
        if problem or not mode.endswith("-draft"):
            return problem
        try:
            prompt = m.chat_prompt([{"role": "user", "content": "Hi"}])
            list(m.events(prompt, gemrun.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
        except GemrunError as e:
            return f"drafting failed after a clean load: {e}"
        return None

    return load


def run_loader(data: bytes, count: int, seed: int, load, start: int, progress: bool, seconds: float) -> dict:
    """Each mutant written to a file and given to `load`; GemrunError is a clean refusal. The tokenizers that
    mutated vocabularies derive are cached in a temporary directory, emptied of them after each mutant."""
    import tempfile
    from pathlib import Path

    from gemrun.errors import GemrunError

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GEMRUN_CACHE"] = tmp  # mutated vocabularies are not cached with the real ones
        file = os.path.join(tmp, "m.gguf")
        cached = Path(tmp, "tokenizers")
        with open(file, "wb") as f:
            f.write(data)
        baseline = load(file)  # the unmutated file loads and passes the checks (and caches its tokenizer)
        if baseline:
            raise SystemExit(f"the unmutated file fails the checks: {baseline}")
        keep = set(cached.iterdir()) if cached.is_dir() else set()

        def check(m: bytearray) -> str | None:
            with open(file, "wb") as f:
                f.write(m)
            try:
                return load(file)
            finally:
                for p in (set(cached.iterdir()) - keep if cached.is_dir() else ()):
                    p.unlink(missing_ok=True)

        return fuzz(count, seed, mutations(data), check, GemrunError, seconds, start, progress)


def run(path: str, count: int, seed: int, mode: str = "", text: str | None = None, start: int = 0,
        progress: bool = False) -> dict:
    limit_memory(6 << 30)
    data = open(path, "rb").read()
    big = len(data) > 64 << 20  # the real 270M: a whole load (and a new vocabulary's merges) takes seconds
    if mode.startswith(("gemma3", "gemma4")):
        return run_loader(data, count, seed, whole_loader(mode, path, text), start, progress, 120 if big else 20)
    g = GGUFFile(data=bytearray(data))
    small = sorted(g.tensors, key=lambda n: g.tensors[n].nbytes)[:3]

    def check(m: bytearray) -> str | None:
        f = GGUFFile(data=m)
        if "tokenizer.ggml.tokens" in f.metadata:
            from gemrun.weights.gguf import check_tokenizer_metadata

            check_tokenizer_metadata(f.metadata)
        for name in (f.tensors if mode == "all" else [n for n in small if n in f.tensors]):
            f.load(name)
        return violations(bytes(m))

    return fuzz(count, seed, mutations(data), check, (WeightsError, ConfigError), 10, start, progress)


if __name__ == "__main__":
    import json

    args, start, progress = main_args(sys.argv[1:])
    path, count, seed = args[0], int(args[1]), int(args[2])
    mode = args[3] if len(args) > 3 else ""
    print(json.dumps(run(path, count, seed, mode, args[4] if len(args) > 4 else None, start, progress)), flush=True)
