"""OpenAI-style chat messages and tool declarations, checked and escaped before any template sees them.

User-supplied text is escaped (`Tokenizer.escape`), so that only a template's own spellings of control tokens
become control tokens. Media parts are taken out of the messages as sources, in order, per kind; what reads those
sources is `prompt.py`'s business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..tokenizer import Tokenizer

ROLES = {"system", "developer", "user", "assistant", "model", "tool"}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_TOOLS = 128
# content part type -> media kind
MEDIA_PARTS = {"image": "image", "image_url": "image", "input_image": "image", "audio": "audio",
               "input_audio": "audio", "video": "video", "video_url": "video"}


@dataclass(frozen=True)
class MediaSlot:
    """What one media item becomes in the prompt text: `tokens` soft tokens (per image, crop or frame), Pan & Scan
    `crops` after a Gemma 3 image, a video's frame `timestamps` ("mm:ss")."""

    kind: str  # "image" | "audio" | "video"
    tokens: int
    crops: int = 0
    timestamps: tuple[str, ...] = ()


def media_source(part: dict, kind: str) -> object:
    """The image, audio or video a content part points at: {"type": kind, kind|"url"|"path": ...} (gemrun, HF),
    {"type": "image_url", "image_url": {"url": ...} or "..."} (OpenAI chat), {"type": "input_image", "image_url":
    ...} (OpenAI responses), {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}} (OpenAI;
    returned as that dict) or {"type": "video_url", "video_url": {"url": ...}}."""
    for key in (kind, "url", "path", f"{kind}_url", "input_audio"):
        value = part.get(key)
        if isinstance(value, dict) and key != "input_audio":
            value = value.get("url")
        if value is not None:
            return value
    raise InputError(f"{kind} part has no {kind}, url or path: {sorted(part)}")


def escape_tree(value: Any, tokenizer: Tokenizer, where: str) -> Any:
    """JSON-like data with every string (keys too) escaped; anything but JSON types is refused."""
    if isinstance(value, str):
        return tokenizer.escape(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [escape_tree(v, tokenizer, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {tokenizer.escape(k): escape_tree(v, tokenizer, where) for k, v in value.items()}
    raise InputError(f"{where} holds a {type(value).__name__}, which is not JSON")


def call_arguments(fn: dict, where: str) -> dict:
    """A tool call's `arguments` as a mapping: a JSON object given as text or as an object."""
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise InputError(f"{where}.function.arguments is not valid JSON") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InputError(f"{where}.function.arguments must be a JSON object")
    return args


def _tool_calls(calls: Any, tokenizer: Tokenizer, where: str) -> list[dict]:
    """OpenAI tool calls with `arguments` as a mapping (Gemma 4's template refuses a JSON string), escaped."""
    if not isinstance(calls, list):
        raise InputError(f"{where} must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}[{j}].function.name must be a non-empty string")
        args = call_arguments(fn, f"{where}[{j}]")
        item = {"type": "function", "function": {"name": tokenizer.escape(name),
                                                 "arguments": escape_tree(args, tokenizer, f"{where}[{j}]")}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def normalize_messages(messages: Sequence[dict], tokenizer: Tokenizer, images: list | None = None,
                       audio: list | None = None, videos: list | None = None,
                       past_reply: Callable[[str], str] | None = None) -> list[dict]:
    """Validate OpenAI-style messages and escape their text. Content is a string or a list of parts: text, and
    image / audio / video parts whose sources are appended to `images` / `audio` / `videos` in order (None: the
    model cannot read that kind, and such parts are refused). Assistant messages keep `tool_calls` (arguments
    parsed to mappings) and reasoning (`reasoning_content`, also read from `reasoning` / `thinking`); `past_reply`
    rewrites the text of past assistant turns before escaping (Gemma 4 strips their thoughts). Tool messages keep
    `tool_call_id` and `name`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list")
    sinks = {"image": images, "audio": audio, "video": videos}
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}")
        role = "assistant" if role == "model" else role
        rewrite = past_reply if role == "assistant" and past_reply else (lambda s: s)
        if isinstance(content, str):
            content = tokenizer.escape(rewrite(content))
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": tokenizer.escape(rewrite(part["text"]))})
                elif kind in MEDIA_PARTS:
                    media = MEDIA_PARTS[kind]
                    sink = sinks[media]
                    if sink is None:
                        raise InputError(f"messages[{i}].content[{j}]: this model "
                                         + ("is text-only and cannot read images" if media == "image"
                                            else f"cannot read {media}"))
                    sink.append(media_source(part, media))
                    parts.append({"type": media})
                else:
                    raise InputError(f"messages[{i}].content[{j}] has unsupported type {kind!r}")
            content = parts
        elif content is None and role == "assistant":
            content = ""
        elif not (content is None and role == "tool"):  # a tool result of None renders as null
            raise InputError(f"messages[{i}].content must be a string or a list of parts")
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], tokenizer, f"messages[{i}].tool_calls")
            reasoning = next((m[k] for k in ("reasoning_content", "reasoning", "thinking") if m.get(k)), None)
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise InputError(f"messages[{i}].reasoning_content must be a string")
                msg["reasoning_content"] = tokenizer.escape(reasoning)
        elif role == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise InputError(f"messages[{i}].{key} must be a string")
                    msg[key] = tokenizer.escape(m[key])
        out.append(msg)
    return out


# ---- tool declarations ----

def validate_tools(tools: list | None) -> list[dict]:
    """OpenAI `tools` -> checked copies `{"type": "function", "function": {name, description, parameters}}`."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InputError("tools must be a list")
    if len(tools) > MAX_TOOLS:
        raise InputError(f"tools has {len(tools)} entries, at most {MAX_TOOLS} are allowed")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InputError(f'{where}.type must be "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InputError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"{where}.function.name {name!r} must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$")
        if name in seen:
            raise InputError(f"{where}.function.name {name!r} is declared twice")
        seen.add(name)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise InputError(f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is not None:
            # an empty schema means "no arguments", as OpenAI reads it
            if not isinstance(params, dict) or (params and params.get("type") != "object"):
                raise InputError(f'{where}.function.parameters must be a JSON schema with "type": "object"')
            if not isinstance(params.get("properties", {}), dict):
                raise InputError(f"{where}.function.parameters.properties must be an object")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": params or {"type": "object", "properties": {}}}})
    return out


def normalize_tool_choice(tool_choice: Any, tools: list | None) -> str | dict:
    """"auto" (the default), "none", "required" or {"type": "function", "function": {"name": <declared>}}."""
    names = {t["function"]["name"] for t in validate_tools(tools)}
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not names:
            raise InputError('tool_choice "required" needs a non-empty tools list')
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise InputError(f"tool_choice.function.name {name!r} is not one of the declared tools")
        return {"type": "function", "function": {"name": name}}
    raise InputError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                     '{"name": ...}}')


def declared_names(tools: list | None) -> set[str] | None:
    """The names a reply may call (None: any)."""
    return None if tools is None else {t["function"]["name"] for t in validate_tools(tools)}


def forced(tools: list | None, choice: Any) -> bool:
    """Whether a tool_choice obliges the reply to call a tool (only constrained decoding can honour that)."""
    return bool(tools) and (choice == "required" or isinstance(choice, dict))
