"""What a checkpoint is, from its metadata alone: the config, the parameter count and the format, read from a GGUF
header or an HF directory's config.json and safetensors headers. No tensor is read and torch is not imported, so
`gemrun info` answers at once even for a 12B file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config import PRESETS, TextConfig, from_hf_config
from ..errors import WeightsError
from ..files import config_json


@dataclass
class Description:
    config: TextConfig
    parameters: int  # every tensor of the file(s): text decoder and, where present, vision or media parts
    source: str  # "preset NAME", "gguf PATH" or "safetensors PATH"


def describe(name: str | Path) -> Description:
    """A preset name, a GGUF file or an HF directory; anything else is an error that lists the presets."""
    if str(name) in PRESETS:
        cfg = PRESETS[str(name)]
        return Description(cfg, cfg.parameter_count(), f"preset {name}")
    path = Path(name).expanduser()
    if path.is_file():
        from .gguf import GGUFFile
        from .gguf_config import config_from_gguf

        g = GGUFFile(path)
        cfg = config_from_gguf(g.metadata, g.tensors)
        embed = g.tensors.get("token_embd.weight")
        if embed is not None:
            cfg = cfg.replace(vocab_size=int(embed.shape[0]))
        return Description(cfg, sum(math.prod(t.shape) for t in g.tensors.values()), f"gguf {path}")
    if path.is_dir():
        from .safetensors import SafetensorsCheckpoint

        shapes = SafetensorsCheckpoint(path).shapes
        return Description(from_hf_config(config_json(path)), sum(math.prod(s) for s in shapes.values()),
                           f"safetensors {path}")
    raise WeightsError(f"{name} is neither a GGUF file, an HF directory nor a preset (presets: "
                       f"{', '.join(PRESETS)})")
