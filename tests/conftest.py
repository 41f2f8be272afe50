"""Shared fixtures: tiny random reference models, the embedded real Gemma 3 270M in gemrun and in transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    # the GGUF tokenizer cache of the session lives in a temporary directory, not the user's home
    os.environ.setdefault("GEMRUN_CACHE", str(tmp_path_factory.mktemp("gemrun-cache")))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from gemrun.api import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model_270m(gguf_path):
    import gemrun

    return gemrun.load(gguf_path, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_270m(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer_270m(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
