"""Tool calls written as Python: Google's prompted convention for Gemma 3 ("Function calling with Gemma",
ai.google.dev). The model calls in a ```tool_code block, keyword arguments only, literal values:
`get_weather(city="Paris", days=2)`.

Model output is parsed, never executed: calls go through `ast` and values through `ast.literal_eval`. The grammar
(`tool_grammar`) makes the model write exactly one such call when a call is forced.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import secrets
from collections.abc import Callable
from typing import Any

from ..errors import InputError
from .messages import NAME, call_arguments, declared_names, normalize_tool_choice, validate_tools
from .stream import MAX_BLOCK, CallStream

OPEN, CLOSE = "```tool_code", "```"


# ---- writing calls (past assistant turns) ----

def render_calls(calls: Any, where: str) -> str:
    """OpenAI tool calls as a ```tool_code block."""
    if not isinstance(calls, list):
        raise InputError(f"{where} must be a list")
    lines = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"{where}[{j}].function.name must be a function name")
        args = call_arguments(fn, f"{where}[{j}]")
        plain = [f"{k}={_py(v)}" for k, v in args.items() if _is_kwarg(k)]
        # keys that cannot be Python keywords (`from`, `my-key`) travel as **{...}, which the parser accepts
        odd = {k: v for k, v in args.items() if not _is_kwarg(k)}
        lines.append(f"{name}({', '.join(plain + ([f'**{_py(odd)}'] if odd else []))})")
    return f"{OPEN}\n" + "\n".join(lines) + f"\n{CLOSE}"


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


# ---- reading calls (the model's output) ----

def parse_tool_calls(text: str, tools: list | None = None) -> tuple[str, list[dict]]:
    """(content with the parsed ```tool_code blocks removed, stripped; OpenAI tool calls). A block that does not
    parse, is too long, or names an undeclared function (when `tools` is given) stays in the content."""
    names = declared_names(tools)
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


class ToolStreamParser(CallStream):
    """Incremental `parse_tool_calls`; see `stream.CallStream`."""

    OPEN, CLOSE = OPEN, CLOSE

    def __init__(self, tools: list | None = None):
        super().__init__(declared_names(tools))

    def _parse(self, body: str) -> list[dict] | None:
        return _parse_block(body, self.names)


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
        if not jsonable(kwargs):
            return None
        arguments = json.dumps(kwargs, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None  # not a literal (a call, a name, `__import__('os')`), or no JSON for it
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": node.func.id, "arguments": arguments}}


def jsonable(v: Any) -> bool:
    """JSON values only: sets, bytes, complex numbers, non-string keys and inf/nan are refused."""
    if v is None or isinstance(v, (bool, int, str)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and jsonable(x) for k, x in v.items())
    return False


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


def forced_functions(tools: list, choice: Any) -> list[dict]:
    """The declared functions a forced `tool_choice` lets the reply call: all ("required") or the named one."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(choice, tools)
    if choice in ("auto", "none"):
        raise InputError('tool_grammar needs tool_choice "required" or a named function')
    fns = [t["function"] for t in tools]
    return [f for f in fns if f["name"] == choice["function"]["name"]] if isinstance(choice, dict) else fns


def tool_grammar(tools: list, choice: str | dict) -> str:
    """GBNF (xgrammar's dialect, root rule `root`) for exactly one ```tool_code block holding one call: to any
    declared function ("required") or to the named one. Each declared parameter appears at most once (required
    ones always, first), with a value of its schema's type or enum; a function that declares no parameters takes
    any identifiers."""
    fns = forced_functions(tools, choice)
    # rules are numbered, not named after the tools, so a tool called `root` or `value` cannot clash
    rules = ['root ::= "```tool_code\\n" call "\\n```"', "call ::= " + " | ".join(f"f{i}" for i in range(len(fns)))]
    for i, fn in enumerate(fns):
        params = fn["parameters"]
        props = params.get("properties") or {}
        required = set(params.get("required") or ()) & set(props)
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        plain = [(f'"{k}="', value_rule(props[k]), k in required) for k in order if _is_kwarg(k)]
        # names that cannot be Python keywords (`from`, `my-key`) go in a trailing **{...}, as `render_calls` does
        odd = [(gbnf_string(_py(k) + ": "), value_rule(props[k]), k in required) for k in order if not _is_kwarg(k)]
        if not props:
            rules.append(f'f{i} ::= "{fn["name"]}(" (a{i} ("," ws a{i})*)? ")"')
            rules.append(f'a{i} ::= ident "=" value')
            continue
        if odd:
            rules += chain(f"o{i}", odd)
            plain.append((f'"**{{" o{i}_0 "}}"', "", any(r for _, _, r in odd)))
        rules += chain(f"p{i}", plain)
        rules.append(f'f{i} ::= "{fn["name"]}(" p{i}_0 ")"')
    return "\n".join(rules) + _LITERALS


def chain(name: str, items: list[tuple[str, str, bool]], separator: str = '"," ws') -> list[str]:
    """Rules `name_0` for a list of the items in order joined by `separator`, each at most once, the required
    ones always. `name_i` is the list from item i on with nothing written yet, `name_t_i` after something was."""
    rules, n = [], len(items)
    rules.append(f'{name}_{n} ::= ""')
    rules.append(f'{name}_t{n} ::= ""')
    for i in range(n - 1, -1, -1):
        key, value, req = items[i]
        item = f"{key} {value}".strip()
        tail = f"{separator} {item} {name}_t{i + 1}"
        if i:  # a tail from the first item on is never needed
            rules.append(f"{name}_t{i} ::= {tail}" + ("" if req else f" | {name}_t{i + 1}"))
        rules.append(f"{name}_{i} ::= {item} {name}_t{i + 1}" + ("" if req else f" | {name}_{i + 1}"))
    return rules


def gbnf_string(text: str) -> str:
    """A GBNF string literal for `text`."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_PY_RULES = {"string": "string", "integer": "integer", "number": "number", "boolean": '"True" | "False"',
             "array": "list", "object": "dict", "null": '"None"'}


def value_rule(schema, literal: Callable[[Any], str] | None = None, rules: dict[str, str] = _PY_RULES) -> str:
    """The grammar of one argument's value: its enum (each value as `literal` writes it), or the rule of its JSON
    type (`rules`: JSON type -> rule), else any value. Defaults: Python literals, as `render_calls` writes."""
    literal = literal or _py
    if not isinstance(schema, dict):
        return "value"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(jsonable(v) for v in enum):
        return "(" + " | ".join(gbnf_string(literal(v)) for v in enum) + ")"
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    alts = [rules[t] for t in types if isinstance(t, str) and t in rules]
    return "(" + " | ".join(alts) + ")" if alts else "value"
