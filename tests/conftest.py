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


@pytest.fixture(autouse=True, scope="module")
def _hand_memory_back():
    """After each module: its models are unreferenced, so collect them and hand glibc's freed heap back to the
    OS (freed blocks of up to 32 MB stay in the heap otherwise, and each module's would stack under the next's:
    the suite's peak RSS)."""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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


HF_270M_FROM_GGUF = """
import json, sys, torch
sys.path.insert(0, sys.argv[3])
import conftest  # noqa: F401 (the torchvision op schemas transformers' import needs)
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
out.mkdir(parents=True)
model.config.save_pretrained(out)  # (save_pretrained refuses a model its GGUF loader made: written piece by piece)
config = json.loads((out / "config.json").read_text())
config.pop("quantization_config", None)  # the weights are float32 now
(out / "config.json").write_text(json.dumps(config, indent=2))
model.generation_config.save_pretrained(out)
state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
save_file(state, str(out / "model.safetensors"))
"""


@pytest.fixture(scope="session")
def hf_270m_dir(gguf_path) -> Path:
    """transformers' own reading of the GGUF (its GGUF loader dequantizes every tensor) as an HF directory of
    float32 safetensors, kept in the checkout's .cache: that loader peaks at ~3 GB of RSS, so it runs once, in a
    child process."""
    import shutil
    import subprocess
    import sys

    stat = gguf_path.stat()
    out = Path(__file__).resolve().parent.parent / ".cache" / f"hf-{gguf_path.stem}-{stat.st_size}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-c", HF_270M_FROM_GGUF, str(gguf_path), str(tmp),
                        str(Path(__file__).parent)], check=True)
        try:
            tmp.replace(out)
        except OSError:  # another run wrote it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="module")
def hf_270m(hf_270m_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_270m_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer_270m(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
