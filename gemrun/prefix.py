"""The prefix pool: finished sequences' KV caches kept for later prompts that share a prefix (a conversation's
next turn, a retried request), bounded by bytes, least recently used out first."""

from __future__ import annotations

import threading
from array import array

import torch

from .cache import cache_bytes


class PrefixPool:
    """The caches of finished sequences, each under the key of the tokens they hold (token ids, media positions
    replaced by the hash of their media), bounded by `max_bytes` (least recently used out first). A new prompt
    takes the entry sharing its longest usable prefix, rewound to it; it prefills only the rest. An entry is taken
    whole (its caches become the new sequence's, which comes back under its longer key when it ends), so no two
    sequences ever share a cache."""

    def __init__(self, max_bytes: int, max_entries: int | None = None):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        # (key as the bytes of its int64 ids, caches, end); most recently used last
        self.entries: list[tuple[bytes, list, tuple | None]] = []
        self.hits = self.misses = self.reused_tokens = 0
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(_size(caches, end) for _, caches, end in self.entries)

    def take(self, key: list[int], blocks: torch.Tensor | None = None,
             exact: bool = False) -> tuple[list, int, torch.Tensor | None] | None:
        """(caches rewound to the longest usable common prefix of `key`, its length, None) or None. At least one
        token of `key` is left to prefill (its logits start the reply), and a prefix never ends inside an image's
        soft tokens (`blocks`: they attend to each other and are computed together). With `exact`, an entry whose
        prompt was `key` itself comes back whole with the logits that prompt ended on (length len(key)): an
        identical request computes nothing and samples from the very logits a cold run would."""
        ids = _ids(key)
        with self.lock:
            # candidates longest common prefix first (the oldest of equals): rewinding only shortens one, so once a
            # candidate's common length is no longer than the best usable length found, none after it can beat it
            ranked = sorted((-_common(held, ids, len(key)), i) for i, (held, _, _) in enumerate(self.entries))
            best = None
            for full, i in ranked:
                full, (_, caches, end) = -full, self.entries[i]
                if (exact and full == len(key) and end is not None and end[0] == len(key)
                        and _point(caches, len(key)) == len(key)):
                    best = (i, len(key), end[1])
                    break
                n = min(full, len(key) - 1)
                if best is not None and n <= best[1]:
                    break
                while n > 0 and blocks is not None and blocks[n] >= 0 and blocks[n] == blocks[n - 1]:
                    n -= 1
                n = _point(caches, n)  # sliding layers: within the window, or exactly at the prompt's end
                if n > 0 and (best is None or n > best[1]):
                    best = (i, n, None)
            if best is None:
                self.misses += 1
                return None
            _, caches, _ = self.entries.pop(best[0])
            self.hits += 1
            self.reused_tokens += best[1]
        with torch.inference_mode():  # the caches' tensors were made there
            for c in caches:
                c.trim(c.length - best[1])
        return caches, best[1], best[2]

    def put(self, key: list[int], caches: list, end: tuple[int, torch.Tensor] | None = None) -> None:
        """Keep finished caches holding the tokens `key`; `end` is (prompt length, the logits it ended on). Too
        large a set is dropped."""
        if not caches or caches[0].length != len(key) or not key:
            return
        with self.lock:
            if _size(caches, end) > self.max_bytes:
                return
            self.entries.append((_ids(key), caches, end))
            while self.nbytes > self.max_bytes or (self.max_entries and len(self.entries) > self.max_entries):
                self.entries.pop(0)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _point(caches: list, n: int) -> int:
    """The longest length <= n that every cache can be rewound to (0: none)."""
    while n > 0 and (m := min(c.rewind_point(n) for c in caches)) < n:
        n = m
    return n


def _size(caches: list, end: tuple[int, torch.Tensor] | None) -> int:
    """Bytes of one entry: its caches and the logits its prompt ended on."""
    return cache_bytes(caches) + (end[1].nbytes if end is not None else 0)


def _ids(key: list[int]) -> bytes:
    """Token ids as the bytes of int64s: compared with memcmp (`_common`), and made through an array (~25 us for
    2,000 ids, where a tensor from the list takes ~0.3 ms)."""
    return array("q", key).tobytes()


def _common(a: bytes, b: bytes, limit: int) -> int:
    """Length in tokens of the common prefix of the ids a and b (`_ids`), at most `limit`: a binary search of
    equal prefixes, each compared by memcmp (a tensor compare and nonzero took ~0.13 ms at 2,000 tokens)."""
    lo, hi = 0, max(0, min(len(a) // 8, len(b) // 8, limit))
    if a[:8 * hi] == b[:8 * hi]:
        return hi
    while hi - lo > 1:  # a's and b's first lo tokens are equal, their first hi are not
        mid = (lo + hi) // 2
        if a[8 * lo:8 * mid] == b[8 * lo:8 * mid]:
            lo = mid
        else:
            hi = mid
    return lo
