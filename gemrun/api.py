"""The Python API: `load()` a checkpoint (the embedded Gemma 3 270M by default) and generate, chat, score."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, GemrunError
from .generate import Prompt, Stats, prefill, stream
from .quant.native import release_openmp_workers, set_prefill
from .runtime import Runtime, check_kv_type, open_checkpoint
from .sampling import SamplingParams
from .weights.embedded import default_model_path
from .weights.load import Progress

__all__ = ["Model", "load", "default_model_path"]


class Model(Runtime):
    """A loaded model with its tokenizer. Generation methods take SamplingParams or its fields as keywords."""

    def __init__(self, loaded, tokenizer=None, max_context: int | None = None, image_dir: Path | None = None,
                 kv_cache: str = "auto"):
        super().__init__(loaded, tokenizer, max_context, image_dir, kv_cache=kv_cache)
        self.last_stats = Stats()

    def _params(self, params: SamplingParams | None, kw: dict[str, Any]) -> SamplingParams:
        if params is not None and kw:
            raise TypeError("pass either params or sampling keywords, not both")
        return params or SamplingParams(**kw)

    def _stream(self, prompt: Prompt | list[int], params: SamplingParams, keep_special: bool = False):
        self.last_stats = Stats()
        return stream(self.model, self.tokenizer, prompt, params, self.max_context, self.last_stats,
                      draft=self.draft, keep_special=keep_special, pool=self.pool)

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    pan_and_scan: bool | None = None, think: bool | None = None, tools: list[dict] | None = None,
                    image_tokens: int | None = None) -> Prompt:
        """Messages -> prompt ids, with media soft tokens and blocks when the messages carry images (audio, video:
        Gemma 4). `think` switches thinking on/off where the format has it, `tools` are declared to the model,
        `image_tokens` is the soft-token budget of each image where the model takes one (Gemma 4: 70, 140, 280
        (default), 560 or 1120), `pan_and_scan` adds crops of large images (Gemma 3)."""
        return self.prompts().chat(messages, add_generation_prompt, tools=tools, think=think,
                                   image_tokens=image_tokens, pan_and_scan=pan_and_scan)

    def events(self, prompt: Prompt, params: SamplingParams, tools: list[dict] | None = None
               ) -> Iterator[tuple[str, Any]]:
        """("reasoning", text), ("content", text) and ("tool_call", {id, type, function}) events of the reply to
        a prompt made by `chat_prompt`, as they are generated; thoughts never reach content."""
        parser = self.format.reply_parser(tools, prompt.in_thought)
        for c in self._stream(prompt, params, keep_special=self.format.keep_special):
            yield from parser.push(c.text)
        yield from parser.finish()

    def chat_events(self, messages: Sequence[dict], params: SamplingParams | None = None, think: bool | None = None,
                    tools: list[dict] | None = None, pan_and_scan: bool | None = None, **kw: Any
                    ) -> Iterator[tuple[str, Any]]:
        """The events of `events` for a conversation."""
        params = self._params(params, kw)
        yield from self.events(self.chat_prompt(messages, think=think, tools=tools, pan_and_scan=pan_and_scan),
                               params, tools)

    def chat_message(self, messages: Sequence[dict], params: SamplingParams | None = None,
                     think: bool | None = None, tools: list[dict] | None = None, **kw: Any) -> dict:
        """The whole reply as an OpenAI-style message: content, reasoning_content (thinking) and tool_calls."""
        out: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}
        for kind, value in self.chat_events(messages, params, think, tools, **kw):
            if kind == "tool_call":
                out["tool_calls"].append(value)
            else:
                out["content" if kind == "content" else "reasoning_content"] += value
        return out

    def generate(self, prompt: str, params: SamplingParams | None = None, stream: bool = False,
                 **kw: Any) -> str | Iterator[str]:
        """Continue raw text (BOS added as the tokenizer asks). Returns the continuation, or an iterator of
        text pieces with stream=True."""
        chunks = (c.text for c in self._stream(self.prompts().text(prompt), self._params(params, kw)))
        return chunks if stream else "".join(chunks)

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, stream: bool = False,
             pan_and_scan: bool | None = None, **kw: Any) -> str | Iterator[str]:
        """Answer OpenAI-style messages ({"role": ..., "content": str or parts}) through the chat template: the
        answer only (`chat_message` / `chat_events` also give thoughts and tool calls). Image parts
        ({"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "image", "image": path, bytes or PIL
        image}) need a model that reads images."""
        pieces = (v for k, v in self.chat_events(messages, self._params(params, kw), pan_and_scan=pan_and_scan)
                  if k == "content")
        return pieces if stream else "".join(pieces)

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
         max_context: int | None = None, progress: Progress | None = None, mmproj: str | Path | None = None,
         pan_and_scan: bool = False, packed: bool | None = None, quantize: str | None = None,
         draft: str | Path | None = None, draft_tokens: int = 4, kv_cache: str = "auto",
         tp: int | None = None, prefill: str | None = None) -> Model:
    """Load a GGUF file or an HF directory (safetensors); with no path, the embedded Gemma 3 270M. A GGUF's
    vision encoder comes from a separate llama.cpp-style `mmproj` GGUF. Pan & Scan is off by default, as in
    the reference preprocessor. `packed` keeps a GGUF's quantized matrices low-bit for the CPU kernels.
    `quantize` ("q4" | "q8") quantizes a float HF checkpoint at load, tensor by tensor. On the CPU, dtype "auto"
    means float32 activations over packed weights where gemrun's native kernels run (near-exact and fast),
    "float32" alone the dense dequantized weights (exact), "bfloat16" packed weights with bf16 activations.
    `draft` is a Gemma 4 MTP drafter (HF directory or GGUF): speculative decoding with `draft_tokens` per round.
    `kv_cache` is the KV caches' precision: "auto" (the activations' dtype), "f32", "bf16" or "q8_0" (int8 blocks
    with a scale per 32 values, as llama.cpp's `-ctk/-ctv q8_0`: about half of bf16's memory). `tp` > 1 splits the
    model over that many processes (tensor parallelism, `gemrun.distributed`): this one leads, the others are
    spawned, or were started by torchrun (whose other ranks follow inside this call). `prefill` chooses the
    packed weights' kernel for long prompts, for the whole process: "auto" (one int8 level per activation block for
    Q4_0 / Q8_0 / Q5_0, as llama.cpp; bf16 tiles for the other formats), "exact" (the decode kernel: ~14-bit
    activations, every row's result the same in any batch), "bf16" or "int8" (`quant.native.PREFILLS`)."""
    from .distributed import open_parallel, wanted

    check_kv_type(kv_cache, ())  # a bad name fails before the weights are read
    if prefill is not None:
        try:
            set_prefill(prefill)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if wanted(tp):
        if draft is not None or kv_cache != "auto":
            raise ConfigError("a drafter and --kv-cache other than auto do not run with tensor parallelism yet")
        loaded = open_parallel(tp, path, device, dtype, progress, mmproj, pan_and_scan, packed, quantize)
    else:
        loaded = open_checkpoint(path, device, dtype, progress, mmproj, pan_and_scan, packed, quantize, draft)
    model = Model(loaded, loaded.tokenizer, max_context, kv_cache=kv_cache)
    if model.draft is not None:
        model.draft.k = model.draft.check_tokens(draft_tokens)
    release_openmp_workers()  # loading ran parallel work here; generating may happen in another thread
    return model
