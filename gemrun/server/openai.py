"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (/v1/responses: responses.py).
Routes translate requests into a prompt + SamplingParams and the runner's events into OpenAI's shapes."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import Unavailable
from ..errors import InputError
from ..formats import normalize_tool_choice, validate_tools
from ..generate import Stats
from .protocol import ChatCompletionRequest, CompletionRequest
from .runner import Event, Service, ready
from .streaming import event_stream, openai_error_event, sse

router = APIRouter()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _token_logprob(tk, token_id: int, logprob: float) -> dict:
    text = tk.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tk, tokens) -> list[dict]:
    out = []
    for t in tokens:
        entry = _token_logprob(tk, t.id, t.logprob)
        entry["top_logprobs"] = [_token_logprob(tk, i, lp) for i, lp in (t.top or [])]
        out.append(entry)
    return out


def active_tools(tools: list | None, tool_choice) -> tuple[list[dict] | None, str | dict]:
    """(the tools the model is told of, the normalised choice): none when tool_choice is "none"."""
    tools = validate_tools(tools) if tools else None
    if tool_choice not in (None, "none", "auto") and not tools:
        raise InputError("tool_choice needs tools")
    choice = normalize_tool_choice(tool_choice, tools) if tools else "none"
    return (tools if choice != "none" else None), choice


class Usage:
    """Token counts over a request's choices, speculative decoding's acceptance when a drafter ran, and
    llama.cpp's `timings`."""

    def __init__(self, n: int = 1):
        self.prompt, self.completion, self.drafted, self.accepted, self.speculative = 0, 0, 0, 0, False
        self.reasoning = 0  # tokens of the thought channel
        self.cached = 0  # prompt tokens whose KV was reused (prefix cache)
        self.n, self.finished = n, 0  # choices asked for, and ended
        self.lead: Stats | None = None  # the first choice's stats (its prompt's prefill)
        self.decode_seconds = 0.0  # the longest choice's (choices decode together)

    @property
    def complete(self) -> bool:
        return self.finished >= self.n

    def add(self, ev: Event) -> None:
        if ev.reasoning:
            self.reasoning += len(ev.tokens)
        if ev.usage:
            self.prompt, self.completion = ev.usage[0], self.completion + ev.usage[1]
        if ev.finish_reason is not None:
            self.finished += 1
        if ev.stats is not None:
            self.cached = max(self.cached, ev.stats.cached_tokens)
            if ev.index == 0 or self.lead is None:
                self.lead = ev.stats
            self.decode_seconds = max(self.decode_seconds, ev.stats.decode_seconds)
        if ev.stats is not None and ev.stats.drafted_tokens:
            self.speculative = True
            self.drafted += ev.stats.drafted_tokens
            self.accepted += ev.stats.accepted_tokens

    def timings(self) -> dict | None:
        """llama.cpp server's `timings` (top level of a reply, and of a stream's last chunk): the prompt tokens
        reused (cache_n) and prefilled (prompt_n) with the prefill's milliseconds, then the generated tokens
        (predicted_n) with their milliseconds (from the end of the prefill)."""
        if self.lead is None:
            return None
        prompt_n, prompt_ms = self.lead.prompt_tokens - self.lead.cached_tokens, 1000 * self.lead.prefill_seconds
        predicted_ms = 1000 * self.decode_seconds
        return {"cache_n": self.lead.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
                "predicted_n": self.completion, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / self.completion if self.completion else 0.0,
                "predicted_per_second": 1000 * self.completion / predicted_ms if predicted_ms else 0.0}

    def extension(self) -> dict | None:
        """gemrun's figures beyond OpenAI's usage (under usage.gemrun): speculative decoding's acceptance."""
        if not self.speculative:
            return None
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0}

    def chat(self) -> dict:
        out = {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
               "total_tokens": self.prompt + self.completion,
               "prompt_tokens_details": {"cached_tokens": self.cached}}
        if (ext := self.extension()) is not None:
            out["gemrun"] = ext
        return out


def openai_stream(chunks: AsyncIterator[dict], events, head: dict, include_usage: bool,
                  usage: Usage) -> StreamingResponse:
    """SSE of OpenAI chunks (`head` + each chunk's fields), then the usage chunk when asked for, then [DONE].
    `chunks` adds each event to `usage` before yielding its chunk."""

    async def lines():
        timed = False
        async for chunk in chunks:
            if usage.complete and not timed:  # the last choice's end: its chunk carries llama.cpp's timings
                chunk, timed = {**chunk, "timings": usage.timings()}, True
            yield sse({**head, **chunk})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage.chat()})

    return event_stream(lines(), events.aclose, openai_error_event, sse("[DONE]"))


async def collect(events: AsyncIterator[Event], n: int) -> tuple[list[dict], Usage]:
    """Non-streaming: gather each choice's text, reasoning, tokens, tool calls and finish reason."""
    choices = [{"text": "", "reasoning": "", "tokens": [], "calls": [], "finish": None} for _ in range(n)]
    usage = Usage(n)
    async for ev in events:
        c = choices[ev.index]
        c["text"] += ev.text
        c["reasoning"] += ev.reasoning
        c["tokens"] += ev.tokens
        if ev.tool_call:
            c["calls"].append(ev.tool_call)
        if ev.finish_reason == "shutdown":
            raise Unavailable("the server shut down before the reply was complete")
        if ev.finish_reason:
            c["finish"] = ev.finish_reason
        usage.add(ev)
    return choices, usage


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(ready(request.app))]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    s = ready(request.app)
    s.check_model(model_id)
    return _model_card(s)


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _model_card(s: Service) -> dict:
    return {"id": s.name, "object": "model", "created": int(s.runtime.loaded.path.stat().st_mtime),
            "owned_by": "gemrun", "max_model_len": s.runtime.max_context}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = ready(request.app)
    s.check_model(body.model)
    tools, choice = active_tools(body.tools, body.tool_choice)
    if body.top_logprobs and not body.logprobs:
        raise InputError("top_logprobs needs logprobs: true")
    prompt = await s.chat_prompt(body.messages, tools, choice, think=body.think(), image_tokens=body.image_budget)
    constraint = s.constraint(prompt, body.response_format, tools, choice)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = body.sampling(s.max_tokens(asked, len(prompt.ids)), s.tokenizer.vocab_size)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    events = s.run(prompt, params, body.n, constraint, logprobs, tools, request.is_disconnected)
    rid, created, tk = new_id("chatcmpl"), int(time.time()), s.tokenizer
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.name,
            "system_fingerprint": "gemrun"}

    if body.stream:
        usage = Usage(body.n)

        async def chunks():
            calls = [0] * body.n
            for i in range(body.n):
                yield {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
            async for ev in events:
                usage.add(ev)
                delta: dict = {}
                if ev.tool_call:
                    delta["tool_calls"] = [{"index": calls[ev.index], **ev.tool_call}]
                    calls[ev.index] += 1
                elif ev.reasoning:  # vLLM's and OpenRouter's spellings
                    delta["reasoning_content"] = delta["reasoning"] = ev.reasoning
                elif ev.text:
                    delta["content"] = ev.text
                lp = {"content": chat_logprobs(tk, ev.tokens)} if logprobs is not None and ev.tokens else None
                if delta or lp or ev.finish_reason:
                    yield {"choices": [{"index": ev.index, "delta": delta, "logprobs": lp,
                                        "finish_reason": ev.finish_reason}]}

        return openai_stream(chunks(), events, head, _include_usage(body), usage)

    choices, usage = await collect(events, body.n)
    out = []
    for i, c in enumerate(choices):
        message = {"role": "assistant", "content": c["text"] if c["text"] or not c["calls"] else None}
        if c["calls"]:
            message["tool_calls"] = c["calls"]
        if s.format.thinking:  # the thought channel, never in content
            message["reasoning_content"] = message["reasoning"] = c["reasoning"] or None
        lp = {"content": chat_logprobs(tk, c["tokens"])} if logprobs is not None else None
        out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": c["finish"]})
    return {"id": rid, "object": "chat.completion", "created": created, "model": s.name,
            "system_fingerprint": "gemrun", "choices": out, "usage": usage.chat(), "timings": usage.timings()}


def completion_logprobs(tk, tokens, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = tk.decode([t.id])
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({tk.decode([i]): lp for i, lp in (t.top or [])})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = ready(request.app)
    s.check_model(body.model)
    if body.suffix:
        raise InputError("suffix (fill-in-the-middle) is not supported by Gemma 3")
    prompt_in = body.prompt
    if isinstance(prompt_in, list) and prompt_in and all(isinstance(p, str) for p in prompt_in):
        if len(prompt_in) != 1:
            raise InputError("one prompt per request (send a list of prompts as separate requests)")
        prompt_in = prompt_in[0]
    prompt = await s.text_prompt(prompt_in)
    constraint = s.constraint(prompt, body.response_format)
    params = body.sampling(s.max_tokens(body.max_tokens, len(prompt.ids)), s.tokenizer.vocab_size)
    logprobs = body.logprobs
    events = s.run(prompt, params, body.n, constraint, logprobs, None, request.is_disconnected)
    rid, created, tk = new_id("cmpl"), int(time.time()), s.tokenizer
    echo = tk.decode(prompt.ids, skip_special=True) if body.echo else ""
    head = {"id": rid, "object": "text_completion", "created": created, "model": s.name,
            "system_fingerprint": "gemrun"}

    if body.stream:
        usage = Usage(body.n)

        async def chunks():
            offsets = [len(echo)] * body.n
            if echo:
                for i in range(body.n):
                    yield {"choices": [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}]}
            async for ev in events:
                usage.add(ev)
                lp = completion_logprobs(tk, ev.tokens, offsets[ev.index]) if logprobs is not None else None
                offsets[ev.index] += len(ev.text)
                if ev.text or ev.finish_reason:
                    yield {"choices": [{"index": ev.index, "text": ev.text, "logprobs": lp,
                                        "finish_reason": ev.finish_reason}]}

        return openai_stream(chunks(), events, head, _include_usage(body), usage)

    choices, usage = await collect(events, body.n)
    out = [{"index": i, "text": echo + c["text"], "finish_reason": c["finish"],
            "logprobs": completion_logprobs(tk, c["tokens"], len(echo)) if logprobs is not None else None}
           for i, c in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": s.name,
            "system_fingerprint": "gemrun", "choices": out, "usage": usage.chat(), "timings": usage.timings()}
