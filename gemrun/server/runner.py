"""What every route shares: sampling fields -> SamplingParams, messages -> a prompt, one request of `n` choices
through the engine -> a stream of events (text with its tokens, tool calls, the end). Routes only translate
these events into their API's shapes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import GemrunError, InputError
from ..generate import Prompt, Stats, TextStream, Token, stop_ids_for
from ..sampling import SamplingParams
from ..tools import Gemma4OutputParser, ToolStreamParser, apply_tools, native_tools

MAX_N = 8
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024


class NotFound(GemrunError):
    """An unknown model name (HTTP 404)."""


class ServerError(GemrunError):
    """A request failed inside the engine (HTTP 500, or an error event mid-stream)."""


@dataclass
class Event:
    """One piece of one choice: answer text or reasoning (Gemma 4's thought channel), with the tokens that
    produced it, a parsed tool call, or the end."""

    index: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    tool_call: dict | None = None
    finish_reason: str | None = None  # set on the last event of a choice
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens, on the last event
    reasoning: str = ""
    stats: Stats | None = None  # on the last event: the engine's stats (speculative acceptance included)


EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


def thinking(reasoning_effort: Any = None, template_kwargs: Any = None) -> bool | None:
    """Thinking on/off from OpenAI's `reasoning_effort` ("none"/"minimal" off, "low".."high" on) and vLLM's
    `chat_template_kwargs.enable_thinking` (which wins when both are given); None: the template's default."""
    think = None
    if reasoning_effort is not None:
        if reasoning_effort not in EFFORTS:
            raise InputError(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {reasoning_effort!r}")
        think = EFFORTS[reasoning_effort]
    if template_kwargs is not None:
        if not isinstance(template_kwargs, dict):
            raise InputError("chat_template_kwargs must be an object")
        if template_kwargs.get("enable_thinking") is not None:
            if not isinstance(template_kwargs["enable_thinking"], bool):
                raise InputError("chat_template_kwargs.enable_thinking must be true or false")
            think = template_kwargs["enable_thinking"]
    return think


def image_budget(fields: dict) -> int | None:
    """Soft tokens per image (Gemma 4) from vLLM's `mm_processor_kwargs.max_soft_tokens` or `image_tokens`."""
    mm = fields.get("mm_processor_kwargs")
    if mm is not None and not isinstance(mm, dict):
        raise InputError("mm_processor_kwargs must be an object")
    value = (mm or {}).get("max_soft_tokens", fields.get("image_tokens"))
    if value is None:
        return None
    from ..processing.gemma4 import SOFT_TOKEN_BUDGETS

    if isinstance(value, bool) or value not in SOFT_TOKEN_BUDGETS:
        raise InputError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {value!r}")
    return value


def _number(fields: dict, name: str, kind: type) -> Any:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise InputError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def sampling_params(fields: dict, max_tokens: int, vocab_size: int, defaults: SamplingParams) -> SamplingParams:
    """OpenAI/Ollama sampling fields -> SamplingParams. Unset fields take the model's generation defaults
    (Gemma: temperature 1, top-k 64, top-p 0.95), as Ollama and vLLM do."""
    kw: dict[str, Any] = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (v := _number(fields, name, float)) is not None:
            kw[name] = float(v)
    for name in ("top_k", "seed"):
        if (v := _number(fields, name, int)) is not None:
            kw[name] = v
    if "top_k" in kw and kw["top_k"] < 0:  # vLLM spells "off" -1
        kw["top_k"] = 0 if kw["top_k"] == -1 else kw["top_k"]
    if fields.get("ignore_eos") is not None:
        if not isinstance(fields["ignore_eos"], bool):
            raise InputError("ignore_eos must be true or false")
        kw["ignore_eos"] = fields["ignore_eos"]
    stop = fields.get("stop")
    if stop is not None:
        kw["stop"] = [stop] if isinstance(stop, str) else list(stop)
    bias = fields.get("logit_bias") or {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise InputError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    parsed = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InputError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise InputError(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise InputError(f"logit_bias[{key}] = {value!r} must be a number in [-100, 100]")
        parsed[token] = float(value)
    if parsed:
        kw["logit_bias"] = parsed
    base = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    return SamplingParams(**{**base, **kw})


def image_bytes(source: str) -> bytes:
    """An image given by a client: a `data:` URL, or bare base64 (Ollama). URLs and paths are refused: the server
    never fetches remote content nor reads its own files for a client."""
    from ..processing.image import read_image_bytes

    if source.startswith("data:"):
        return read_image_bytes(source)
    if "://" in source or source.startswith(("/", ".")):
        raise InputError("images must be data: URLs or base64; remote URLs and file paths are not accepted")
    try:
        return base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image is not valid base64") from None


def media_bytes(source: Any, what: str) -> bytes:
    """Audio or video given by a client: a `data:` URL or bare base64, as for images."""
    if not isinstance(source, str):
        raise InputError(f"{what} part needs a data: URL or base64 string")
    if source.startswith("data:"):
        from ..processing.audio import read_media_bytes

        return read_media_bytes(source, what, 256 << 20)
    if "://" in source or source.startswith(("/", ".")):
        raise InputError(f"{what} must be a data: URL or base64; remote URLs and file paths are not accepted")
    try:
        return base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None


def _inline_images(messages: Sequence[dict]) -> list[dict]:
    """Image (and Gemma 4's audio and video) parts -> bytes, so nothing downstream can read a path or a URL.
    OpenAI's `input_audio` parts carry base64 already and pass through."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "image_url", "input_image"):
                    url = part.get("image_url", part.get("image", part.get("url")))
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise InputError(f"{kind} part needs an image_url string")
                    part = {"type": "image", "image": image_bytes(url)}
                elif kind in ("audio", "video", "video_url"):
                    what = "audio" if kind == "audio" else "video"
                    src = part.get(kind, part.get("url"))
                    src = src.get("url") if isinstance(src, dict) else src
                    part = {"type": what, what: media_bytes(src, what)}
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out


class Service:
    """The loaded model and its engine, as the routes see them."""

    def __init__(self, model, engine, name: str, max_tokens_default: int | None = None,
                 request_timeout: float | None = 600.0):
        self.model, self.engine, self.name = model, engine, name
        self.max_tokens_default = max_tokens_default
        self.request_timeout = request_timeout

    def check_model(self, name: str | None) -> None:
        if name not in (self.name, f"{self.name}:latest"):
            raise NotFound(f"model {name!r} does not exist; this server serves {self.name!r}")

    @property
    def vision(self) -> bool:
        media = getattr(self.model, "media", None)
        return self.model.vision is not None or (media is not None and media.embed_vision is not None)

    @property
    def audio(self) -> bool:
        media = getattr(self.model, "media", None)
        return media is not None and media.embed_audio is not None

    def max_tokens(self, asked: int | None, prompt_len: int, field_name: str = "max_tokens") -> int:
        """What a request may generate: its own limit, else the rest of the context."""
        room = self.model.max_context - prompt_len
        if asked is None:
            return max(1, min(room, self.max_tokens_default or room))
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise InputError(f"{field_name} must be an integer >= 1, got {asked!r}")
        return asked

    @property
    def gemma4(self) -> bool:
        return bool(getattr(self.model, "gemma4", False))

    async def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
                          think: bool | None = None, image_tokens: int | None = None) -> Prompt:
        """The prompt of a chat request. Gemma 3: tools written into the messages (`apply_tools`); `think` and
        `image_tokens` do not apply. Gemma 4: the template declares tools and switches thinking itself."""
        if not self.gemma4:
            msgs = apply_tools(_inline_images(messages), tools, tool_choice)
            return await asyncio.to_thread(self.model.chat_prompt, msgs)
        native = native_tools(tools, tool_choice or "auto") if tools else None
        return await asyncio.to_thread(self.model.chat_prompt, _inline_images(messages), think=think, tools=native,
                                       image_tokens=image_tokens)

    def text_prompt(self, text: str | list[int], bos: bool = True) -> Prompt:
        tk = self.model.tokenizer
        if isinstance(text, list):
            if not all(isinstance(i, int) and 0 <= i < tk.vocab_size for i in text):
                raise InputError(f"prompt token ids must be integers in 0..{tk.vocab_size - 1}")
            return Prompt(list(text))
        return Prompt(tk.encode(text, bos=bos and tk.add_bos))

    def run(self, prompt: Prompt, params: SamplingParams, n: int = 1, constraint=None, logprobs: int | None = None,
            tools: list[dict] | None = None, disconnected=None) -> AsyncIterator[Event]:
        """Submit `n` choices now (a full queue raises here, before any response starts) and return their
        events, interleaved as they come. Choice i uses seed + i, so n seeded choices differ from each other and
        each is reproducible. `disconnected` (an async callable) is polled so a client that goes away has its
        sequences cancelled; closing the returned generator cancels them too."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise InputError(f"n must be an integer in 1..{MAX_N}, got {n!r}")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise InputError(f"top_logprobs must be in 0..{MAX_LOGPROBS}, got {logprobs}")
        stop_ids = stop_ids_for(self.model.model, params)  # Gemma 4's config adds <turn|> and <|tool_response>
        requests = []
        try:
            for i in range(n):
                p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)
                matcher = constraint.matcher() if constraint is not None else None
                requests.append(self.engine.submit(prompt, p, stop_ids, matcher, logprobs, self.request_timeout))
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        return self._events(requests, params, stop_ids, tools, prompt, disconnected)

    async def _events(self, requests, params, stop_ids, tools, prompt, disconnected) -> AsyncIterator[Event]:
        n = len(requests)
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._choice(i, r, params, stop_ids, tools, prompt, queue))
                 for i, r in enumerate(requests)]
        watcher = asyncio.create_task(self._watch(disconnected, requests)) if disconnected else None
        try:
            remaining = n
            while remaining:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    remaining -= 1
                yield event
        finally:
            for r in requests:
                r.cancel()
            for t in tasks + ([watcher] if watcher else []):
                t.cancel()

    @staticmethod
    async def _watch(disconnected, requests) -> None:
        while not await disconnected():
            await asyncio.sleep(0.2)
        for r in requests:
            r.cancel()

    async def _choice(self, index: int, req, params: SamplingParams, stop_ids: set[int], tools, prompt: Prompt,
                      queue: asyncio.Queue) -> None:
        n_prompt = len(prompt.ids)
        if self.gemma4:  # control tokens kept: the parser splits thoughts and native tool calls off the answer
            text = TextStream(self.model.tokenizer, params.stop, stop_ids, keep_special=True)
            parser = Gemma4OutputParser(tools, in_thought=prompt.in_thought, parse_tools=bool(tools))
        else:
            text = TextStream(self.model.tokenizer, params.stop, stop_ids)
            parser = ToolStreamParser(tools) if tools else None
        pending: list[Token] = []  # tokens whose text a parser still holds
        generated, called, stats = 0, False, None

        def emit(chunk_text: str, tokens: list[Token], final: bool = False) -> None:
            nonlocal called
            pending.extend(tokens)
            events = parser.push(chunk_text) if parser else [("content", chunk_text)] if chunk_text else []
            if final and parser:
                events += parser.finish()
            for kind, value in events:
                if kind == "tool_call":
                    called = True
                    queue.put_nowait(Event(index, tool_call=value))
                elif kind == "reasoning" and value:
                    queue.put_nowait(Event(index, tokens=pending.copy(), reasoning=value))
                    pending.clear()
                elif value:
                    queue.put_nowait(Event(index, value, pending.copy()))
                    pending.clear()

        try:
            finish = None
            async for event in req:
                if isinstance(event, Token):
                    generated += 1
                    chunk = text.push(event)
                    if chunk is not None:
                        emit(chunk.text, chunk.tokens)
                    if text.stopped:  # a stop string: the rest of the sequence is not needed
                        req.cancel()
                        finish = "stop"
                        break
                    continue
                if event.finish_reason == "error":
                    raise ServerError(event.error or "generation failed")
                stats = event.stats
                finish = {"timeout": "length"}.get(event.finish_reason, event.finish_reason)
            last = text.flush(finish)
            emit(last.text, last.tokens, final=True)
            reason = last.finish_reason or finish
            if called and reason == "stop":
                reason = "tool_calls"
            queue.put_nowait(Event(index, "", pending.copy(), finish_reason=reason, usage=(n_prompt, generated),
                                   stats=stats))
        except Exception as e:  # handed to the consumer, which raises it in the request's context
            queue.put_nowait(e)
