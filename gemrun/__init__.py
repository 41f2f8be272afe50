"""gemrun: run Google's Gemma models locally from Python.

The public names are imported on first use, so that `import gemrun.cli` (and `gemrun --help`) does not pay for
torch."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

from .errors import GemrunError

if TYPE_CHECKING:
    from .api import Model, load
    from .sampling import SamplingParams

__all__ = ["GemrunError", "Model", "SamplingParams", "load"]



def _others_busy(seconds: float = 0.05) -> float | None:
    """Cores' worth of CPU time other processes used over a short sample (/proc/stat less this process's own), or
    None where /proc is missing."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), int(own[11]) + int(own[12])

    try:
        (busy0, own0), t0 = sample(), time.monotonic()
        time.sleep(seconds)
        (busy1, own1), t1 = sample(), time.monotonic()
    except (OSError, ValueError, IndexError):
        return None
    return max(0, (busy1 - busy0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


def _wait_policy() -> str:
    """OpenMP's wait policy for torch's and the native kernels' threads, chosen before torch loads (each OpenMP
    runtime reads it once). Spinning (ACTIVE) on an idle machine: on 2 cores, 2-thread decode of the 270M is 43
    tok/s spinning vs 28 sleeping. Sleeping (PASSIVE) when other processes already use half a core or more: beside
    one busy process, 24 vs 14 tok/s (and 2.5 with OpenMP's default, a long spin then sleep). A user's own
    OMP_WAIT_POLICY wins."""
    busy = _others_busy()
    return "PASSIVE" if busy is None or busy >= 0.5 else "ACTIVE"


if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:  # once torch is loaded, it is too late
    os.environ["OMP_WAIT_POLICY"] = _wait_policy()
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Model", "load"):
        from . import api

        return getattr(api, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'gemrun' has no attribute {name!r}")
