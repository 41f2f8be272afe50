"""The Python API: `load()` a checkpoint (the embedded Gemma 3 270M by default) and generate, chat, score."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tokenizer as tok
from .chat import ChatTemplate, render_prompt, template_for
from .config import Gemma4TextConfig
from .errors import ConfigError, GemrunError, InputError
from .generate import Prompt, Stats, prefill, stream
from .model import gemma4
from .model.multimodal import IMAGE_TOKEN, expand_images, image_blocks, prompt_embeddings
from .processing.image import ImageConfig, load_image, preprocess
from .sampling import SamplingParams
from .weights.embedded import default_model_path
from .weights.load import Loaded, Progress, load_checkpoint


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


MAX_IMAGES = 32  # images in one prompt
IMAGE_CACHE = 16  # encoded images kept (a conversation re-sends its images every turn)


class Model:
    """A loaded model with its tokenizer. Generation methods take SamplingParams or its fields as keywords."""

    def __init__(self, loaded: Loaded, tokenizer: tok.Tokenizer, max_context: int | None = None,
                 image_config: ImageConfig | None = None, image_dir: Path | None = None):
        self.loaded, self.model, self.config, self.tokenizer = loaded, loaded.model, loaded.config, tokenizer
        self.vision = loaded.vision
        self.image_config = image_config or ImageConfig()
        if self.vision is not None:  # the processor's size follows the tower (896 for the real models)
            self.image_config = dataclasses.replace(self.image_config, size=self.vision.config.image_size)
        self.image_dir = image_dir  # when set, image paths must lie inside it
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        if self.vision is not None:
            image_id = tokenizer.token_to_id(IMAGE_TOKEN)
            if image_id != self.vision.config.image_token_id:
                raise ConfigError(f"tokenizer id of {IMAGE_TOKEN} is {image_id}, the model expects "
                                  f"{self.vision.config.image_token_id}")
        limit = self.config.max_position_embeddings
        if max_context is not None and not 1 < max_context <= limit:
            raise ConfigError(f"max_context {max_context} must be between 2 and the model's {limit}")
        self.max_context = max_context or limit
        self.gemma4 = isinstance(self.config, Gemma4TextConfig)
        self.media = loaded.media
        self.template = template_for(tokenizer) if self.gemma4 else ChatTemplate(tokenizer.chat_template)
        self.draft = None  # a speculative.Speculator (Gemma 4 MTP drafter), set by `use_drafter`
        self.last_stats = Stats()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _params(self, params: SamplingParams | None, kw: dict[str, Any]) -> SamplingParams:
        if params is not None and kw:
            raise TypeError("pass either params or sampling keywords, not both")
        return params or SamplingParams(**kw)

    def _run(self, prompt: Prompt | list[int], params: SamplingParams, streaming: bool) -> str | Iterator[str]:
        chunks = (c.text for c in self._stream(prompt, params))
        return chunks if streaming else "".join(chunks)

    def _stream(self, prompt: Prompt | list[int], params: SamplingParams, keep_special: bool = False):
        self.last_stats = Stats()
        return stream(self.model, self.tokenizer, prompt, params, self.max_context, self.last_stats,
                      draft=self.draft, keep_special=keep_special)

    def use_drafter(self, path: str | Path, tokens: int = 4) -> None:
        """Speculative decoding with a Gemma 4 MTP assistant checkpoint drafting `tokens` per round."""
        from .speculative import Speculator
        from .weights.load import load_drafter

        if not self.gemma4:
            raise ConfigError("a drafter goes with a Gemma 4 model")
        drafter = load_drafter(path, self.model.dtype, self.device)
        if drafter.pre_projection.in_features != 2 * self.config.hidden_size:
            raise ConfigError(f"the drafter was made for a {drafter.pre_projection.in_features // 2}-wide model, "
                              f"this one is {self.config.hidden_size}")
        self.draft = Speculator(drafter, tokens)

    def chat_events(self, messages: Sequence[dict], params: SamplingParams | None = None, think: bool | None = None,
                    tools: list[dict] | None = None, **kw: Any) -> Iterator[tuple[str, Any]]:
        """Gemma 4: ("reasoning", text), ("content", text) and ("tool_call", {id, type, function}) events as
        they are generated; the thought channel never reaches content. Gemma 3: content events only."""

        params = self._params(params, kw)
        prompt = self.chat_prompt(messages, think=think, tools=tools)
        yield from self.events(prompt, params, tools)

    def events(self, prompt: Prompt, params: SamplingParams, tools: list[dict] | None = None
               ) -> Iterator[tuple[str, Any]]:
        """The events of `chat_events` for a prompt made by `chat_prompt`."""
        from .tools import Gemma4OutputParser

        if not self.gemma4:
            yield from (("content", c.text) for c in self._stream(prompt, params) if c.text)
            return
        parser = Gemma4OutputParser(tools, in_thought=prompt.in_thought, parse_tools=bool(tools))
        for c in self._stream(prompt, params, keep_special=True):
            yield from parser.push(c.text)
        yield from parser.finish()

    def chat_message(self, messages: Sequence[dict], params: SamplingParams | None = None,
                     think: bool | None = None, tools: list[dict] | None = None, **kw: Any) -> dict:
        """The whole reply as an OpenAI-style message: content, reasoning_content (Gemma 4 thinking) and
        tool_calls."""
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
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        return self._run(ids, self._params(params, kw), stream)

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, stream: bool = False,
             pan_and_scan: bool | None = None, **kw: Any) -> str | Iterator[str]:
        """Answer OpenAI-style messages ({"role": ..., "content": str or parts}) through the chat template.
        Image parts ({"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "image", "image": path,
        bytes or PIL image}) need a model with a vision encoder."""
        params = self._params(params, kw)
        if self.gemma4:  # the answer only; chat_message / chat_events also give the thoughts and tool calls
            pieces = (v for k, v in self.chat_events(messages, params) if k == "content")
            return pieces if stream else "".join(pieces)
        return self._run(self.chat_prompt(messages, pan_and_scan=pan_and_scan), params, stream)

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    pan_and_scan: bool | None = None, think: bool | None = None, tools: list[dict] | None = None,
                    image_tokens: int | None = None) -> Prompt:
        """Messages -> prompt ids, with image soft tokens and blocks when the messages carry images. Gemma 4:
        also audio and video, `think` switches the thought channel on/off, `tools` are declared natively and
        `image_tokens` is the soft-token budget of each image (70, 140, 280 (default), 560 or 1120)."""
        if self.gemma4:
            return self._gemma4_prompt(messages, add_generation_prompt, think, tools, image_tokens)
        images: list | None = [] if self.vision is not None else None
        rendered = render_prompt(self.tokenizer, messages, add_generation_prompt, self.template, images)
        if not images:
            return Prompt(self.tokenizer.encode_template(rendered))
        if len(images) > MAX_IMAGES:
            raise InputError(f"{len(images)} images in one prompt; at most {MAX_IMAGES}")
        pixels = [preprocess(load_image(src, self.image_dir), self.image_config, pan_and_scan) for src in images]
        cfg = self.vision.config
        text = expand_images(rendered, [p.shape[0] - 1 for p in pixels], cfg.mm_tokens_per_image)
        ids = self.tokenizer.encode_template(text)
        soft = torch.cat([self.encode_image(p) for p in pixels]).flatten(0, 1)  # (images x 256, E)
        ids_t = torch.tensor(ids, device=self.device)
        embeds = prompt_embeddings(self.model, ids_t, cfg.image_token_id, soft)
        return Prompt(ids, embeds, image_blocks(ids_t, cfg.image_token_id))

    @torch.inference_mode()
    def _gemma4_prompt(self, messages, add_generation_prompt, think, tools, image_tokens) -> Prompt:
        from .processing.audio import input_audio_bytes, process_audio
        from .processing.gemma4 import expand_prompt, process_image, process_video
        from .thinking import opens_in_thought

        media = self.media
        has_vision = media is not None and media.embed_vision is not None
        has_audio = media is not None and media.embed_audio is not None
        images, audio, videos = ([] if has_vision else None), ([] if has_audio else None), ([] if has_vision else None)
        extra: dict[str, Any] = {}
        if think is not None:
            extra["enable_thinking"] = bool(think)
        if tools:
            extra["tools"] = tools
        rendered = render_prompt(self.tokenizer, messages, add_generation_prompt, self.template, images, audio,
                                 videos, **extra)
        if len(images or ()) + len(videos or ()) > MAX_IMAGES:
            raise InputError(f"more than {MAX_IMAGES} images and videos in one prompt")
        budget = image_tokens or 280
        pics = [process_image(src, budget, self.image_dir) for src in images or ()]
        clips = [process_audio(input_audio_bytes(str(src.get("data") or ""), str(src.get("format") or ""))
                               if isinstance(src, dict) else src,
                               allowed_dir=self.image_dir) for src in audio or ()]  # dict: OpenAI input_audio
        vids = [process_video(src, audio=False, allowed_dir=self.image_dir) for src in videos or ()]
        ids = self.tokenizer.encode_template(expand_prompt(rendered, pics, clips, vids) if pics or clips or vids
                                             else rendered)
        in_thought = opens_in_thought(rendered)
        if not (pics or clips or vids):
            return Prompt(ids, in_thought=in_thought)
        cfg = media.config
        soft = {}
        if pics:
            soft[cfg.image_token_id] = torch.cat([media.image(p.pixel_values.to(self.device),
                                                              p.positions.to(self.device)) for p in pics])
        if vids:
            soft[cfg.video_token_id] = torch.cat([media.image(v.pixel_values.flatten(0, 1).to(self.device),
                                                              v.positions.flatten(0, 1).to(self.device))
                                                  for v in vids])
        if clips:
            soft[cfg.audio_token_id] = torch.cat([media.audio(c.features[c.mask].to(self.device)) for c in clips])
        ids_t = torch.tensor(ids, device=self.device)
        try:
            embeds = gemma4.prompt_embeddings(self.model, ids_t, soft)
        except ValueError as e:
            raise InputError(str(e)) from None
        blocks = gemma4.vision_blocks(ids_t, (cfg.image_token_id, cfg.video_token_id))
        return Prompt(ids, embeds, blocks, in_thought=in_thought)

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray) -> torch.Tensor:
        """Soft tokens (crops, 256, E) of preprocessed pixels; an image seen again is not encoded again."""
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        if key in self._image_cache:
            self._image_cache.move_to_end(key)
            return self._image_cache[key]
        w = self.vision.multi_modal_projector.mm_input_projection_weight
        soft = self.vision(torch.from_numpy(pixels).to(device=w.device, dtype=w.dtype))
        self._image_cache[key] = soft
        if len(self._image_cache) > IMAGE_CACHE:
            self._image_cache.popitem(last=False)
        return soft

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
         pan_and_scan: bool = False, packed: bool | None = None, quantize: str | None = None) -> Model:
    """Load a GGUF file or an HF directory (safetensors); with no path, the embedded Gemma 3 270M. A GGUF's
    vision encoder comes from a separate llama.cpp-style `mmproj` GGUF. Pan & Scan is off by default, as in
    the reference preprocessor. `packed` keeps a GGUF's quantized matrices low-bit for the CPU kernels.
    `quantize` ("q4" | "q8") quantizes a float HF checkpoint at load, tensor by tensor. On the CPU, dtype "auto"
    means float32 activations over packed weights where gemrun's native kernels run (near-exact and fast),
    "float32" alone the dense dequantized weights (exact), "bfloat16" packed weights with bf16 activations."""
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
    if loaded.format == "gguf":
        tokenizer = tok.from_gguf_metadata(loaded.gguf.metadata, image_token=loaded.vision is not None)
        if loaded.vision is not None:  # an mmproj file names no token ids: they are the tokenizer's
            ids = {f: tokenizer.token_to_id(t) for f, t in (("boi_token_id", "<start_of_image>"),
                                                              ("eoi_token_id", "<end_of_image>"),
                                                              ("image_token_id", IMAGE_TOKEN))}
            if None in ids.values():
                raise ConfigError("the GGUF tokenizer lacks Gemma 3's image tokens; it cannot go with an mmproj")
            loaded.vision.config = dataclasses.replace(loaded.vision.config, **ids)
    else:
        tokenizer = tok.from_directory(loaded.path)
    return Model(loaded, tokenizer, max_context, ImageConfig(pan_and_scan=pan_and_scan))
