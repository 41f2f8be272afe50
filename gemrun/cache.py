"""Per-layer KV caches with one small protocol: `update(k, v, positions) -> (k, v, kv_positions)`, `length`,
`trim(n)`, `nbytes`, and `attend(q, k, v, positions, fn)`, what an attention layer calls: it stores k, v and runs
`fn` over everything the cache then holds. `RowCaches` gives the same `attend` to B sequences decoded together.

Keys are cached after RoPE, so a cache only needs each slot's absolute position to build masks; the order of
slots does not matter. That lets the sliding-window cache be a ring buffer whose memory never grows.
"""

from __future__ import annotations

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
    """Ring buffer of `capacity` >= window slots (sliding layers); memory is fixed whatever the context.

    Decoding one token writes it first and attends over the ring. A chunk of several tokens attends over
    (ring before the write) + (the chunk), then keeps its last positions. `capacity - window + 1` tokens can be
    trimmed (speculative rewind needs that slack; plain generation needs none).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str, spare: int = 0):
        self.window = window
        capacity = window + spare
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        cap, t = self.k.shape[2], k.shape[2]
        if t == 1:
            slot = int(positions[0]) % cap
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.pos[slot] = positions[0]
            self.length += 1
            return self._shared(self.view())
        out = (torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), torch.cat([self.pos, positions]))
        keep = min(t, cap)
        slots = positions[-keep:] % cap
        self.k[:, :, slots] = k[:, :, -keep:]
        self.v[:, :, slots] = v[:, :, -keep:]
        self.pos[slots] = positions[-keep:]
        self.length += t
        return self._shared(out)

    def view(self):
        """(k, v, positions) of every slot; empty slots have position -1 and are masked."""
        return self.k, self.v, self.pos

    def trim(self, n: int) -> None:
        slack = self.k.shape[2] - self.window + 1
        if n > slack:
            raise ValueError(f"cannot rewind a sliding cache by {n} tokens (slack {slack})")
        n = min(n, self.length)
        self.pos[self.pos >= self.length - n] = -1
        self.length -= n

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
