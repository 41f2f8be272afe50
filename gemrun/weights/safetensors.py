"""HF safetensors checkpoints: one file or shards listed by `model.safetensors.index.json`, memory-mapped by the
`safetensors` library and read tensor by tensor. Pickled formats are never loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from ..errors import WeightsError
from ..files import model_file

if TYPE_CHECKING:  # torch itself is imported only where tensors are (metadata readers stay light)
    import torch

ALLOWED_DTYPES = {"F32", "F16", "BF16", "U8", "F8_E4M3", "I32", "I64"}  # U8, F8_E4M3: quantized directories;
# I32 / I64: integer buffers (a drafter's token ordering)
INDEX = "model.safetensors.index.json"


def _inside(root: Path, name: str) -> Path:
    """A file named by an index, resolved, regular and inside the model directory."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise WeightsError(f"shard name {name!r} in {INDEX} is not a relative file name")
    path = model_file(root, name, what=f"shard listed in {INDEX}")
    if path is None:
        raise WeightsError(f"shard {name!r} listed in {INDEX} is missing")
    return path


def shard_files(root: Path) -> list[Path]:
    """The shards an index lists, or every *.safetensors file; each a regular file inside `root`."""
    index = model_file(root, INDEX)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index} is not a valid safetensors index (no weight_map)") from None
        return [_inside(root, n) for n in names]
    files = [model_file(root, p.name) for p in sorted(root.glob("*.safetensors"))]
    if files:
        return files
    pickled = [p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise WeightsError(f"{root} holds only pickled weights ({', '.join(pickled)}); gemrun loads safetensors "
                           "or GGUF and never unpickles files")
    raise WeightsError(f"no *.safetensors files in {root}")


class SafetensorsCheckpoint:
    """Tensor table (name -> (shape, dtype)) of all shards, and tensors read one at a time."""

    def __init__(self, root: Path):
        self.files = shard_files(root)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="numpy") as st:
                    for name in st.keys():
                        sl = st.get_slice(name)
                        if sl.get_dtype() not in ALLOWED_DTYPES:
                            raise WeightsError(f"{f.name}: tensor {name!r} has dtype {sl.get_dtype()}; "
                                               f"allowed: {sorted(ALLOWED_DTYPES)}")
                        if name in self.where:
                            raise WeightsError(f"tensor {name!r} appears in two shards")
                        self.where[name] = f
                        self.shapes[name] = tuple(sl.get_shape())
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{f}: not a valid safetensors file ({e})") from None

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors one at a time. The file is mapped anew for each, so the pages of a tensor that the caller
        converts (and drops) are unmapped before the next one: peak memory is the model plus one tensor."""
        for n in names:
            try:
                with safe_open(str(self.where[n]), framework="pt") as st:
                    t = st.get_tensor(n)
            except SafetensorError as e:
                raise WeightsError(f"{self.where[n]}: cannot read tensor {n!r} ({e})") from None
            yield n, t


class ShardWriter:
    """Writes tensors into `model-NNNNN.safetensors` shards of at most `shard_bytes` and, on `close`, the index."""

    def __init__(self, out: Path, shard_bytes: int = 2 << 30):
        self.out, self.shard_bytes = out, shard_bytes
        self.weight_map: dict[str, str] = {}
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.index = 0

    def put(self, name: str, t: torch.Tensor) -> None:
        if self.size + t.nbytes > self.shard_bytes:
            self._flush()
        self.shard[name] = t.contiguous()
        self.size += t.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            self.index += 1
            name = f"model-{self.index:05d}.safetensors"
            save_file(self.shard, str(self.out / name), metadata={"format": "pt"})
            self.weight_map.update(dict.fromkeys(self.shard, name))
            self.shard, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        (self.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": self.weight_map}))
