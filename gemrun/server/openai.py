"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/responses (stateless).
Routes translate requests into a prompt + SamplingParams and the runner's events into OpenAI's shapes."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import GemrunError, InputError
from ..sampling import SamplingParams
from ..tools import normalize_tool_choice, tool_grammar, validate_tools
from .protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .runner import Event, Service, image_budget, sampling_params, thinking

router = APIRouter()


def service_of(request: Request) -> Service:
    from .app import ready

    return ready(request.app)


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def error_event(e: Exception) -> str:
    return sse({"error": {"message": str(e) if isinstance(e, GemrunError) else "internal error",
                          "type": "server_error", "param": None, "code": None}})


def _token_logprob(tk, token_id: int, logprob: float) -> dict:
    text = tk.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tk, ev: Event) -> list[dict]:
    out = []
    for t in ev.tokens:
        entry = _token_logprob(tk, t.id, t.logprob)
        entry["top_logprobs"] = [_token_logprob(tk, i, lp) for i, lp in (t.top or [])]
        out.append(entry)
    return out


def _constraint(service: Service, response_format: dict | None, tools, choice):
    """The grammar a request decodes under: its response_format, or a forced tool call."""
    forced = tools and (choice == "required" or isinstance(choice, dict))
    rf = response_format if response_format and response_format.get("type") != "text" else None
    if not forced and not rf:
        return None
    from ..grammar import compile_constraint, from_response_format

    if forced and rf:
        raise InputError("response_format cannot be combined with a forced tool_choice")
    if forced and service.gemma4:
        raise InputError('tool_choice "required" or a named function is not supported with Gemma 4 yet; use "auto"')
    if forced:
        return compile_constraint(service.model.tokenizer, service.model.config, ebnf=tool_grammar(tools, choice))
    return from_response_format(service.model.tokenizer, service.model.config, rf)


class Usage:
    """Token counts over a request's choices, and speculative decoding's acceptance when a drafter ran."""

    def __init__(self):
        self.prompt, self.completion, self.drafted, self.accepted, self.speculative = 0, 0, 0, 0, False
        self.reasoning = 0  # tokens of the thought channel

    def add(self, ev: Event) -> None:
        if ev.reasoning:
            self.reasoning += len(ev.tokens)
        if ev.usage:
            self.prompt, self.completion = ev.usage[0], self.completion + ev.usage[1]
        if ev.stats is not None and ev.stats.drafted_tokens:
            self.speculative = True
            self.drafted += ev.stats.drafted_tokens
            self.accepted += ev.stats.accepted_tokens

    def extension(self) -> dict | None:
        """gemrun's figures beyond OpenAI's usage (under usage.gemrun): speculative decoding's acceptance."""
        if not self.speculative:
            return None
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0}

    def chat(self) -> dict:
        out = _usage(self.prompt, self.completion)
        if (ext := self.extension()) is not None:
            out["gemrun"] = ext
        return out


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(events: AsyncIterator[Event], n: int) -> tuple[list[dict], Usage]:
    """Non-streaming: gather each choice's text, reasoning, tokens, tool calls and finish reason."""
    choices = [{"text": "", "reasoning": "", "tokens": [], "calls": [], "finish": None} for _ in range(n)]
    usage = Usage()
    async for ev in events:
        c = choices[ev.index]
        c["text"] += ev.text
        c["reasoning"] += ev.reasoning
        c["tokens"] += ev.tokens
        if ev.tool_call:
            c["calls"].append(ev.tool_call)
        if ev.finish_reason:
            c["finish"] = ev.finish_reason
        usage.add(ev)
    return choices, usage


@router.get("/v1/models")
async def models(request: Request):
    s = service_of(request)
    return {"object": "list", "data": [_model_card(s)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    s = service_of(request)
    s.check_model(model_id)
    return _model_card(s)


def _model_card(s: Service) -> dict:
    return {"id": s.name, "object": "model", "created": int(s.model.loaded.path.stat().st_mtime),
            "owned_by": "gemrun", "max_model_len": s.model.max_context}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = service_of(request)
    s.check_model(body.model)
    tools = validate_tools(body.tools) if body.tools else None
    choice = normalize_tool_choice(body.tool_choice, tools) if tools else "none"
    if body.tool_choice not in (None, "none", "auto") and not tools:
        raise InputError("tool_choice needs tools")
    active_tools = tools if choice != "none" else None
    constraint = _constraint(s, body.response_format, active_tools, choice)
    prompt = await s.chat_prompt(body.messages, active_tools, choice,
                                 think=thinking(body.reasoning_effort, body.chat_template_kwargs),
                                 image_tokens=image_budget(body.model_dump()))
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(body.model_dump(), s.max_tokens(asked, len(prompt.ids)),
                             s.model.tokenizer.vocab_size, SamplingParams())
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise InputError("top_logprobs needs logprobs: true")
    events = s.run(prompt, params, body.n, constraint, logprobs, active_tools, request.is_disconnected)
    rid, created, tk = _id("chatcmpl"), int(time.time()), s.model.tokenizer
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.name,
            "system_fingerprint": "gemrun"}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            calls = [0] * body.n
            usage = Usage()
            try:
                for i in range(body.n):
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for ev in events:
                    delta: dict = {}
                    if ev.tool_call:
                        delta["tool_calls"] = [{"index": calls[ev.index], **ev.tool_call}]
                        calls[ev.index] += 1
                    elif ev.reasoning:  # vLLM's and OpenRouter's spellings
                        delta["reasoning_content"] = delta["reasoning"] = ev.reasoning
                    elif ev.text:
                        delta["content"] = ev.text
                    lp = {"content": chat_logprobs(tk, ev)} if logprobs is not None and ev.tokens else None
                    if delta or lp or ev.finish_reason:
                        yield sse({**head, "choices": [{"index": ev.index, "delta": delta, "logprobs": lp,
                                                        "finish_reason": ev.finish_reason}]})
                    usage.add(ev)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage.chat()})
            except Exception as e:  # headers are sent: the error travels as an event
                yield error_event(e)
            finally:
                await events.aclose()
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    choices, usage = await _collect(events, body.n)
    out = []
    for i, c in enumerate(choices):
        message = {"role": "assistant", "content": c["text"] if c["text"] or not c["calls"] else None}
        if c["calls"]:
            message["tool_calls"] = c["calls"]
        if s.gemma4:  # the thought channel, never in content
            message["reasoning_content"] = message["reasoning"] = c["reasoning"] or None
        lp = ({"content": chat_logprobs(tk, Event(i, tokens=c["tokens"]))} if logprobs is not None else None)
        out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": c["finish"]})
    return {"id": rid, "object": "chat.completion", "created": created, "model": s.name,
            "system_fingerprint": "gemrun", "choices": out, "usage": usage.chat()}


def completion_logprobs(tk, ev: Event, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for t in ev.tokens:
        text = tk.decode([t.id])
        tokens.append(text)
        lps.append(t.logprob)
        tops.append({tk.decode([i]): lp for i, lp in (t.top or [])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = service_of(request)
    s.check_model(body.model)
    if body.suffix:
        raise InputError("suffix (fill-in-the-middle) is not supported by Gemma 3")
    prompt_in = body.prompt
    if isinstance(prompt_in, list) and prompt_in and all(isinstance(p, str) for p in prompt_in):
        if len(prompt_in) != 1:
            raise InputError("one prompt per request (send a list of prompts as separate requests)")
        prompt_in = prompt_in[0]
    prompt = s.text_prompt(prompt_in)
    rf = body.response_format if body.response_format and body.response_format.get("type") != "text" else None
    constraint = _constraint(s, rf, None, "none") if rf else None
    params = sampling_params(body.model_dump(), s.max_tokens(body.max_tokens, len(prompt.ids)),
                             s.model.tokenizer.vocab_size, SamplingParams())
    logprobs = body.logprobs
    events = s.run(prompt, params, body.n, constraint, logprobs, None, request.is_disconnected)
    rid, created, tk = _id("cmpl"), int(time.time()), s.model.tokenizer
    echo = tk.decode(prompt.ids, skip_special=True) if body.echo else ""
    head = {"id": rid, "object": "text_completion", "created": created, "model": s.name,
            "system_fingerprint": "gemrun"}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            usage = Usage()
            offsets = [len(echo)] * body.n
            try:
                if echo:
                    for i in range(body.n):
                        yield sse({**head, "choices": [{"index": i, "text": echo, "logprobs": None,
                                                        "finish_reason": None}]})
                async for ev in events:
                    lp = completion_logprobs(tk, ev, offsets[ev.index]) if logprobs is not None else None
                    offsets[ev.index] += len(ev.text)
                    if ev.text or ev.finish_reason:
                        yield sse({**head, "choices": [{"index": ev.index, "text": ev.text, "logprobs": lp,
                                                        "finish_reason": ev.finish_reason}]})
                    usage.add(ev)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage.chat()})
            except Exception as e:
                yield error_event(e)
            finally:
                await events.aclose()
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    choices, usage = await _collect(events, body.n)
    out = [{"index": i, "text": echo + c["text"], "finish_reason": c["finish"],
            "logprobs": (completion_logprobs(tk, Event(i, tokens=c["tokens"]), len(echo))
                         if logprobs is not None else None)} for i, c in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": s.name,
            "system_fingerprint": "gemrun", "choices": out, "usage": usage.chat()}


# --- /v1/responses (stateless) --------------------------------------------------------------------------------

def responses_messages(body: ResponsesRequest) -> list[dict]:
    """Responses input items -> chat messages: messages with input_text / input_image parts, function_call and
    function_call_output items (as assistant tool calls and tool results)."""
    messages: list[dict] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    ptype = part.get("type") if isinstance(part, dict) else None
                    if ptype in ("input_text", "output_text", "text"):
                        parts.append({"type": "text", "text": part.get("text", "")})
                    elif ptype == "input_image":
                        parts.append({"type": "image_url", "image_url": part.get("image_url")})
                    else:
                        raise InputError(f"input[{i}].content has unsupported part type {ptype!r}")
                content = parts
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InputError(f"input[{i}].type {kind!r} is not supported (message, function_call, "
                             "function_call_output)")
    return messages


def _responses_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses tools are flat ({"type": "function", "name", ...}); chat tools nest under "function"."""
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise InputError(f"tools[{i}].type {t.get('type')!r} is not supported (function tools only)")
        fn = t.get("function") or {k: t[k] for k in ("name", "description", "parameters") if k in t}
        out.append({"type": "function", "function": fn})
    return out


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request):
    s = service_of(request)
    s.check_model(body.model)
    if body.previous_response_id:
        raise InputError("previous_response_id needs stored responses; this server is stateless (send the "
                         "whole conversation as input)")
    tools = validate_tools(_responses_tools(body.tools)) if body.tools else None
    raw_choice = body.tool_choice
    if isinstance(raw_choice, dict) and raw_choice.get("type") == "function" and "name" in raw_choice:
        raw_choice = {"type": "function", "function": {"name": raw_choice["name"]}}
    choice = normalize_tool_choice(raw_choice, tools) if tools else "none"
    active_tools = tools if choice != "none" else None
    fmt = (body.text or {}).get("format")
    rf = None
    if fmt and fmt.get("type") == "json_schema":
        rf = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                                     "strict": fmt.get("strict")}}
    elif fmt and fmt.get("type") == "json_object":
        rf = {"type": "json_object"}
    constraint = _constraint(s, rf, active_tools, choice)
    effort = (body.reasoning or {}).get("effort") if isinstance(body.reasoning, dict) else None
    prompt = await s.chat_prompt(responses_messages(body), active_tools, choice,
                                 think=thinking(effort, body.chat_template_kwargs),
                                 image_tokens=image_budget(body.model_dump()))
    params = sampling_params(body.model_dump(), s.max_tokens(body.max_output_tokens, len(prompt.ids),
                                                             "max_output_tokens"),
                             s.model.tokenizer.vocab_size, SamplingParams())
    events = s.run(prompt, params, 1, constraint, None, active_tools, request.is_disconnected)
    rid, msg_id, rs_id, created = _id("resp"), _id("msg"), _id("rs"), int(time.time())

    def envelope(status: str, output: list, usage: Usage | None, reason: str | None = None) -> dict:
        out = {"id": rid, "object": "response", "created_at": created, "status": status, "model": s.name,
               "output": output, "instructions": body.instructions, "error": None,
               "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
               "tools": body.tools or [], "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": True,
               "temperature": params.temperature, "top_p": params.top_p, "max_output_tokens": body.max_output_tokens,
               "text": body.text or {"format": {"type": "text"}}, "metadata": {},
               "usage": None if usage is None else {
                   "input_tokens": usage.prompt, "output_tokens": usage.completion,
                   "total_tokens": usage.prompt + usage.completion, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens_details": {"reasoning_tokens": usage.reasoning}}}
        if usage is not None and (ext := usage.extension()) is not None:
            out["usage"]["gemrun"] = ext
        return out

    def message_item(text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed"
                else []}

    def reasoning_item(text: str, status: str = "completed") -> dict:
        """Gemma 4's thoughts as a reasoning item (its raw text, as reasoning_text content; no summary)."""
        return {"type": "reasoning", "id": rs_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}

    def call_item(call: dict) -> dict:
        return {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
                "arguments": call["function"]["arguments"], "status": "completed"}

    if not body.stream:
        choices, usage = await _collect(events, 1)
        c = choices[0]
        output = ([reasoning_item(c["reasoning"])] if c["reasoning"] else []) + (
            [message_item(c["text"])] if c["text"] or not c["calls"] else []) + [call_item(x) for x in c["calls"]]
        return envelope("incomplete" if c["finish"] == "length" else "completed", output, usage, c["finish"])

    async def stream():
        seq = 0

        def event(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            return f"event: {kind}\n" + sse({"type": kind, "sequence_number": seq, **fields})

        text, thought, output, opened = "", "", [], None  # opened: the item in progress, "message" | "reasoning"
        usage = Usage()

        def close():
            """Events that finish the item in progress."""
            nonlocal text, thought, opened
            i = len(output)
            if opened == "message":
                yield event("response.output_text.done", item_id=msg_id, output_index=i, content_index=0, text=text,
                            logprobs=[])
                yield event("response.content_part.done", item_id=msg_id, output_index=i, content_index=0,
                            part={"type": "output_text", "text": text, "annotations": []})
                output.append(message_item(text))
            elif opened == "reasoning":
                yield event("response.reasoning_text.done", item_id=rs_id, output_index=i, content_index=0,
                            text=thought)
                yield event("response.content_part.done", item_id=rs_id, output_index=i, content_index=0,
                            part={"type": "reasoning_text", "text": thought})
                output.append(reasoning_item(thought))
            if opened:
                yield event("response.output_item.done", output_index=i, item=output[-1])
            opened, text, thought = None, "", ""

        try:
            yield event("response.created", response=envelope("in_progress", [], None))
            yield event("response.in_progress", response=envelope("in_progress", [], None))
            async for ev in events:
                usage.add(ev)
                kind = "reasoning" if ev.reasoning else "message" if ev.text else None
                if kind and opened != kind:
                    for line in close():
                        yield line
                    opened = kind
                    added = message_item("", "in_progress") if kind == "message" else reasoning_item("",
                                                                                                   "in_progress")
                    yield event("response.output_item.added", output_index=len(output), item=added)
                    part = ({"type": "output_text", "text": "", "annotations": []} if kind == "message"
                            else {"type": "reasoning_text", "text": ""})
                    yield event("response.content_part.added", item_id=added["id"], output_index=len(output),
                                content_index=0, part=part)
                if kind == "message":
                    text += ev.text
                    yield event("response.output_text.delta", item_id=msg_id, output_index=len(output),
                                content_index=0, delta=ev.text, logprobs=[])
                elif kind == "reasoning":
                    thought += ev.reasoning
                    yield event("response.reasoning_text.delta", item_id=rs_id, output_index=len(output),
                                content_index=0, delta=ev.reasoning)
                if ev.tool_call or ev.finish_reason:
                    for line in close():
                        yield line
                if ev.tool_call:
                    item = call_item(ev.tool_call)
                    yield event("response.output_item.added", output_index=len(output),
                                item={**item, "arguments": "", "status": "in_progress"})
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=len(output), delta=item["arguments"])
                    yield event("response.function_call_arguments.done", item_id=item["id"],
                                output_index=len(output), arguments=item["arguments"])
                    yield event("response.output_item.done", output_index=len(output), item=item)
                    output.append(item)
                if ev.finish_reason:
                    status = "incomplete" if ev.finish_reason == "length" else "completed"
                    yield event(f"response.{status}", response=envelope(status, output, usage, ev.finish_reason))
        except Exception as e:
            yield event("error", code="server_error", message=str(e) if isinstance(e, GemrunError) else "internal",
                        param=None)
        finally:
            await events.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream")
