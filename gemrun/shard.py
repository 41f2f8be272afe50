"""Tensor parallelism (Megatron-style) as module substitution: one rank's part of the text model is the same
model built from a per-rank config (its share of the query heads, KV heads and MLP width), with its slice of each
sharded matrix swapped in while loading (`weights.load._build` asks a `Shard` for it). The model files stay math.

What each rank holds (rank r of W):
- q_proj, gate_proj, up_proj: column-parallel, output rows r/W of the whole (heads r*H/W .. (r+1)*H/W - 1).
- k_proj, v_proj: the KV heads those query heads read: KV/W of them, or, with fewer KV heads than ranks (the
  270M's one, Gemma 4's single K=V head of global layers), the one KV head its query heads share, replicated.
- o_proj, down_proj: row-parallel, the matching input columns; `RowParallel` sums the partial products with one
  all-reduce each (two per layer).
- the tied embedding / output head: vocabulary rows r/W (`VocabParallel`: a lookup all-reduces the owning rank's
  rows, the head all-gathers the logits), or replicated with `vocab="replicated"`.
- norms, layer scalars, vision tower and media embedders: replicated.
Packed int4/int8 matrices are cut by rows or by whole groups of 32 columns as they are (`narrow`: the same
quantized values, no requantization). The decode path is plain tensors and `torch.distributed` collectives.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from .config import TextConfig
from .errors import ConfigError, WeightsError
from .model.layers import Embedding

SHARDED = re.compile(r"text\.layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")
COLUMN, ROW = {"q", "gate", "up"}, {"o", "down"}


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's input columns, then one all-reduce sums the ranks' partial products.
    Packed (CPU) kernels give float32 partials, summed before the one rounding to the activation dtype, as an
    unsharded product rounds once."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner, self.group = inner, group
        self.float_partials = not isinstance(inner, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x.float() if self.float_partials else x)  # (..., out) partial sum over this rank's inputs
        dist.all_reduce(y, group=self.group)
        return y.to(x.dtype)


class VocabParallel(nn.Module):
    """The tied embedding cut by vocabulary rows: `start` .. `start + rows` live here. A lookup takes the rows
    this rank owns (zero elsewhere) and all-reduces them; `project` (the output head) all-gathers every rank's
    logits into (..., vocab)."""

    def __init__(self, inner: nn.Module, start: int, vocab: int, group=None):
        super().__init__()
        self.inner, self.start, self.group = inner, start, group
        self.rows, self.num_embeddings = inner.num_embeddings, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        x = self.inner(local.clamp(0, self.rows - 1)).masked_fill(~mine[..., None], 0)  # (..., E)
        dist.all_reduce(x, group=self.group)  # one rank holds each row: the sum is that row, exactly
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner.project(x).contiguous()  # (..., rows)
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)  # (..., vocab)


class HeadSkipped(nn.Module):
    """A follower rank's replicated embedding: lookups as before, but no output head (only the leading rank
    samples, so the others skip the largest matmul of a small model)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


def _linear(w: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _embedding(w: torch.Tensor) -> Embedding:
    with torch.device("meta"):
        table = Embedding(*w.shape)
    table.weight = nn.Parameter(w, requires_grad=False)
    return table


class Shard:
    """Rank `rank` of `world` tensor-parallel ranks. `vocab`: "parallel" (embedding and head cut by vocabulary
    rows) or "replicated" (every rank holds the whole table; followers skip the head)."""

    def __init__(self, rank: int, world: int, vocab: str = "parallel", group=None):
        if vocab not in ("parallel", "replicated"):
            raise ConfigError(f"vocab must be 'parallel' or 'replicated', got {vocab!r}")
        self.rank, self.world, self.vocab, self.group = rank, world, vocab, group

    def plan(self, config: TextConfig, provided: dict[str, tuple[int, ...]]) -> Plan:
        return Plan(self, config, provided)


class Plan:
    """How one checkpoint is cut for one rank: the per-rank config, the shapes its model expects, and `piece`,
    which turns each loaded tensor (or packed module) into this rank's module."""

    def __init__(self, shard: Shard, config: TextConfig, provided: dict[str, tuple[int, ...]]):
        self.shard, self.full, self.provided = shard, config, provided
        w, heads = shard.world, config.num_heads
        kv_counts = {s.num_kv_heads for s in config.layers}
        if heads % w or config.intermediate_size % w or any(kv % w and w % kv for kv in kv_counts):
            raise ConfigError(f"--tp {w} must divide the {heads} query heads and the MLP width "
                              f"{config.intermediate_size}, and divide or be a multiple of the KV heads "
                              f"({', '.join(map(str, sorted(kv_counts)))})")
        self.vocab_parallel = shard.vocab == "parallel" and config.vocab_size % w == 0
        changes = {"num_heads": heads // w, "num_kv_heads": self._kv(config.num_kv_heads),
                   "intermediate_size": config.intermediate_size // w}
        if getattr(config, "num_global_kv_heads", None):
            changes["num_global_kv_heads"] = self._kv(config.num_global_kv_heads)
        self.config = config.replace(**changes)
        self.shapes = {name: self._shape(name, shape) for name, shape in provided.items()}

    def _kv(self, kv: int) -> int:
        return kv // self.shard.world if kv % self.shard.world == 0 else 1

    def _kv_heads(self, kv: int) -> tuple[int, int]:
        """The KV heads [lo, hi) that this rank's query heads read (head h reads KV head h // (H / KV))."""
        local, group = self.full.num_heads // self.shard.world, self.full.num_heads // kv
        r = self.shard.rank
        return r * local // group, ((r + 1) * local - 1) // group + 1

    def rule(self, name: str) -> tuple[str, int, int, int] | None:
        """(kind, dim, start, length) of this rank's slice of tensor `name`, or None where it is replicated."""
        w, r, shape = self.shard.world, self.shard.rank, self.provided[name]
        if name == "text.embed_tokens.weight":
            n = shape[0] // w
            return ("vocab", 0, r * n, n) if self.vocab_parallel else None
        m = SHARDED.fullmatch(name)
        if m is None:
            return None
        part = m[2]
        if part in COLUMN:
            return "column", 0, r * shape[0] // w, shape[0] // w
        if part in ROW:
            return "row", 1, r * shape[1] // w, shape[1] // w
        spec = self.full.layers[int(m[1])]
        lo, hi = self._kv_heads(spec.num_kv_heads)
        return "column", 0, lo * spec.head_dim, (hi - lo) * spec.head_dim

    def _shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        rule = self.rule(name)
        if rule is None or rule[0] == "vocab":  # the embedding is swapped whole for a VocabParallel module
            return tuple(shape)
        _, dim, _, length = rule
        return tuple(length if i == dim else n for i, n in enumerate(shape))

    def piece(self, name: str, module: nn.Module | None, get, dense) -> nn.Module | None:
        """This rank's module for tensor `name`: `module` (a packed one, or None for a float tensor read by
        `get` and converted by `dense`) cut to its slice and wrapped where its output needs a collective; None
        leaves a replicated float tensor to the loader."""
        rule = self.rule(name)
        if rule is None:
            return module
        kind, dim, start, length = rule
        if module is None:
            t = dense(get().narrow(dim, start, length).contiguous())
            module = _embedding(t) if kind == "vocab" else _linear(t)
        elif hasattr(module, "narrow"):
            module = module.narrow(dim, start, length)
        else:
            raise WeightsError(f"{name}: a {type(module).__name__} cannot be cut for tensor parallelism")
        if kind == "row":
            return RowParallel(module, self.shard.group)
        if kind == "vocab":
            return VocabParallel(module, start, self.full.vocab_size, self.shard.group)
        return module


__all__ = ["HeadSkipped", "Plan", "RowParallel", "Shard", "VocabParallel"]
