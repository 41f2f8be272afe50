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
from .pycall import chain, forced_functions, gbnf_string, value_rule
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


# ---- constrained decoding ----

# Values as the template's `format_argument` writes them: no whitespace, strings between <|"|> marks (no "<" inside
# a forced string), numbers of bounded length, nested objects with bare keys.
_VALUES = r"""
value ::= string | number | "true" | "false" | "null" | array | object
string ::= "<|\"|>" [^<]* "<|\"|>"
integer ::= "-"? ("0" | [1-9] [0-9]{0,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
array ::= "[" (value ("," value)*)? "]"
object ::= "{" (key ":" value ("," key ":" value)*)? "}"
key ::= [A-Za-z_] [A-Za-z0-9_]*
"""
CALL_TOKENS = (OPEN, CLOSE, QUOTE, "<|channel>", "<channel|>")  # control tokens a forced call may write


def _literal(v: Any) -> str:
    """A JSON value as the template writes it (`format_argument`, keys bare)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return QUOTE + v + QUOTE
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_literal(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_literal(x) for x in v) + "]"
    return str(v)


_RULES = {"string": "string", "integer": "integer", "number": "number", "boolean": '("true" | "false")',
          "array": "array", "object": "object", "null": '"null"'}


def tool_grammar(tools: list, choice: Any, in_thought: bool = False) -> str:
    """GBNF (xgrammar's dialect, root rule `root`) for a reply that is one native call, to any declared function
    ("required") or the named one: its declared parameters in the template's (sorted) order, each at most once,
    the required ones always, values of their schema's type. A thought channel may come first (with "<" kept out
    of it); `in_thought`: the prompt already opened it, so the reply starts inside the reasoning."""
    fns = forced_functions(tools, choice)
    thought = '[^<]* "<channel|>"' if in_thought else '("<|channel>" [^<]* "<channel|>")?'
    rules = [f'root ::= {thought} "<|tool_call>call:" call "<tool_call|>"',
             "call ::= " + " | ".join(f"f{i}" for i in range(len(fns)))]
    for i, fn in enumerate(fns):
        params = fn["parameters"]
        props = params.get("properties") or {}
        required = set(params.get("required") or ()) & set(props)
        items = [(gbnf_string(f"{k}:"), value_rule(props[k], _literal, _RULES), k in required) for k in sorted(props)]
        if props:
            rules += chain(f"p{i}", items, separator='","')
            rules.append(f'f{i} ::= {gbnf_string(fn["name"] + "{")} p{i}_0 "}}"')
        else:  # no declared parameters: any arguments
            rules.append(f'f{i} ::= {gbnf_string(fn["name"] + "{")} (key ":" value ("," key ":" value)*)? "}}"')
    return "\n".join(rules) + _VALUES
