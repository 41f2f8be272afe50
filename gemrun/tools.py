"""Function calling.

Gemma 3 has no tool tokens: Google's prompted convention, as in ai.google.dev "Function calling with Gemma".
Declarations go into the first user turn as JSON; the model calls with Python syntax in a ```tool_code block;
results come back to it in a ```tool_output block inside a user turn (`apply_tools`, `parse_tool_calls`).

Gemma 4 has native tool tokens, and its chat template declares tools and renders OpenAI `tool_calls` / `role:
tool` messages itself (`native_tools` only validates); the model calls `<|tool_call>call:NAME{...}<tool_call|>`
(`parse_gemma4_tool_calls`, `Gemma4OutputParser`).

Model output is parsed, never executed: Gemma 3 calls with `ast` (literals through `ast.literal_eval`), Gemma 4
calls with a small recursive-descent reader.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
import secrets
from typing import Any

from .errors import InputError
from .thinking import ThinkingSplitter, _prefix_tail, split_thinking

__all__ = ["validate_tools", "normalize_tool_choice", "apply_tools", "parse_tool_calls", "ToolStreamParser",
           "tool_grammar", "native_tools", "parse_gemma4_args", "parse_gemma4_tool_calls", "Gemma4ToolStreamParser",
           "parse_gemma4_output", "Gemma4OutputParser"]

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_TOOLS = 128
MAX_BLOCK = 64 << 10  # characters of a tool_code block we try to parse; longer ones stay content
OPEN, CLOSE = "```tool_code", "```"

# Google's instructions, reworded; the call example matches what `parse_tool_calls` accepts.
PROMPT = (
    "You have access to the functions declared below. If you decide to call one or more of them, reply with "
    "the calls as Python, one per line, keyword arguments only, inside a block fenced with ```tool_code, e.g.\n"
    '```tool_code\nfunction_name(param="value", other=2)\n```\n'
    "Call only the functions declared here, and write nothing else in a reply that calls a function. Each "
    "result will come back to you in a ```tool_output block; use it to make further calls or to answer.\n\n"
)


# ---- request side: tools, tool_choice, messages ----

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


def apply_tools(messages: list[dict], tools: list[dict] | None, tool_choice: Any = "auto") -> list[dict]:
    """OpenAI messages -> messages Gemma 3's template accepts (alternating user/assistant, plus system).

    Assistant `tool_calls` become a ```tool_code block; runs of `tool` messages become one user turn of
    ```tool_output blocks, merged with a neighbouring user turn so that roles still alternate. With tools and a
    choice other than "none", the declarations and instructions open the first user turn (after the system
    message, which the template folds in itself)."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    if not isinstance(messages, list):
        raise InputError("messages must be a list")
    out: list[tuple[dict, bool]] = []  # (message, holds tool output)
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role is None:
            out.append((m, False))  # not a message: left for chat.normalize_messages to report
            continue
        if role == "tool":
            block = f"```tool_output\n{_text(m.get('content'), f'messages[{i}].content')}\n```"
            msg, merge = {"role": "user", "content": block}, True
        elif role in ("assistant", "model") and m.get("tool_calls"):
            text = _text(m.get("content"), f"messages[{i}].content")
            code = _render_calls(m["tool_calls"], f"messages[{i}].tool_calls")
            msg, merge = {"role": "assistant", "content": f"{text}\n\n{code}" if text.strip() else code}, False
        else:
            msg, merge = m, False  # passed through; chat.normalize_messages validates it
        if out and msg.get("role") == "user" and _role(out[-1][0]) == "user" and (merge or out[-1][1]):
            prev = out.pop()[0]
            msg, merge = {"role": "user", "content": _join(prev.get("content"), msg.get("content"))}, True
        out.append((msg, merge))
    result = [m for m, _ in out]
    if not tools or choice == "none":
        return result
    prompt = PROMPT + json.dumps([t["function"] for t in tools], indent=2, ensure_ascii=False)
    if choice == "required":
        prompt += "\n\nYou must call at least one of these functions in your reply."
    elif isinstance(choice, dict):
        prompt += f"\n\nYou must call the function {choice['function']['name']} in your reply."
    first = next((k for k, m in enumerate(result) if _role(m) == "user"), None)
    if first is None:  # no user turn yet: the instructions become one, after any system message
        return result + [{"role": "user", "content": prompt}]
    result[first] = {**result[first], "content": _join(prompt, result[first].get("content"))}
    return result


def native_tools(tools: list | None, tool_choice: Any = "auto") -> list[dict] | None:
    """The `tools` to hand a template that declares tools itself (Gemma 4): the validated list, or None when there
    are none or tool_choice is "none". Messages need no rewriting: `tool_calls` and `role: tool` messages go to
    the template as they are (`chat.normalize_messages` checks them). The template has no way to force a call, so
    "required" and a named function are only honoured by constraining decoding."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    return tools if tools and choice != "none" else None


def _role(m: Any) -> Any:
    return m.get("role") if isinstance(m, dict) else None


def _text(content: Any, where: str) -> str:
    """The text of a tool result or assistant message: a string, None, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise InputError(f"{where} must be a string or a list of text parts")


def _join(a: Any, b: Any) -> Any:
    """Two message contents as one; lists of parts (text, images) stay lists, adjacent texts are merged."""
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n\n{b}"
    pa = [{"type": "text", "text": a}] if isinstance(a, str) else list(a or [])
    pb = [{"type": "text", "text": b}] if isinstance(b, str) else list(b or [])
    if pa and pb and pa[-1].get("type") == "text" and pb[0].get("type") == "text":
        # the template trims and concatenates parts, so keep the paragraph break inside one part
        return pa[:-1] + [{"type": "text", "text": f"{pa[-1]['text']}\n\n{pb[0]['text']}"}] + pb[1:]
    return pa + pb


def _render_calls(calls: Any, where: str) -> str:
    if not isinstance(calls, list):
        raise InputError(f"{where} must be a list")
    lines = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"{where}[{j}].function.name must be a function name")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise InputError(f"{where}[{j}].function.arguments must be a JSON object")
        plain = [f"{k}={_py(v)}" for k, v in args.items() if _is_kwarg(k)]
        # keys that cannot be Python keywords (`from`, `my-key`) travel as **{...}, which the parser accepts
        odd = {k: v for k, v in args.items() if not _is_kwarg(k)}
        lines.append(f"{name}({', '.join(plain + ([f'**{_py(odd)}'] if odd else []))})")
    return "```tool_code\n" + "\n".join(lines) + "\n```"


def _is_kwarg(key: str) -> bool:
    return key.isidentifier() and not keyword.iskeyword(key)


def _py(v: Any) -> str:
    """A JSON value as a Python literal (json's string escapes are valid Python escapes)."""
    if v is None or isinstance(v, bool):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_py(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_py(str(k))}: {_py(x)}" for k, x in v.items()) + "}"
    raise InputError(f"cannot render {type(v).__name__} as a tool argument")


# ---- response side: parsing the model's output ----

def parse_tool_calls(text: str, tools: list | None = None) -> tuple[str, list[dict]]:
    """(content with the parsed ```tool_code blocks removed, stripped; OpenAI tool calls). A block that does not
    parse, is too long, or names an undeclared function (when `tools` is given) stays in the content."""
    names = _names(tools)
    content, calls, pos = [], [], 0
    while (start := text.find(OPEN, pos)) >= 0:
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:
            break  # unclosed: no later block can close either
        parsed = _parse_block(text[start + len(OPEN):end], names)
        content.append(text[pos:start] if parsed is not None else text[pos:end + len(CLOSE)])
        calls += parsed or []
        pos = end + len(CLOSE)
    content.append(text[pos:])
    return "".join(content).strip(), calls


class _CallStream:
    """Incremental call extraction: push text deltas, get ("content", str) and ("tool_call", dict) events.

    Text passes through at once, except a tail that could begin `OPEN` and trailing whitespace (content is
    stripped, as in the one-shot parsers). A block is held until its closing marker, then becomes calls or, if it
    does not parse, content; a block past `MAX_BLOCK` is streamed as content while its closing marker is sought."""

    OPEN = CLOSE = ""

    def __init__(self, tools: list | None = None):
        self.names = _names(tools)
        self.buf = ""
        self.mode = "text"  # "text" | "block" (held) | "long" (too long to parse, passed through)
        self.scan = 0  # where the search for the block's end resumes (each push scans only new text)
        self.started = False  # content emitted yet (leading whitespace is dropped)
        self.space = ""  # trailing whitespace held until more content follows

    def push(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while True:
            if self.mode == "text":
                start = self.buf.find(self.OPEN)
                if start < 0:
                    keep = _prefix_tail(self.buf, self.OPEN)
                    self._content(self.buf[:len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                self._content(self.buf[:start], events)
                self.buf, self.mode = self.buf[start:], "block"
                self._start_block()
            end = self._block_end() if self.mode == "block" else self.buf.find(self.CLOSE)
            if end < 0:
                if self.mode == "block" and len(self.buf) - len(self.OPEN) > MAX_BLOCK + len(self.CLOSE):
                    self.mode = "long"  # the body is already too long, whatever follows
                if self.mode == "long":
                    keep = _prefix_tail(self.buf, self.CLOSE)
                    self._content(self.buf[:len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep:]
                return events
            raw, self.buf = self.buf[:end + len(self.CLOSE)], self.buf[end + len(self.CLOSE):]
            parsed = self._parse(raw[len(self.OPEN):end]) if self.mode == "block" else None
            if parsed is None:
                self._content(raw, events)
            events += [("tool_call", c) for c in parsed or []]
            self.mode = "text"

    def finish(self) -> list[tuple[str, Any]]:
        """Flush what is held: an unfinished marker or block is content; trailing whitespace is dropped."""
        events: list[tuple[str, Any]] = []
        self._content(self.buf, events)
        self.buf, self.mode, self.space = "", "text", ""
        return events

    def _start_block(self) -> None:
        self.scan = len(self.OPEN)

    def _block_end(self) -> int:
        """Index in `buf` (which starts with OPEN) of the CLOSE that ends the block, or -1 while none has come."""
        end = self.buf.find(self.CLOSE, self.scan)
        if end < 0:
            self.scan = max(self.scan, len(self.buf) - len(self.CLOSE) + 1)
        return end

    def _parse(self, body: str) -> list[dict] | None:
        raise NotImplementedError

    def _content(self, text: str, events: list) -> None:
        if not self.started:
            text = text.lstrip()
        text = self.space + text
        core = text.rstrip()
        self.space = text[len(core):]
        if core:
            events.append(("content", core))
            self.started = True


class ToolStreamParser(_CallStream):
    """Incremental `parse_tool_calls` (Gemma 3's ```tool_code blocks); see `_CallStream`."""

    OPEN, CLOSE = OPEN, CLOSE

    def _parse(self, body: str) -> list[dict] | None:
        return _parse_block(body, self.names)


def _names(tools: list | None) -> set[str] | None:
    return None if tools is None else {t["function"]["name"] for t in validate_tools(tools)}


def _parse_block(body: str, names: set[str] | None) -> list[dict] | None:
    """The calls in a tool_code block's body, or None when any part is not a plain call with literal kwargs."""
    if len(body) > MAX_BLOCK or not body.strip():
        return None
    try:
        tree = ast.parse(body.strip(), mode="exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    calls = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Expr):
            return None
        node = stmt.value
        for call in node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]:  # Google's [f(), g()]
            parsed = _parse_call(call, names)
            if parsed is None:
                return None
            calls.append(parsed)
    return calls or None


def _parse_call(node: ast.AST, names: set[str] | None) -> dict | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    if node.func.id == "print" and len(node.args) == 1 and not node.keywords:
        return _parse_call(node.args[0], names)  # Gemma sometimes writes print(f(...)), as in Google's examples
    if node.args or (names is not None and node.func.id not in names):
        return None
    kwargs: dict[str, Any] = {}
    try:
        for kw in node.keywords:
            value = ast.literal_eval(kw.value)
            if kw.arg is not None:
                items = {kw.arg: value}
            elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
                items = value  # **{"from": ...}: keys that are not Python identifiers
            else:
                return None
            if kwargs.keys() & items.keys():
                return None
            kwargs.update(items)
        if not _jsonable(kwargs):
            return None
        arguments = json.dumps(kwargs, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None  # not a literal (a call, a name, `__import__('os')`), or no JSON for it
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": node.func.id, "arguments": arguments}}


def _jsonable(v: Any) -> bool:
    """JSON values only: sets, bytes, complex numbers, non-string keys and inf/nan are refused."""
    if v is None or isinstance(v, (bool, int, str)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


# ---- Gemma 4: native tool tokens ----
# The model calls `<|tool_call>call:NAME{key:value,...}<tool_call|>`: keys bare, strings between `<|"|>` marks,
# numbers, true/false/null, nested {} and [] (Google's template writes past calls the same way, see
# `format_argument`). The text must be decoded with special tokens kept.

G4_OPEN, G4_CLOSE, G4_QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_G4_CALL = re.compile(r"\s*call:([A-Za-z_][\w.\-]*)\s*")
_G4_KEY = re.compile(r"\s*([^\s:,{}\[\]<>\"](?:[^:,{}\[\]<>\"]*[^\s:,{}\[\]<>\"])?)\s*:")
_G4_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_G4_WORDS = {"true": True, "false": False, "null": None}
_G4_DEPTH = 64  # nesting deeper than this is not a call


def parse_gemma4_args(text: str) -> dict:
    """The arguments object of a Gemma 4 call, `{city:<|"|>Paris<|"|>,n:3}`, as a dict; ValueError if malformed."""
    value, pos = _g4_value(text, 0, 0)
    if not isinstance(value, dict) or text[pos:].strip():
        raise ValueError("not one object")
    return value


def _g4_skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _g4_value(text: str, pos: int, depth: int) -> tuple[Any, int]:
    pos = _g4_skip(text, pos)
    if depth > _G4_DEPTH:
        raise ValueError("nested too deeply")
    if text.startswith(G4_QUOTE, pos):
        end = text.find(G4_QUOTE, pos + len(G4_QUOTE))
        if end < 0:
            raise ValueError("unterminated string")
        return text[pos + len(G4_QUOTE):end], end + len(G4_QUOTE)
    if text.startswith("{", pos):
        out: dict[str, Any] = {}
        pos = _g4_skip(text, pos + 1)
        if text.startswith("}", pos):
            return out, pos + 1
        while True:
            pos = _g4_skip(text, pos)
            if text.startswith(G4_QUOTE, pos):  # quoted keys, as declarations write them
                key, pos = _g4_value(text, pos, depth + 1)
                pos = _g4_skip(text, pos)
                if not text.startswith(":", pos):
                    raise ValueError("expected ':'")
                pos += 1
            elif m := _G4_KEY.match(text, pos):
                key, pos = m.group(1), m.end()
            else:
                raise ValueError("expected a key")
            out[key], pos = _g4_value(text, pos, depth + 1)
            pos = _g4_skip(text, pos)
            if text.startswith("}", pos):
                return out, pos + 1
            if not text.startswith(",", pos):
                raise ValueError("expected ',' or '}'")
            pos += 1
    if text.startswith("[", pos):
        items: list[Any] = []
        pos = _g4_skip(text, pos + 1)
        if text.startswith("]", pos):
            return items, pos + 1
        while True:
            item, pos = _g4_value(text, pos, depth + 1)
            items.append(item)
            pos = _g4_skip(text, pos)
            if text.startswith("]", pos):
                return items, pos + 1
            if not text.startswith(",", pos):
                raise ValueError("expected ',' or ']'")
            pos += 1
    for word, value in _G4_WORDS.items():
        if text.startswith(word, pos) and not text[pos + len(word):pos + len(word) + 1].isalnum():
            return value, pos + len(word)
    if m := _G4_NUMBER.match(text, pos):
        if text[m.end():m.end() + 1].isalnum() or text[m.end():m.end() + 1] in "._":
            raise ValueError("not a number")
        num = m.group(0)
        value = float(num) if any(c in num for c in ".eE") else int(num)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        return value, m.end()
    raise ValueError(f"unexpected text at {pos}")


def _g4_call(body: str, names: set[str] | None) -> dict | None:
    """One call from the text between `<|tool_call>` and `<tool_call|>`, or None when it is not a well-formed
    call (to a declared function, when `names` is given)."""
    m = _G4_CALL.match(body)
    if m is None or len(body) > MAX_BLOCK or (names is not None and m.group(1) not in names):
        return None
    try:
        args = parse_gemma4_args(body[m.end():])
        arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": m.group(1), "arguments": arguments}}


def _g4_close(text: str, pos: int) -> int:
    """Index of the `<tool_call|>` that ends a call whose body starts at `pos` (one inside a `<|"|>` string does
    not), or -1."""
    quoted = False
    while True:
        q = text.find(G4_QUOTE, pos)
        if not quoted:
            c = text.find(G4_CLOSE, pos)
            if c >= 0 and (q < 0 or c < q):
                return c
        if q < 0:
            return -1
        quoted, pos = not quoted, q + len(G4_QUOTE)


def parse_gemma4_tool_calls(text: str, tools: list | None = None) -> tuple[str, list[dict]]:
    """(content with the parsed `<|tool_call>...<tool_call|>` blocks removed, stripped; OpenAI tool calls
    `{"id", "type": "function", "function": {"name", "arguments": JSON string}}`). A block that does not parse, is
    too long, or names an undeclared function (when `tools` is given) stays in the content, markers and all."""
    names = _names(tools)
    content, calls, pos = [], [], 0
    while (start := text.find(G4_OPEN, pos)) >= 0:
        end = _g4_close(text, start + len(G4_OPEN))
        if end < 0:
            break  # unclosed: everything after it is content
        call = _g4_call(text[start + len(G4_OPEN):end], names)
        content.append(text[pos:start] if call is not None else text[pos:end + len(G4_CLOSE)])
        calls += [call] if call is not None else []
        pos = end + len(G4_CLOSE)
    content.append(text[pos:])
    return "".join(content).strip(), calls


class Gemma4ToolStreamParser(_CallStream):
    """Incremental `parse_gemma4_tool_calls`; see `_CallStream`. The end of a call is sought outside its
    `<|"|>` strings."""

    OPEN, CLOSE = G4_OPEN, G4_CLOSE

    def _start_block(self) -> None:
        self.scan, self.quoted = len(self.OPEN), False

    def _block_end(self) -> int:
        pos = self.scan
        while True:
            q = self.buf.find(G4_QUOTE, pos)
            if not self.quoted:
                c = self.buf.find(G4_CLOSE, pos)
                if c >= 0 and (q < 0 or c < q):
                    return c
            if q < 0:
                # resume where a marker cut by the end of the buffer may begin
                self.scan = max(pos, len(self.buf) - max(len(G4_QUOTE), len(G4_CLOSE)) + 1)
                return -1
            self.quoted, pos = not self.quoted, q + len(G4_QUOTE)

    def _parse(self, body: str) -> list[dict] | None:
        call = _g4_call(body, self.names)
        return None if call is None else [call]


def parse_gemma4_output(text: str, tools: list | None = None,
                        in_thought: bool = False) -> tuple[str, str, list[dict]]:
    """A whole Gemma 4 reply -> (reasoning, content, tool calls): the thought channel is split off first
    (`thinking.split_thinking`; calls inside the reasoning stay reasoning), then calls are taken from the answer.
    `in_thought`: the prompt ended inside an open thought channel (`thinking.opens_in_thought`)."""
    reasoning, answer = split_thinking(text, in_thought)
    content, calls = parse_gemma4_tool_calls(answer, tools)
    return reasoning, content, calls


class Gemma4OutputParser:
    """Incremental `parse_gemma4_output`: push decoded text deltas (special tokens kept), get ("reasoning", str),
    ("content", str) and ("tool_call", dict) events; `finish()` at the end of generation. Pass `tools=None` to
    leave tool calls unparsed (they stay content)."""

    def __init__(self, tools: list | None = None, in_thought: bool = False, parse_tools: bool = True):
        self.thinking = ThinkingSplitter(in_thought)
        self.calls = Gemma4ToolStreamParser(tools) if parse_tools else None

    def push(self, text: str) -> list[tuple[str, Any]]:
        return self._route(self.thinking.push(text), final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._route(self.thinking.finish(), final=True)

    def _route(self, events: list[tuple[str, str]], final: bool) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for kind, text in events:
            if kind == "content" and self.calls is not None:
                out += self.calls.push(text)
            else:
                out.append((kind, text))
        if final and self.calls is not None:
            out += self.calls.finish()
        return out


# ---- constrained decoding ----

# Python literals as `_py` writes them; at most one space between items, so the model cannot pad forever.
_LITERALS = r"""
value ::= string | number | "True" | "False" | "None" | list | dict
string ::= "\"" ([^"\\\r\n] | "\\" (["\\'bfnrt] | "u" hex hex hex hex))* "\""
hex ::= [0-9a-fA-F]
number ::= integer ("." [0-9]+)? ([eE] [-+]? [0-9]+)?
integer ::= "-"? ("0" | [1-9] [0-9]*)
list ::= "[" (value ("," ws value)*)? "]"
dict ::= "{" (string ":" ws value ("," ws string ":" ws value)*)? "}"
ws ::= " "?
ident ::= [A-Za-z_] [A-Za-z0-9_]*
"""


def tool_grammar(tools: list, choice: str | dict) -> str:
    """GBNF (xgrammar's dialect, root rule `root`) for exactly one ```tool_code block holding one call: to any
    declared function ("required") or to the named one. Each declared parameter appears at most once (required
    ones always, first), with a value of its schema's type or enum; a function that declares no parameters takes
    any identifiers."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(choice, tools)
    if choice in ("auto", "none"):
        raise InputError('tool_grammar needs tool_choice "required" or a named function')
    fns = [t["function"] for t in tools]
    if isinstance(choice, dict):
        fns = [f for f in fns if f["name"] == choice["function"]["name"]]
    # rules are numbered, not named after the tools, so a tool called `root` or `value` cannot clash
    rules = ['root ::= "```tool_code\\n" call "\\n```"', "call ::= " + " | ".join(f"f{i}" for i in range(len(fns)))]
    for i, fn in enumerate(fns):
        params = fn["parameters"]
        props = params.get("properties") or {}
        required = set(params.get("required") or ()) & set(props)
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        plain = [(f'"{k}="', _value_rule(props[k]), k in required) for k in order if _is_kwarg(k)]
        # names that cannot be Python keywords (`from`, `my-key`) go in a trailing **{...}, as `_render_calls` does
        odd = [(_gbnf(_py(k) + ": "), _value_rule(props[k]), k in required) for k in order if not _is_kwarg(k)]
        if not props:
            rules.append(f'f{i} ::= "{fn["name"]}(" (a{i} ("," ws a{i})*)? ")"')
            rules.append(f'a{i} ::= ident "=" value')
            continue
        if odd:
            rules += _chain(f"o{i}", odd)
            plain.append((f'"**{{" o{i}_0 "}}"', "", any(r for _, _, r in odd)))
        rules += _chain(f"p{i}", plain)
        rules.append(f'f{i} ::= "{fn["name"]}(" p{i}_0 ")"')
    return "\n".join(rules) + _LITERALS


def _chain(name: str, items: list[tuple[str, str, bool]]) -> list[str]:
    """Rules `name_0` for a comma-separated list of the items in order, each at most once, the required ones
    always. `name_i` is the list from item i on with nothing written yet, `name_t_i` after something was."""
    rules, n = [], len(items)
    rules.append(f'{name}_{n} ::= ""')
    rules.append(f'{name}_t{n} ::= ""')
    for i in range(n - 1, -1, -1):
        key, value, req = items[i]
        item = f"{key} {value}".strip()
        tail = f'"," ws {item} {name}_t{i + 1}'
        if i:  # a tail from the first item on is never needed
            rules.append(f"{name}_t{i} ::= {tail}" + ("" if req else f" | {name}_t{i + 1}"))
        rules.append(f"{name}_{i} ::= {item} {name}_t{i + 1}" + ("" if req else f" | {name}_{i + 1}"))
    return rules


def _gbnf(text: str) -> str:
    """A GBNF string literal for `text`."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _value_rule(schema) -> str:
    """The grammar of one argument's value: its enum, or its JSON type as a Python literal, else any value."""
    if not isinstance(schema, dict):
        return "value"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(_jsonable(v) for v in enum):
        return "(" + " | ".join(_gbnf(_py(v)) for v in enum) + ")"
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    rule = {"string": "string", "integer": "integer", "number": "number", "boolean": '"True" | "False"',
            "array": "list", "object": "dict", "null": '"None"'}
    alts = [rule[t] for t in types if isinstance(t, str) and t in rule]
    return "(" + " | ".join(alts) + ")" if alts else "value"
