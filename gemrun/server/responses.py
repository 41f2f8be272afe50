"""OpenAI's /v1/responses, stateless: input items in, output items (reasoning, message, function calls) out,
streamed as `response.*` events."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from ..errors import InputError
from .openai import Usage, active_tools, collect, new_id
from .protocol import ResponsesRequest
from .runner import ready
from .streaming import event_stream, public_message, sse

router = APIRouter()


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


def responses_tools(tools: list[dict] | None) -> list[dict] | None:
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


def response_format(text: dict | None) -> dict | None:
    """The Responses `text.format` as a chat `response_format`."""
    fmt = (text or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                                       "strict": fmt.get("strict")}}
    if fmt and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    return None


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request):
    s = ready(request.app)
    s.check_model(body.model)
    if body.previous_response_id:
        raise InputError("previous_response_id needs stored responses; this server is stateless (send the "
                         "whole conversation as input)")
    raw_choice = body.tool_choice
    if isinstance(raw_choice, dict) and raw_choice.get("type") == "function" and "name" in raw_choice:
        raw_choice = {"type": "function", "function": {"name": raw_choice["name"]}}
    tools, choice = active_tools(responses_tools(body.tools), raw_choice)
    effort = body.reasoning.effort if body.reasoning else None
    prompt = await s.chat_prompt(responses_messages(body), tools, choice, think=body.think(effort),
                                 image_tokens=body.image_budget)
    constraint = s.constraint(prompt, response_format(body.text), tools, choice)
    params = body.sampling(s.max_tokens(body.max_output_tokens, len(prompt.ids), "max_output_tokens"),
                           s.tokenizer.vocab_size)
    events = s.run(prompt, params, 1, constraint, None, tools, request.is_disconnected)
    rid, msg_id, rs_id, created = new_id("resp"), new_id("msg"), new_id("rs"), int(time.time())

    def envelope(status: str, output: list, usage: Usage | None, reason: str | None = None) -> dict:
        out = {"id": rid, "object": "response", "created_at": created, "status": status, "model": s.name,
               "output": output, "instructions": body.instructions, "error": None,
               "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
               "tools": body.tools or [], "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": True,
               "temperature": params.temperature, "top_p": params.top_p, "max_output_tokens": body.max_output_tokens,
               "text": body.text or {"format": {"type": "text"}}, "metadata": {},
               "usage": None if usage is None else {
                   "input_tokens": usage.prompt, "output_tokens": usage.completion,
                   "total_tokens": usage.prompt + usage.completion,
                   "input_tokens_details": {"cached_tokens": usage.cached},
                   "output_tokens_details": {"reasoning_tokens": usage.reasoning}}}
        if usage is not None and (ext := usage.extension()) is not None:
            out["usage"]["gemrun"] = ext
        return out

    def message_item(text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed"
                else []}

    def reasoning_item(text: str, status: str = "completed") -> dict:
        """The thoughts as a reasoning item (their raw text, as reasoning_text content; no summary)."""
        return {"type": "reasoning", "id": rs_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}

    def call_item(call: dict) -> dict:
        return {"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}

    if not body.stream:
        choices, usage = await collect(events, 1)
        c = choices[0]
        output = ([reasoning_item(c["reasoning"])] if c["reasoning"] else []) + (
            [message_item(c["text"])] if c["text"] or not c["calls"] else []) + [call_item(x) for x in c["calls"]]
        return envelope("incomplete" if c["finish"] == "length" else "completed", output, usage, c["finish"])

    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return sse({"type": kind, "sequence_number": seq, **fields}, event=kind)

    async def lines():
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

        yield event("response.created", response=envelope("in_progress", [], None))
        yield event("response.in_progress", response=envelope("in_progress", [], None))
        async for ev in events:
            usage.add(ev)
            kind = "reasoning" if ev.reasoning else "message" if ev.text else None
            if kind and opened != kind:
                for line in close():
                    yield line
                opened = kind
                added = message_item("", "in_progress") if kind == "message" else reasoning_item("", "in_progress")
                yield event("response.output_item.added", output_index=len(output), item=added)
                part = ({"type": "output_text", "text": "", "annotations": []} if kind == "message"
                        else {"type": "reasoning_text", "text": ""})
                yield event("response.content_part.added", item_id=added["id"], output_index=len(output),
                            content_index=0, part=part)
            if kind == "message":
                text += ev.text
                yield event("response.output_text.delta", item_id=msg_id, output_index=len(output), content_index=0,
                            delta=ev.text, logprobs=[])
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
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=len(output),
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=len(output),
                            arguments=item["arguments"])
                yield event("response.output_item.done", output_index=len(output), item=item)
                output.append(item)
            if ev.finish_reason:
                status = "incomplete" if ev.finish_reason == "length" else "completed"
                yield event(f"response.{status}", response=envelope(status, output, usage, ev.finish_reason))

    def error(e: Exception) -> str:
        return event("error", code="server_error", message=public_message(e), param=None)

    return event_stream(lines(), events.aclose, error)
