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
        # (key as int64 ids, caches, end); most recently used last
        self.entries: list[tuple[torch.Tensor, list, tuple | None]] = []
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
        best, ids = None, _ids(key)
        with self.lock:
            for i, (held, caches, end) in enumerate(self.entries):
                whole = exact and end is not None and end[0] == len(key) and _point(caches, len(key)) == len(key)
                if whole and _common(held, ids, len(key)) == len(key):
                    best = (i, len(key), end[1])
                    break
                n = _common(held, ids, len(key) - 1)
                if best is not None and n <= best[1]:
                    continue  # rewinding only shortens it: it cannot beat the best so far
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


def _ids(key: list[int]) -> torch.Tensor:
    """Token ids as int64, through an array: torch.tensor on a list of 2,000 ints takes ~0.3 ms, this ~25 us."""
    return torch.frombuffer(array("q", key), dtype=torch.int64) if key else torch.zeros(0, dtype=torch.int64)


def _common(a: torch.Tensor, b: torch.Tensor, limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n
