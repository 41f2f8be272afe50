"""Per-layer KV caches with one small protocol: `update(k, v, positions) -> parts`, `length`, `trim(n)`,
`checkpoint()`, `floor`, `nbytes`, and `attend(q, k, v, positions, fn)`, what an attention layer calls: it stores
k, v and runs `fn` over everything the cache then holds. `RowCaches` gives the same `attend` to B sequences
decoded together. `prefix.PrefixPool` keeps the caches of finished sequences for prompts that share a prefix.

Keys are cached after RoPE, so a cache only needs each slot's absolute position to build masks; the order of
slots does not matter. That lets the sliding-window cache be a ring buffer whose memory never grows.

K and V are stored in the cache's precision (`KV_TYPES`: the activations' dtype, float32, bfloat16, or q8_0
blocks as llama.cpp's `-ctk/-ctv q8_0`). A cache in the activations' dtype hands attention its tensors as they are;
any other is converted on the fly as attention reads it: whole (and joined with a chunk's new tokens) while that
takes at most `READ_BYTES`, so that one fused attention call reads it; beyond, in pieces of that size (at least
`CHUNK` positions), whose attention results are merged by their log-sum-exp, so a long cache is never expanded at
once.
"""

from __future__ import annotations

import copy
import math
import threading

import torch

from .config import LayerSpec

CHUNK = 1024  # the fewest positions converted at a time when the cache's precision is not the activations'
READ_BYTES = 256 << 20  # the most bytes of converted K and V at a time (the 12B's 16K positions, the 270M's 128K)
APPEND_MIN = 64  # the fewest slots a sliding cache's checkpoint appends at a time (each growth copies the ring)
REWIND = 16  # spare slots of the sliding rings of a sequence kept for prefix reuse, so that its prompt's last
# tokens can be taken back: a next turn renders the generation prompt differently (Gemma 4 with thinking off: the
# empty thought channel the prompt ends on is not in the history), and reuse must rewind to before it
KV_TYPES = ("auto", "f32", "bf16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block (one fp16 scale each), along the head dimension
VALUE_BYTES = {"f32": 4, "bf16": 2, "q8_0": 1 + 2 / Q8_BLOCK}  # bytes a cached value takes, by KV type


class Plain:
    """K or V storage (B, KV, S, D) as a tensor of one float dtype."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        self.t = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def size(self) -> int:
        return self.t.shape[2]

    @property
    def shape(self) -> torch.Size:
        return self.t.shape

    @property
    def nbytes(self) -> int:
        return self.t.nbytes

    def write(self, index, x: torch.Tensor) -> None:
        self.t[:, :, index] = x.to(self.t.dtype)

    def read(self, index, dtype: torch.dtype) -> torch.Tensor:
        return self.t[:, :, index].to(dtype)

    def read_into(self, out: torch.Tensor, index: slice) -> None:
        """`read` into out (B, KV, n, D), converted on the way."""
        out.copy_(self.t[:, :, index])

    def move(self, dst: torch.Tensor, src: slice) -> None:
        """Copy the stored positions `src` to `dst` as they are (no conversion)."""
        self.t[:, :, dst] = self.t[:, :, src].clone()

    def head(self, n: int) -> Plain:
        """A copy of the first n positions."""
        out = copy.copy(self)
        out.t = self.t[:, :, :n].clone()
        return out

    def resize(self, n: int, fill: bool = True) -> None:
        """Grow (with zeros; `fill` False: unwritten, for a cache that never reads past its length) or cut to n
        positions."""
        self.t = _resized(self.t, n, fill)


class Q8(Plain):
    """q8_0 storage: int8 values and one fp16 scale per block of 32 along D (x = q * scale, scale = max|x| / 127),
    about 1.06 bytes a value."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        b, kv, n, d = shape
        if d % Q8_BLOCK:
            raise ValueError(f"q8_0 KV needs a head size that is a multiple of {Q8_BLOCK}, got {d}")
        self.t = torch.zeros(shape, dtype=torch.int8, device=device)
        self.scale = torch.zeros(b, kv, n, d // Q8_BLOCK, dtype=torch.float16, device=device)

    @property
    def nbytes(self) -> int:
        return self.t.nbytes + self.scale.nbytes

    def write(self, index, x: torch.Tensor) -> None:
        blocks = x.float().unflatten(-1, (-1, Q8_BLOCK))  # (B, KV, T, D/32, 32)
        scale = (blocks.abs().amax(-1) / 127).to(torch.float16)
        safe = torch.where(scale > 0, scale.float(), 1.0)[..., None]
        self.t[:, :, index] = torch.round(blocks / safe).clamp(-127, 127).to(torch.int8).flatten(-2)
        self.scale[:, :, index] = scale

    def read(self, index, dtype: torch.dtype) -> torch.Tensor:
        q = self.t[:, :, index].float().unflatten(-1, (-1, Q8_BLOCK))
        return (q * self.scale[:, :, index].float()[..., None]).flatten(-2).to(dtype)

    def read_into(self, out: torch.Tensor, index: slice) -> None:
        out.copy_(self.read(index, out.dtype))

    def move(self, dst: torch.Tensor, src: slice) -> None:
        super().move(dst, src)
        self.scale[:, :, dst] = self.scale[:, :, src].clone()

    def head(self, n: int) -> Q8:
        out = super().head(n)
        out.scale = self.scale[:, :, :n].clone()
        return out

    def resize(self, n: int, fill: bool = True) -> None:
        super().resize(n, fill)
        self.scale = _resized(self.scale, n, fill)


def _resized(t: torch.Tensor, n: int, fill: bool) -> torch.Tensor:
    """t (B, KV, S, ...) cut or grown to n positions along S (the new ones zero where `fill`)."""
    if n <= t.shape[2]:
        return t[:, :, :n].clone()
    out = t.new_empty((*t.shape[:2], n, *t.shape[3:]))
    out[:, :, :t.shape[2]] = t
    if fill:
        out[:, :, t.shape[2]:] = 0
    return out


SCRATCH_BYTES = 64 << 20  # this thread's buffers for converted cache reads are kept up to this size between prompts
_scratch = threading.local()


def _buffer(which: int, shape: tuple[int, ...], dtype: torch.dtype, device, own: bool = False) -> torch.Tensor:
    """An (uninitialised) tensor for converted K (which 0) or V (1): this thread's reused buffer (a new tensor's
    pages fault in first: ~0.2 s for the 134 MB of a 12B global layer's keys at 16K), unless `own`. Buffers over
    SCRATCH_BYTES live until `trim_buffers`."""
    numel = math.prod(shape)
    if own or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    key = (which, dtype)
    buf = _scratch.__dict__.get(key)
    if buf is None or buf.numel() < numel:
        _scratch.__dict__.pop(key, None)  # freed before the larger one is made
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = _scratch.__dict__[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def trim_buffers() -> None:
    """Free this thread's converted-read buffers over SCRATCH_BYTES (called when a prompt has been read)."""
    for key, buf in list(_scratch.__dict__.items()):
        if buf.numel() * buf.element_size() > SCRATCH_BYTES:
            del _scratch.__dict__[key]


def storage(kv_type: str, activations: torch.dtype):
    """(storage class, its float dtype) of a KV type; "auto" stores the activations' dtype."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"KV cache type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    if kv_type == "q8_0":
        return Q8, torch.float32
    return Plain, {"auto": activations, "f32": torch.float32, "bf16": torch.bfloat16}[kv_type]


class Parts:
    """What attention reads of a cache: (k, v, kv_positions) pieces, each k, v (B, KV, S_i, D) in the activations'
    dtype. One piece when the storage is that dtype (views, no copy); else chunks converted as they are read, and
    `stored`: the whole (k, v, kv_positions) as stored (another float dtype), for a kernel that reads it as is."""

    def __init__(self, pieces: list, read=None, stored: tuple | None = None):
        self.pieces, self.read = pieces, read  # pieces: tuples, or (start, end, positions[, new]) ranges
        # that `read` converts (joined to the new tokens' (k, v, positions) when given)
        self.stored = stored

    def __len__(self) -> int:
        return len(self.pieces)

    def __iter__(self):
        for piece in self.pieces:
            yield piece if self.read is None or torch.is_tensor(piece[0]) else self.read(*piece)

    def single(self) -> tuple:
        return next(iter(self))


def merge(results: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over several key sets -> attention over their union: each (out (B, H, T, D), lse (B, H, T, 1)),
    weighted by exp(lse_i - logsumexp)."""
    lse = torch.logsumexp(torch.cat([r[1] for r in results], dim=-1), dim=-1, keepdim=True)
    weights = [torch.exp(r[1] - lse).nan_to_num(0.0) for r in results]
    return sum(w * r[0].float() for w, r in zip(weights, results)).to(results[0][0].dtype)


class Cache:
    """The `attend` every cache shares: store the new k, v (B, KV, T, D) at positions (T,) (k = v = None: a layer
    reading another layer's K/V), then fn(q, k, v, positions, kv_positions) over the cached keys (B, KV, S, D) —
    per chunk with `lse=True` (fn then gives (out, log-sum-exp)) when they come in several. A cache stored in another
    float dtype (bf16 under float32 activations) first offers fn its tensors as stored (`stored=True`: fn gives None
    where it cannot read them as they are)."""

    def update(self, k, v, positions: torch.Tensor) -> Parts:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k, v, positions: torch.Tensor, fn) -> torch.Tensor:
        parts = self.update(k, v, positions)
        if parts.stored is not None:
            keys, values, kv_positions = parts.stored
            if (out := fn(q, keys, values, positions, kv_positions, stored=True)) is not None:
                return out
        if len(parts) == 1:
            keys, values, kv_positions = parts.single()
            return fn(q, keys, values, positions, kv_positions)
        return merge([fn(q, kc, vc, positions, pc, lse=True) for kc, vc, pc in parts])


class _Cache(Cache):
    """What a source of shared K/V remembers: the latest update's result, kept only while a `SharedCache` reads
    it (a chunk's concatenated keys would otherwise stay alive in every sliding layer)."""

    last = None
    shared = False
    floor = 0  # the shortest length the cache can be rewound to

    def checkpoint(self) -> None:
        """Keep what rewinding to the current length needs (only sliding layers must do anything)."""

    def release(self) -> None:
        """Give up the checkpoint."""

    def rewind_point(self, n: int) -> int:
        """The longest length <= n the cache can be rewound to (0: none)."""
        return n if n >= min(self.floor, self.length) else 0

    def _shared(self, out: Parts) -> Parts:
        if self.shared:
            self.last = out
        return out

    def _parts(self, used: int, positions: torch.Tensor, extra: tuple | None = None) -> Parts:
        """Slots [0, used) with their positions, plus `extra` (k, v, positions) of new tokens not stored yet."""
        positions = positions[:used]
        if self.native:
            k, v = self.k.t[:, :, :used], self.v.t[:, :, :used]
            if extra is not None:
                k, v, positions = (torch.cat([k, extra[0]], dim=2), torch.cat([v, extra[1]], dim=2),
                                   torch.cat([positions, extra[2]]))
            return Parts([(k, v, positions)])
        row = 2 * self.k.shape[1] * self.k.shape[3] * self.dtype.itemsize
        step = max(CHUNK, READ_BYTES // row)
        pieces = [(a, min(a + step, used), positions[a:min(a + step, used)]) for a in range(0, used, step)]
        stored = (self.k.t[:, :, :used], self.v.t[:, :, :used], positions) if extra is None and self.plain else None
        if extra is not None:
            if len(pieces) == 1 and used + extra[0].shape[2] <= step:  # one read: the new tokens joined to it
                pieces = [(*pieces[0], extra)]
            else:
                pieces.append(extra)
        return Parts(pieces, self._read, stored)

    def _read(self, a: int, b: int, positions: torch.Tensor, extra: tuple | None = None, own: bool = False) -> tuple:
        """Slots [a, b) converted to the activations' dtype, then `extra` (the chunk's new k, v, positions), into
        reused buffers (attention reads them at once, before the next read), or into their own (`own`)."""
        b_, kv, _, d = self.k.shape
        shape = (b_, kv, b - a + (0 if extra is None else extra[0].shape[2]), d)
        k = _buffer(0, shape, self.dtype, self.k.t.device, own)
        v = _buffer(1, shape, self.dtype, self.k.t.device, own)
        self.k.read_into(k[:, :, :b - a], slice(a, b))
        self.v.read_into(v[:, :, :b - a], slice(a, b))
        if extra is None:
            return k, v, positions
        k[:, :, b - a:], v[:, :, b - a:] = extra[0], extra[1]
        return k, v, torch.cat([positions, extra[2]])

    def _writable(self) -> bool:
        """One new token may be stored by the kernel that attends (`store_one`): one sequence, float32 or bfloat16
        as stored, on the CPU, no layer reading this one's K/V."""
        t = self.k.t
        return (self.plain and not self.shared and t.shape[0] == 1 and t.dtype in (torch.float32, torch.bfloat16)
                and t.is_cpu)

    def _store(self, kv_type: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        cls, stored = storage(kv_type, dtype)
        self.dtype = dtype  # the activations'
        self.native = cls is Plain and stored == dtype
        self.plain = cls is Plain  # a float dtype: readable as stored
        self.k, self.v = cls(shape, stored, device), cls(shape, stored, device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class FullCache(_Cache):
    """Keeps every position (global layers). Storage grows by doubling, or is preallocated with `capacity`."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 capacity: int = 256, kv_type: str = "auto"):
        self._store(kv_type, (batch, kv_heads, capacity, head_dim), dtype, device)
        self.device = device
        self.length = 0

    def _reserve(self, needed: int) -> None:
        if needed > self.k.size:
            new = max(needed, 2 * self.k.size)
            self.k.resize(new, fill=False)  # nothing past the length is ever read
            self.v.resize(new, fill=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Parts:
        """k, v: (B, KV, T, D) for positions (T,), which continue the cache."""
        t = k.shape[2]
        self._reserve(self.length + t)
        self.k.write(slice(self.length, self.length + t), k)
        self.v.write(slice(self.length, self.length + t), v)
        self.length += t
        return self._shared(self._parts(self.length, torch.arange(self.length, device=k.device)))

    def store_one(self) -> tuple | None:
        """For a kernel that stores one new token of one sequence itself and attends over the cache: (k, v, slot to
        write, slots to attend, None: slot s holds position s), the length already advanced; None where `update`
        must store it."""
        if not self._writable():
            return None
        self._reserve(self.length + 1)
        self.length += 1
        return self.k.t, self.v.t, self.length - 1, self.length, None

    def view(self):
        """(k, v, positions) of everything cached, in the activations' dtype."""
        return (self.k.read(slice(0, self.length), self.dtype), self.v.read(slice(0, self.length), self.dtype),
                torch.arange(self.length, device=self.k.t.device))

    def trim(self, n: int) -> None:
        self.length -= min(n, self.length)


class SlidingCache(_Cache):
    """The cache of a sliding-window layer: a ring of `window + spare` slots, slot = position % size, so its memory
    stays fixed whatever the context; what the window no longer sees is overwritten.

    Decoding one token writes it first and attends over the ring. A chunk of several tokens attends over
    (ring before the write) + (the chunk), then keeps its last positions. `spare` slots let a sequence be rewound
    by `trim` (speculative decoding rewinds up to k tokens; prefix reuse a prompt's last tokens, `REWIND`).

    A checkpoint (`checkpoint()`, set at a prompt's end for prefix reuse) freezes the ring: positions from it on
    are appended after the ring instead of overwriting it, so the cache can later be rewound to any length from
    the checkpoint on (a follow-up prompt that diverges inside the reply: Gemma 4's stripped thoughts). Those
    appended slots are the only memory a checkpoint costs while the reply is shorter than the window. A longer
    reply (a long thought) copies the frozen ring aside, once (the memory of one ring), and goes back to
    overwriting: the cache can then still be rewound to exactly the checkpoint, where the next turn starts.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str, spare: int = 0, kv_type: str = "auto"):
        self.window, self.ring = window, window + spare
        self._store(kv_type, (batch, kv_heads, self.ring, head_dim), dtype, device)
        self.pos = torch.full((self.ring,), -1, dtype=torch.long, device=device)
        self.length = 0
        self.hold: int | None = None  # the checkpoint: positions from here on go after the ring
        self.snap: tuple | None = None  # (length, k, v, positions) of the ring at a checkpoint a reply outgrew

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        if self.hold is None:
            return positions % self.ring
        return torch.where(positions < self.hold, positions % self.ring, self.ring + positions - self.hold)

    def _used(self) -> int:
        return self.ring + (max(0, self.length - self.hold) if self.hold is not None else 0)

    def _reserve(self, needed: int) -> None:
        size = self.k.size
        if needed <= size:
            return
        new = max(needed, 2 * size - self.ring, self.ring + APPEND_MIN)  # the appended part doubles
        self.k.resize(new)
        self.v.resize(new)
        self.pos = torch.cat([self.pos, self.pos.new_full((new - size,), -1)])

    def _outgrow(self, t: int) -> None:
        if self.hold is not None and self.length + t - self.hold > self.window:
            # the appended part would outgrow the window: the checkpoint's ring is copied aside, the rest given up
            self.snap = (self.hold, self.k.head(self.ring), self.v.head(self.ring), self.pos[:self.ring].clone())
            self.release()

    def store_one(self) -> tuple | None:
        """As `FullCache.store_one`, with the positions of the slots (the kernel writes the new one's)."""
        if not self._writable():
            return None
        self._outgrow(1)
        if self.hold is not None:  # after the ring (see `update`)
            self._reserve(self.ring + self.length + 1 - self.hold)
            slot = self.ring + self.length - self.hold
            self.length += 1
            return self.k.t, self.v.t, slot, self._used(), self.pos
        self.length += 1
        return self.k.t, self.v.t, (self.length - 1) % self.ring, self.ring, self.pos

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Parts:
        t = k.shape[2]
        self._outgrow(t)
        if self.hold is not None:  # nothing is overwritten: write, then attend over everything kept
            self._reserve(self.ring + self.length + t - self.hold)
            slots = self._slots(positions)
            self._write(slots, k, v, positions)
            self.length += t
            return self._shared(self._parts(self._used(), self.pos))
        if t == 1:  # a new token continues the cache: its position is the length (slices, not index tensors)
            slot = self.length % self.ring
            self._write(slice(slot, slot + 1), k, v, self.length)
            self.length += 1
            return self._shared(self._parts(self.ring, self.pos))
        out = self._parts(self.ring, self.pos.clone(), extra=(k, v, positions))  # read before the ring is written
        if not self.native:  # the chunks of the old ring must be read before the write below, into their own memory
            out = Parts([p if torch.is_tensor(p[0]) else self._read(*p, own=True) for p in out.pieces])
        keep = min(t, self.ring)
        self._write(positions[-keep:] % self.ring, k[:, :, -keep:], v[:, :, -keep:], positions[-keep:])
        self.length += t
        return self._shared(out)

    def _write(self, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor | int) -> None:
        self.k.write(slots, k)
        self.v.write(slots, v)
        self.pos[slots] = positions

    def view(self):
        """(k, v, positions) of every slot in use, in the activations' dtype; empty ones have position -1."""
        used = self._used()
        return (self.k.read(slice(0, used), self.dtype), self.v.read(slice(0, used), self.dtype),
                self.pos[:used])

    def checkpoint(self) -> None:
        """Keep from now on what rewinding to the current length needs."""
        self.release()
        self.hold, self.snap = self.length, None

    def rewind_point(self, n: int) -> int:
        if n >= min(self.floor, self.length):
            return n
        if self.snap is None:
            return 0
        return min(n, self.snap[0]) if n >= _floor(self.snap[3], self.window, self.snap[0]) else 0

    @property
    def nbytes(self) -> int:
        return super().nbytes + (self.snap[1].nbytes + self.snap[2].nbytes if self.snap is not None else 0)

    def release(self) -> None:
        """Give up the checkpoint: the positions appended after the ring go to their ring slots (the window of the
        current length is kept) and the storage shrinks back to the ring."""
        if self.hold is None:
            return
        used = self._used()
        if used > self.ring:
            tail = self.pos[self.ring:used].clone()
            self.k.move(tail % self.ring, slice(self.ring, used))
            self.v.move(tail % self.ring, slice(self.ring, used))
            self.pos[tail % self.ring] = tail
        self.k.resize(self.ring)
        self.v.resize(self.ring)
        self.pos, self.hold = self.pos[:self.ring].clone(), None

    @property
    def floor(self) -> int:
        """The shortest length the cache can be rewound to: every position its window needs is still held."""
        return _floor(self.pos, self.window, self.length)

    def trim(self, n: int) -> None:
        n = min(n, self.length)
        if n <= 0:
            return
        target, low = self.length - n, min(self.floor, self.length)
        if (target < low and self.snap is not None
                and _floor(self.snap[3], self.window, self.snap[0]) <= target <= self.snap[0]):
            # the checkpoint's ring back, then cut to the target within it
            (self.length, self.k, self.v, self.pos), self.hold, self.snap = self.snap, None, None
            self.trim(self.length - target)
            return
        if target < low:
            raise ValueError(f"cannot rewind a sliding cache of {self.length} tokens by {n}: its window then needs "
                             "positions it no longer holds")
        self.length = target
        self.pos.masked_fill_(self.pos >= target, -1)
        if self.hold is not None and self.length < self.hold:
            self.hold = self.length  # the appended part is empty again; the ring slots of the rest are free


def _floor(pos: torch.Tensor, window: int, length: int) -> int:
    """The shortest length a sliding cache holding positions `pos` (-1: empty) can be rewound to: from there on,
    every position its window needs is held."""
    lowest = int(torch.where(pos >= 0, pos, length).min())  # held positions are all below the length
    return 0 if lowest == 0 else lowest + window - 1


class SharedCache(Cache):
    """A layer that reuses another layer's K/V (Gemma 4 KV sharing): it reads what its source layer's latest
    update returned (the source runs first in the same forward) and stores nothing."""

    def __init__(self, source: FullCache | SlidingCache):
        self.source = source
        source.shared = True

    def update(self, k, v, positions: torch.Tensor):
        return self.source.last

    @property
    def length(self) -> int:
        return self.source.length

    def trim(self, n: int) -> None:
        pass  # the source layer's cache is trimmed on its own

    def checkpoint(self) -> None:
        pass  # likewise

    def release(self) -> None:
        pass

    def rewind_point(self, n: int) -> int:
        return n

    floor = 0
    nbytes = 0


class RowCaches:
    """One layer's caches of B sequences decoded together (batched decoding): row i attends over its own cache at
    its own positions, positions (B, T). Rows run one at a time, so a row's result never depends on its batch."""

    def __init__(self, rows: list[Cache]):
        self.rows = rows

    def attend(self, q: torch.Tensor, k, v, positions: torch.Tensor, fn) -> torch.Tensor:
        return torch.cat([c.attend(q[i:i + 1], _row(k, i), _row(v, i), positions[i], fn)
                          for i, c in enumerate(self.rows)])


def _row(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[i:i + 1]


def row_caches(sequences: list[list[Cache]]) -> list[RowCaches]:
    """Each sequence's per-layer caches -> one `RowCaches` per layer."""
    return [RowCaches(list(layer)) for layer in zip(*sequences)]


def make_caches(layers: tuple[LayerSpec, ...], batch: int, dtype: torch.dtype, device: torch.device | str,
                capacity: int = 256, spare: int = 0, kv_type: str = "auto") -> list:
    """One cache per layer, following each layer's spec, K/V stored as `kv_type` says. A layer that shares KV
    (Gemma 4) reads its source layer's cache through a `SharedCache`; nothing is stored twice."""
    caches: list = []
    for spec in layers:
        if spec.kv_source is not None:
            caches.append(SharedCache(caches[spec.kv_source]))
        elif spec.window is not None:
            caches.append(SlidingCache(batch, spec.num_kv_heads, spec.head_dim, spec.window, dtype, device, spare,
                                       kv_type))
        else:
            caches.append(FullCache(batch, spec.num_kv_heads, spec.head_dim, dtype, device, capacity, kv_type))
    return caches


def cache_bytes(caches: list) -> int:
    """Bytes held by one sequence's caches (layers that share KV count once)."""
    return sum(c.nbytes for c in {id(c): c for c in caches}.values())
