"""Gemma 4's native tool calls: `<|tool_call>call:NAME{key:value,...}<tool_call|>` — keys bare, strings between
`<|"|>` marks, numbers, true/false/null, nested {} and [] (Google's template writes past calls the same way, see
its `format_argument` macro). The text must be decoded with special tokens kept. Parsed by a small
recursive-descent reader, never evaluated."""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any

from .messages import declared_names
from .stream import MAX_BLOCK, CallStream, find_unquoted

OPEN, CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_CALL = re.compile(r"\s*call:([A-Za-z_][\w.\-]*)\s*")
_KEY = re.compile(r"\s*([^\s:,{}\[\]<>\"](?:[^:,{}\[\]<>\"]*[^\s:,{}\[\]<>\"])?)\s*:")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_WORDS = {"true": True, "false": False, "null": None}
_DEPTH = 64  # nesting deeper than this is not a call


def parse_gemma4_args(text: str) -> dict:
    """The arguments object of a Gemma 4 call, `{city:<|"|>Paris<|"|>,n:3}`, as a dict; ValueError if malformed."""
    value, pos = _value(text, 0, 0)
    if not isinstance(value, dict) or text[pos:].strip():
        raise ValueError("not one object")
    return value


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _value(text: str, pos: int, depth: int) -> tuple[Any, int]:
    pos = _skip(text, pos)
    if depth > _DEPTH:
        raise ValueError("nested too deeply")
    if text.startswith(QUOTE, pos):
        end = text.find(QUOTE, pos + len(QUOTE))
        if end < 0:
            raise ValueError("unterminated string")
        return text[pos + len(QUOTE):end], end + len(QUOTE)
    if text.startswith("{", pos):
        out: dict[str, Any] = {}
        pos = _skip(text, pos + 1)
        if text.startswith("}", pos):
            return out, pos + 1
        while True:
            pos = _skip(text, pos)
            if text.startswith(QUOTE, pos):  # quoted keys, as declarations write them
                key, pos = _value(text, pos, depth + 1)
                pos = _skip(text, pos)
                if not text.startswith(":", pos):
                    raise ValueError("expected ':'")
                pos += 1
            elif m := _KEY.match(text, pos):
                key, pos = m.group(1), m.end()
            else:
                raise ValueError("expected a key")
            out[key], pos = _value(text, pos, depth + 1)
            pos = _skip(text, pos)
            if text.startswith("}", pos):
                return out, pos + 1
            if not text.startswith(",", pos):
                raise ValueError("expected ',' or '}'")
            pos += 1
    if text.startswith("[", pos):
        items: list[Any] = []
        pos = _skip(text, pos + 1)
        if text.startswith("]", pos):
            return items, pos + 1
        while True:
            item, pos = _value(text, pos, depth + 1)
            items.append(item)
            pos = _skip(text, pos)
            if text.startswith("]", pos):
                return items, pos + 1
            if not text.startswith(",", pos):
                raise ValueError("expected ',' or ']'")
            pos += 1
    for word, value in _WORDS.items():
        if text.startswith(word, pos) and not text[pos + len(word):pos + len(word) + 1].isalnum():
            return value, pos + len(word)
    if m := _NUMBER.match(text, pos):
        if text[m.end():m.end() + 1].isalnum() or text[m.end():m.end() + 1] in "._":
            raise ValueError("not a number")
        num = m.group(0)
        value = float(num) if any(c in num for c in ".eE") else int(num)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        return value, m.end()
    raise ValueError(f"unexpected text at {pos}")


def _call(body: str, names: set[str] | None) -> dict | None:
    """One call from the text between `<|tool_call>` and `<tool_call|>`, or None when it is not a well-formed
    call (to a declared function, when `names` is given)."""
    m = _CALL.match(body)
    if m is None or len(body) > MAX_BLOCK or (names is not None and m.group(1) not in names):
        return None
    try:
        args = parse_gemma4_args(body[m.end():])
        arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": m.group(1), "arguments": arguments}}


def parse_gemma4_tool_calls(text: str, tools: list | None = None) -> tuple[str, list[dict]]:
    """(content with the parsed `<|tool_call>...<tool_call|>` blocks removed, stripped; OpenAI tool calls
    `{"id", "type": "function", "function": {"name", "arguments": JSON string}}`). A block that does not parse, is
    too long, or names an undeclared function (when `tools` is given) stays in the content, markers and all. The
    end of a call is sought outside its `<|"|>` strings."""
    names = declared_names(tools)
    content, calls, pos = [], [], 0
    while (start := text.find(OPEN, pos)) >= 0:
        end, _, _ = find_unquoted(text, CLOSE, QUOTE, start + len(OPEN))
        if end < 0:
            break  # unclosed: everything after it is content
        call = _call(text[start + len(OPEN):end], names)
        content.append(text[pos:start] if call is not None else text[pos:end + len(CLOSE)])
        calls += [call] if call is not None else []
        pos = end + len(CLOSE)
    content.append(text[pos:])
    return "".join(content).strip(), calls


class Gemma4ToolStreamParser(CallStream):
    """Incremental `parse_gemma4_tool_calls`; see `stream.CallStream`."""

    OPEN, CLOSE, quote = OPEN, CLOSE, QUOTE

    def __init__(self, tools: list | None = None):
        super().__init__(declared_names(tools))

    def _parse(self, body: str) -> list[dict] | None:
        call = _call(body, self.names)
        return None if call is None else [call]
