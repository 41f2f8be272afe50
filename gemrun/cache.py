"""Per-layer KV caches with one small protocol: `update(k, v, positions) -> (k, v, kv_positions)`, `length`,
`trim(n)`, `checkpoint()`, `floor`, `nbytes`, and `attend(q, k, v, positions, fn)`, what an attention layer calls:
it stores k, v and runs `fn` over everything the cache then holds. `RowCaches` gives the same `attend` to B
sequences decoded together. `PrefixPool` keeps the caches of finished sequences for prompts that share a prefix.

Keys are cached after RoPE, so a cache only needs each slot's absolute position to build masks; the order of
slots does not matter. That lets the sliding-window cache be a ring buffer whose memory never grows.
"""

from __future__ import annotations

import threading

import torch

from .config import LayerSpec


class Cache:
    """The `attend` every cache shares: store the new k, v (B, KV, T, D) at positions (T,) (k = v = None: a layer
    reading another layer's K/V), then fn(q, k, v, positions, kv_positions) over the cached keys (B, KV, S, D)."""

    def update(self, k, v, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k, v, positions: torch.Tensor, fn) -> torch.Tensor:
        keys, values, kv_positions = self.update(k, v, positions)
        return fn(q, keys, values, positions, kv_positions)


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

    def _shared(self, out: tuple) -> tuple:
        if self.shared:
            self.last = out
        return out


class FullCache(_Cache):
    """Keeps every position (global layers). Storage grows by doubling, or is preallocated with `capacity`."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 capacity: int = 256):
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def _reserve(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        grow = (self.k.shape[0], self.k.shape[1], new_cap - cap, self.k.shape[3])
        self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=2)

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v: (B, KV, T, D) for positions (T,), which continue the cache."""
        t = k.shape[2]
        self._reserve(self.length + t)
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self._shared(self.view())

    def view(self):
        """(k, v, positions) of everything cached."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length], torch.arange(self.length, device=self.k.device)

    def trim(self, n: int) -> None:
        self.length -= min(n, self.length)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class SlidingCache(_Cache):
    """The cache of a sliding-window layer: a ring of `window + spare` slots, slot = position % size, so its memory
    stays fixed whatever the context; what the window no longer sees is overwritten.

    Decoding one token writes it first and attends over the ring. A chunk of several tokens attends over
    (ring before the write) + (the chunk), then keeps its last positions. `spare` slots let a sequence be
    rewound by `trim` (speculative decoding rewinds up to k tokens).

    A checkpoint (`checkpoint()`, set at a prompt's end for prefix reuse) freezes the ring: positions from it on
    are appended after the ring instead of overwriting it, so the cache can later be rewound to any length from
    the checkpoint on (a follow-up prompt that diverges inside the reply: Gemma 4's stripped thoughts). Those
    appended slots are the only memory a checkpoint costs; past `window` of them it is given up (`release`).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str, spare: int = 0):
        self.window, self.ring = window, window + spare
        self.k = torch.zeros(batch, kv_heads, self.ring, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((self.ring,), -1, dtype=torch.long, device=device)
        self.length = 0
        self.hold: int | None = None  # the checkpoint: positions from here on go after the ring

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        if self.hold is None:
            return positions % self.ring
        return torch.where(positions < self.hold, positions % self.ring, self.ring + positions - self.hold)

    def _used(self) -> int:
        return self.ring + (max(0, self.length - self.hold) if self.hold is not None else 0)

    def _reserve(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap - self.ring)
        grow = (self.k.shape[0], self.k.shape[1], new_cap - cap, self.k.shape[3])
        self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_full((new_cap - cap,), -1)])

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        t = k.shape[2]
        if self.hold is not None and self.length + t - self.hold > self.window:
            self.release()  # the appended part would outgrow the window: the checkpoint is given up
        if self.hold is not None:  # nothing is overwritten: write, then attend over everything kept
            self._reserve(self.ring + self.length + t - self.hold)
            slots = self._slots(positions)
            self.k[:, :, slots], self.v[:, :, slots], self.pos[slots] = k, v, positions
            self.length += t
            return self._shared(self.view())
        if t == 1:
            slot = int(positions[0]) % self.ring
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.pos[slot] = positions[0]
            self.length += 1
            return self._shared(self.view())
        k_all, v_all, p_all = self.view()
        out = (torch.cat([k_all, k], dim=2), torch.cat([v_all, v], dim=2), torch.cat([p_all, positions]))
        keep = min(t, self.ring)
        slots = positions[-keep:] % self.ring
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.pos[slots] = positions[-keep:]
        self.length += t
        return self._shared(out)

    def view(self):
        """(k, v, positions) of every slot in use; empty ones have position -1 and are masked."""
        used = self._used()
        return self.k[:, :, :used], self.v[:, :, :used], self.pos[:used]

    def checkpoint(self) -> None:
        """Keep from now on what rewinding to the current length needs."""
        self.release()
        self.hold = self.length

    def release(self) -> None:
        """Give up the checkpoint: the positions appended after the ring go to their ring slots (the window of the
        current length is kept) and the storage shrinks back to the ring."""
        if self.hold is None:
            return
        used = self._used()
        if used > self.ring:
            tail = self.pos[self.ring:used].clone()
            slots = tail % self.ring
            self.k[:, :, slots] = self.k[:, :, self.ring:used].clone()
            self.v[:, :, slots] = self.v[:, :, self.ring:used].clone()
            self.pos[slots] = tail
        self.k, self.v = self.k[:, :, :self.ring].clone(), self.v[:, :, :self.ring].clone()
        self.pos, self.hold = self.pos[:self.ring].clone(), None

    @property
    def floor(self) -> int:
        """The shortest length the cache can be rewound to: every position its window needs is still held."""
        held = self.pos[self.pos >= 0]
        lowest = int(held.min()) if len(held) else self.length
        return 0 if lowest == 0 else lowest + self.window - 1

    def trim(self, n: int) -> None:
        n = min(n, self.length)
        if self.length - n < min(self.floor, self.length):
            raise ValueError(f"cannot rewind a sliding cache of {self.length} tokens by {n}: its window then needs "
                             "positions it no longer holds")
        self.length -= n
        self.pos[self.pos >= self.length] = -1
        if self.hold is not None and self.length < self.hold:
            self.hold = self.length  # the appended part is empty again; the ring slots of the rest are free

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


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
                capacity: int = 256, spare: int = 0) -> list:
    """One cache per layer, following each layer's spec. A layer that shares KV (Gemma 4) reads its source
    layer's cache through a `SharedCache`; nothing is stored twice."""
    caches: list = []
    for spec in layers:
        if spec.kv_source is not None:
            caches.append(SharedCache(caches[spec.kv_source]))
        elif spec.window is not None:
            caches.append(SlidingCache(batch, spec.num_kv_heads, spec.head_dim, spec.window, dtype, device, spare))
        else:
            caches.append(FullCache(batch, spec.num_kv_heads, spec.head_dim, dtype, device, capacity))
    return caches


class PrefixPool:
    """The caches of finished sequences, each under the key of the tokens they hold (token ids, media positions
    replaced by the hash of their media), bounded by `max_bytes` (least recently used out first). A new prompt
    takes the entry sharing its longest usable prefix, rewound to it; it prefills only the rest. An entry is taken
    whole (its caches become the new sequence's, which comes back under its longer key when it ends), so no two
    sequences ever share a cache."""

    def __init__(self, max_bytes: int, max_entries: int | None = None):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.entries: list[tuple[list[int], list]] = []  # most recently used last
        self.hits = self.misses = self.reused_tokens = 0
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(cache_bytes(caches) for _, caches in self.entries)

    def take(self, key: list[int], blocks: torch.Tensor | None = None) -> tuple[list, int] | None:
        """(caches rewound to the longest usable common prefix of `key`, its length) or None. At least one token
        of `key` is left to prefill (its logits start the reply), and a prefix never ends inside an image's soft
        tokens (`blocks`: they attend to each other and are computed together)."""
        best = None
        with self.lock:
            for i, (held, caches) in enumerate(self.entries):
                n = _common(held, key, len(key) - 1)
                while n > 0 and blocks is not None and blocks[n] >= 0 and blocks[n] == blocks[n - 1]:
                    n -= 1
                if n > 0 and n >= max(c.floor for c in caches) and (best is None or n > best[1]):
                    best = (i, n)
            if best is None:
                self.misses += 1
                return None
            _, caches = self.entries.pop(best[0])
            self.hits += 1
            self.reused_tokens += best[1]
        with torch.inference_mode():  # the caches' tensors were made there
            for c in caches:
                c.trim(c.length - best[1])
        return caches, best[1]

    def put(self, key: list[int], caches: list) -> None:
        """Keep finished caches holding the tokens `key`; too large a set is dropped."""
        if not caches or caches[0].length != len(key) or not key:
            return
        size = cache_bytes(caches)
        with self.lock:
            if size > self.max_bytes:
                return
            self.entries.append((key, caches))
            while self.nbytes > self.max_bytes or (self.max_entries and len(self.entries) > self.max_entries):
                self.entries.pop(0)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def cache_bytes(caches: list) -> int:
    """Bytes held by one sequence's caches (layers that share KV count once)."""
    return sum(c.nbytes for c in {id(c): c for c in caches}.values())


def _common(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    x, y = torch.tensor(a[:n]), torch.tensor(b[:n])
    differ = (x != y).nonzero()
    return int(differ[0]) if len(differ) else n
