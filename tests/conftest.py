"""Shared fixtures: tiny random reference models, the embedded real Gemma 3 270M in gemrun and in transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs servers, clients and child processes beside each other on 2 cores: OpenMP threads sleep between
# kernels here (and in every child, which inherits it) rather than spin (gemrun chooses by the load it sees at
# import; tests/test_threads.py checks that choice). Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _torchvision_ops() -> None:
    """PyPI torchvision (a test dependency: the Gemma 4 reference processors need it) is a CUDA build whose C ops
    do not load beside the CPU torch; its import, and so transformers', fails unless the op schemas it registers
    fakes for exist. Only its pure-torch transforms are used."""
    try:
        torch.ops.torchvision.nms  # noqa: B018 (already defined: a real build, or defined earlier)
    except (AttributeError, RuntimeError):
        global _TORCHVISION_LIB
        _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
        _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


_torchvision_ops()


# The derived GGUF tokenizers and the compiled C kernels are kept across test runs (deriving the 262k-token
# vocabulary's merges and compiling the kernels take seconds each), in the checkout's ignored .cache/, not in the
# user's home. Set before anything in gemrun reads it.
os.environ.setdefault("GEMRUN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "gemrun"))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from gemrun.weights.embedded import default_model_path

    return default_model_path()


# Models are module-scoped: a float32 270M (and the reference's) is 1 GB each, and held for the whole session
# they stacked under every later module's own models (the suite's peak RSS).
@pytest.fixture(scope="module")
def model_270m(gguf_path):
    import gemrun

    return gemrun.load(gguf_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_270m(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer_270m(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
