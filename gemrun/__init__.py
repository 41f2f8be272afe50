"""gemrun: run Google's Gemma models locally from Python."""

from .api import Model, load
from .errors import GemrunError
from .sampling import SamplingParams

__all__ = ["GemrunError", "Model", "SamplingParams", "load"]
__version__ = "0.1.0"
