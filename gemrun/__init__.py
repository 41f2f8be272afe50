"""gemrun: run Google's Gemma models locally from Python.

The public names are imported on first use, so that `import gemrun.cli` (and `gemrun --help`) does not pay for
torch."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import GemrunError

if TYPE_CHECKING:
    from .api import Model, load
    from .sampling import SamplingParams

__all__ = ["GemrunError", "Model", "SamplingParams", "load"]

# OpenMP threads (torch's and the native kernels') sleep when idle instead of spinning: a spinning pool starves the
# thread that works as soon as another process wants a core (measured on 2 cores with one busy process, 2 threads:
# 0.5-1.7 decode tok/s spinning, 24 passive). Read by each OpenMP runtime when it starts: set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Model", "load"):
        from . import api

        return getattr(api, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'gemrun' has no attribute {name!r}")
