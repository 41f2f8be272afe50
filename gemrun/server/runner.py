"""What every route shares: the served model (`Service`: its runtime, client prompt assembly, engine and name),
one request of `n` choices through the engine -> a stream of events (text with its tokens, reasoning, tool calls,
the end). Routes only translate these events into their API's shapes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine, Unavailable
from ..errors import GemrunError, InputError
from ..formats.messages import forced
from ..generate import Prompt, Stats, TextStream, Token, stop_ids_for
from ..processing.source import CLIENT
from ..quant.native import release_openmp_workers
from ..runtime import Runtime
from ..sampling import SamplingParams

MAX_N = 8
MAX_LOGPROBS = 20
PROMPT_WORKERS = 2  # prompts assembled at once (tokenizing, rendering, decoding media), each off the event loop


class NotFound(GemrunError):
    """An unknown model name (HTTP 404)."""


class ServerError(GemrunError):
    """A request failed inside the engine (HTTP 500, or an error event mid-stream)."""


@dataclass
class Event:
    """One piece of one choice: answer text or reasoning (a thinking model's thought channel), with the tokens
    that produced it, a parsed tool call, or the end."""

    index: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    tool_call: dict | None = None
    finish_reason: str | None = None  # set on the last event: stop, length, tool_calls, timeout or shutdown
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens, on the last event
    reasoning: str = ""
    stats: Stats | None = None  # on the last event: the engine's stats (speculative acceptance included)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("gemrun")
    except PackageNotFoundError:
        return "0.0.0"


def ready(app) -> Service:
    """The service, or 503 while loading / after shutdown began."""
    service = app.state.service
    if service is None or app.state.status != "ok":
        raise Unavailable(f"the model is not ready ({app.state.status})")
    return service


class Service:
    """The served model as the routes see it: its runtime, prompt assembly that never reads local files for a
    client, the engine, and the name clients use."""

    def __init__(self, runtime: Runtime, engine: Engine, name: str, max_tokens_default: int | None = None,
                 request_timeout: float | None = 600.0):
        self.runtime, self.engine, self.name = runtime, engine, name
        self.format, self.tokenizer = runtime.format, runtime.tokenizer
        self.prompts = runtime.prompts(CLIENT)
        self.max_tokens_default = max_tokens_default
        self.request_timeout = request_timeout
        self.prompt_slots = asyncio.Semaphore(PROMPT_WORKERS)

    def check_model(self, name: str | None) -> None:
        if name not in (self.name, f"{self.name}:latest"):
            raise NotFound(f"model {name!r} does not exist; this server serves {self.name!r}")

    def reads(self, kind: str) -> bool:
        """Whether the model reads media of `kind` ("image" | "audio" | "video")."""
        return kind in self.prompts.media_kinds

    def max_tokens(self, asked: int | None, prompt_len: int, field_name: str = "max_tokens") -> int:
        """What a request may generate: its own limit (generation still ends where the context does), else the
        server's default, at most the rest of the context. A limit larger than the whole context is refused."""
        context = self.runtime.max_context
        room = context - prompt_len
        if asked is None:
            return max(1, min(room, self.max_tokens_default or room))
        if asked < 1:
            raise InputError(f"{field_name} must be an integer >= 1, got {asked!r}")
        if asked > context:
            raise InputError(f"{field_name} = {asked} is more than the model's context of {context} tokens")
        return asked

    def check_thinking(self, think: bool | None) -> None:
        if think and not self.format.thinking:
            raise InputError(f"{self.name!r} does not support thinking")

    async def _off_loop(self, fn, *args, **kw):
        """Run prompt work in a worker thread, at most PROMPT_WORKERS at a time: the event loop (and /health)
        stays responsive whatever a request holds."""
        def work():
            try:
                return fn(*args, **kw)
            finally:  # an image's encoder ran parallel regions in this long-lived pool thread: the engine's alone
                release_openmp_workers()

        async with self.prompt_slots:
            return await asyncio.to_thread(work)

    async def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
                          think: bool | None = None, image_tokens: int | None = None) -> Prompt:
        """The prompt of a chat request: rendered, tokenized, its media decoded and embedded."""
        return await self._off_loop(self.prompts.chat, messages, tools=tools, tool_choice=tool_choice, think=think,
                                    image_tokens=image_tokens)

    async def text_prompt(self, text: str | list[int], bos: bool = True) -> Prompt:
        return await self._off_loop(self.prompts.text, text, bos)

    def constraint(self, prompt: Prompt, response_format: dict | None = None, tools: list | None = None,
                   choice: Any = None, ollama_format: Any = None):
        """The grammar a request decodes under: its response format (OpenAI or Ollama), or a forced tool call in
        the format's own syntax (which may open from inside the prompt's reasoning channel)."""
        rf = response_format if response_format and response_format.get("type") != "text" else None
        call = forced(tools, choice)
        if call and (rf or ollama_format not in (None, "")):
            raise InputError("response_format cannot be combined with a forced tool_choice")
        if not (call or rf or ollama_format not in (None, "")):
            return None
        from .. import grammar  # xgrammar (and the transformers it imports): 0.6 s and ~37 MB, for constraints only

        args, stops = (self.tokenizer, self.runtime.config), self.format.stop_ids
        if call:
            return grammar.compile_constraint(*args, ebnf=self.format.tool_grammar(tools, choice, prompt.in_thought),
                                              stop_ids=stops, allowed=self.format.call_tokens)
        if rf:
            return grammar.from_response_format(*args, rf, stop_ids=stops)
        return grammar.from_ollama_format(*args, ollama_format, stop_ids=stops)

    def run(self, prompt: Prompt, params: SamplingParams, n: int = 1, constraint=None, logprobs: int | None = None,
            tools: list[dict] | None = None, disconnected=None) -> AsyncIterator[Event]:
        """Submit `n` choices now (a full queue raises here, before any response starts) and return their
        events, interleaved as they come. Choice i uses seed + i, so n seeded choices differ from each other and
        each is reproducible. `disconnected` (an async callable) is polled so a client that goes away has its
        sequences cancelled; closing the returned generator cancels them too."""
        if not 1 <= n <= MAX_N:
            raise InputError(f"n must be an integer in 1..{MAX_N}, got {n!r}")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise InputError(f"top_logprobs must be in 0..{MAX_LOGPROBS}, got {logprobs}")
        stop_ids = stop_ids_for(self.runtime.model, params)
        requests, group = [], object()
        try:
            for i in range(n):
                seed = None if params.seed is None else (params.seed + i) % 2**64  # stays in the generator's range
                p = params if i == 0 else dataclasses.replace(params, seed=seed)
                matcher = constraint.matcher() if constraint is not None else None
                requests.append(self.engine.submit(prompt, p, stop_ids, matcher, logprobs, self.request_timeout,
                                                   group if n > 1 else None))
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        return self._events(requests, params, stop_ids, tools, prompt, disconnected)

    async def _events(self, requests, params, stop_ids, tools, prompt, disconnected) -> AsyncIterator[Event]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._choice(i, r, params, stop_ids, tools, prompt, queue))
                 for i, r in enumerate(requests)]
        watcher = asyncio.create_task(self._watch(disconnected, requests)) if disconnected else None
        try:
            remaining = len(requests)
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
        text = TextStream(self.tokenizer, params.stop, stop_ids, keep_special=self.format.keep_special)
        parser = self.format.reply_parser(tools, prompt.in_thought)
        pending: list[Token] = []  # tokens whose text the parser still holds
        generated, called, stats = 0, False, None

        def emit(chunk_text: str, tokens: list[Token], final: bool = False) -> None:
            nonlocal called
            pending.extend(tokens)
            events = parser.push(chunk_text) + (parser.finish() if final else [])
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
                if event.finish_reason == "error":  # 503 when the engine itself is gone (its model was lost)
                    raise (ServerError if self.engine.alive else Unavailable)(event.error or "generation failed")
                stats = event.stats
                finish = event.finish_reason  # "timeout" and "shutdown" too: the client is told why it ended
            last = text.flush(finish)
            emit(last.text, last.tokens, final=True)
            reason = last.finish_reason or finish
            if called and reason == "stop":
                reason = "tool_calls"
            queue.put_nowait(Event(index, "", pending.copy(), finish_reason=reason, usage=(len(prompt.ids),
                                                                                           generated), stats=stats))
        except Exception as e:  # handed to the consumer, which raises it in the request's context
            queue.put_nowait(e)

