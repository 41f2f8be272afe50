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


def openmp_settings(environ, busy: float | None) -> dict[str, str]:
    """The OpenMP variables to set before torch loads (each OpenMP runtime reads them once), given the environment
    and other processes' load (`_others_busy`). Spinning (ACTIVE) on an idle machine: on 2 cores, 2-thread decode of
    the 270M is 43 tok/s spinning vs 28 sleeping. Sleeping (PASSIVE) when other processes already use half a core
    or more: beside one busy process, 24 vs 14 tok/s (and 2.5 with OpenMP's default, a long spin then sleep).
    ACTIVE alone spins for minutes after the last parallel region (libgomp: 3e10 spins), so an idle server or chat
    kept a core at 100% for 5 minutes after every reply: GOMP_SPINCOUNT bounds it to ~0.1 s, which still covers the
    gaps between kernels and between tokens (same decode speed). A user's own OMP_WAIT_POLICY wins."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    if busy is None or busy >= 0.5:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"OMP_WAIT_POLICY": "ACTIVE", **({} if "GOMP_SPINCOUNT" in environ else {"GOMP_SPINCOUNT": "10000000"})}


def _steady_load() -> float | None:
    """Other processes' load, the lower of two short samples: a burst (a shell prompt, a health check creating its
    HTTP client) must not look like a busy machine and cost this whole process the spinning threads."""
    first = _others_busy()
    return first if first is None or first < 0.5 else _others_busy()


if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:  # once torch is loaded, it is too late
    os.environ.update(openmp_settings(os.environ, _steady_load()))

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Model", "load"):
        from . import api

        return getattr(api, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'gemrun' has no attribute {name!r}")
