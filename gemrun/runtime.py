"""A checkpoint ready to run, below the Python API: the device and dtype chosen, weights and tokenizer loaded, the
family's chat format, the context limit, prompt assembly and an optional speculative drafter. The Python API
(`api.Model`) and the server (`server.runner.Service`) both stand on a `Runtime`."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import KV_TYPES, Q8_BLOCK, PrefixPool
from .errors import ConfigError
from .formats import ChatFormat, format_for
from .processing.source import Sources
from .prompt import PromptBuilder
from .weights.load import Loaded, Progress, attach_tokenizer, load_checkpoint

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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


def open_checkpoint(path: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                    progress: Progress | None = None, mmproj: str | Path | None = None, pan_and_scan: bool = False,
                    packed: bool | None = None, quantize: str | None = None,
                    draft: str | Path | None = None) -> Loaded:
    """Load a GGUF file or an HF directory (with no path, the embedded Gemma 3 270M) onto a device. On the CPU,
    dtype "auto" means float32 activations over packed low-bit weights where gemrun's native kernels run (near-exact
    and fast), "float32" alone the dense dequantized weights (exact), "bfloat16" packed weights with bf16
    activations. `quantize` ("q4" | "q8") quantizes a float HF checkpoint at load. `mmproj` is the media encoder
    GGUF of a GGUF model, `draft` an MTP drafter (HF directory or GGUF) for speculative decoding."""
    from .weights.embedded import default_model_path

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if packed is None:
        from .quant import native

        packed = dev.type == "cpu" and (dt == torch.bfloat16 or (dtype == "auto" and native.available()))
    if quantize in (None, "none"):
        quantize = None
    elif dtype == "auto":
        dt = torch.bfloat16  # the packed kernels take bfloat16 activations
    loaded = load_checkpoint(path or default_model_path(), dt, dev, progress, mmproj, packed, quantize)
    if draft is not None:
        from .weights.load import load_drafter

        loaded.drafter = load_drafter(draft, loaded.model.dtype, dev, loaded.config, loaded.packed or packed)
    return attach_tokenizer(loaded, pan_and_scan)


def check_kv_type(kv_type: str, specs) -> str:
    """A KV cache type the model's layers can store (q8_0 blocks need head sizes in multiples of 32)."""
    if kv_type not in KV_TYPES:
        raise ConfigError(f"KV cache type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    if kv_type == "q8_0" and any(s.head_dim % Q8_BLOCK for s in specs):
        raise ConfigError(f"q8_0 KV cache needs head sizes that are multiples of {Q8_BLOCK}; this model's are "
                          f"{sorted({s.head_dim for s in specs})}")
    return kv_type


class Runtime:
    """A loaded checkpoint with its tokenizer and chat format, a context limit (default: the model's), and the
    directory its local media paths must lie in (None: anywhere), and the KV caches' precision (`kv_cache`, one of
    `cache.KV_TYPES`: "auto" is the activations' dtype)."""

    def __init__(self, loaded: Loaded, tokenizer=None, max_context: int | None = None,
                 image_dir: Path | None = None, cache_ram: float = 1.0, cache_entries: int | None = 1,
                 kv_cache: str = "auto"):
        self.loaded, self.model, self.config = loaded, loaded.model, loaded.config
        self.model.kv_type = check_kv_type(kv_cache, self.model.specs)
        self.tokenizer = tokenizer or loaded.tokenizer
        self.vision, self.media, self.inputs = loaded.vision, loaded.media, loaded.inputs
        limit = self.config.max_position_embeddings
        if max_context is not None and not 1 < max_context <= limit:
            raise ConfigError(f"max_context {max_context} must be between 2 and the model's {limit}")
        self.max_context = max_context or limit
        self.format: ChatFormat = format_for(self.tokenizer)
        self.template = self.format.template
        self.image_dir = image_dir
        self.draft = None  # a speculative.Speculator, set by `use_drafter`
        # finished sequences' KV caches for prompts that share a prefix (a conversation's next turn): the Python
        # API and the REPL keep their last conversation; a server keeps many (`serve --cache-ram`)
        self.pool = PrefixPool(int(cache_ram * (1 << 30)), cache_entries)
        if loaded.drafter is not None:
            from .speculative import Speculator

            self.draft = Speculator(loaded.drafter)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prompts(self, sources: Sources | None = None) -> PromptBuilder:
        """Prompt assembly; local media paths allowed (inside `image_dir`) unless `sources` says otherwise."""
        return PromptBuilder(self.model, self.format, self.inputs, sources or Sources(root=self.image_dir),
                             self.max_context)

    def use_drafter(self, path: str | Path, tokens: int = 4) -> None:
        """Speculative decoding with an MTP assistant checkpoint (Gemma 4; HF directory or GGUF) drafting `tokens`
        per round."""
        from .speculative import Speculator
        from .weights.load import load_drafter

        drafter = load_drafter(path, self.model.dtype, self.device, self.config, self.loaded.packed)
        self.draft = Speculator(drafter, tokens)
