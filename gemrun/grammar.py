"""Constrained decoding: JSON, JSON schemas and EBNF grammars enforced token by token with xgrammar.

A `Constraint` is a compiled grammar; each request takes its own `Matcher` from it, which masks the logits of
every step to the tokens that keep the output inside the grammar and is told the token that was chosen. Control
tokens are never allowed (their spellings would otherwise read as text); the stop tokens are allowed only where
the grammar is complete, so a constrained answer always parses.

Untrusted schemas are bounded before compiling (size, nesting depth) and compiling itself has a time limit.
Output is bounded too, as llama.cpp's JSON grammar is: whitespace between tokens is fixed (xgrammar's default
allows any amount, and a weak model then emits newlines until max_tokens) and numbers have at most 16 integer
digits (`bound_numbers`), so a JSON answer cannot run away inside one value.
"""

from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch
import xgrammar as xgr

from .errors import InputError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_INDENT = 8
NUMBER_BOUND = 10**15  # |integer or number| when the schema gives no bound: 16 digits, as llama.cpp's json.gbnf
_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # JSON values, not schemas: never rewritten
COMPILE_TIMEOUT = 10.0

_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemrun-grammar")


def tokenizer_info(tokenizer, vocab_size: int, stop_ids: tuple[int, ...],
                   allowed: tuple[str, ...] = ()) -> xgr.TokenizerInfo:
    """xgrammar's view of our vocabulary: sentencepiece pieces with byte fallback, control tokens blanked (never
    allowed) except the `allowed` ones a grammar writes (a native tool call's markers), `stop_ids` (the chat
    format's end-of-reply tokens) allowed where the grammar is complete; rows past the tokenizer (a padded head)
    never allowed."""
    vocab = tokenizer.pieces()
    for token, i in tokenizer.specials.items():
        if token not in allowed:
            vocab[i] = ""
    return xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, vocab_size=max(vocab_size, len(vocab)),
                             stop_token_ids=list(stop_ids), add_prefix_space=False)


def compiler(tokenizer, vocab_size: int, stop_ids: tuple[int, ...],
             allowed: tuple[str, ...] = ()) -> xgr.GrammarCompiler:
    """One grammar compiler (with its cache) per tokenizer, vocabulary size (the model's head may be wider), stop
    tokens and allowed control tokens."""
    key = (vocab_size, stop_ids, allowed)
    with _lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        c = per_tokenizer.get(key)
        if c is None:
            info = tokenizer_info(tokenizer, vocab_size, stop_ids, allowed)
            c = per_tokenizer[key] = xgr.GrammarCompiler(info, max_threads=2)
        return c


class Matcher:
    """One request's grammar state: `mask(logits)` before sampling, `accept(token)` after."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self._m = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (float32 (V,), in place) of every token the grammar forbids next to -inf."""
        self._m.fill_next_token_bitmask(self._bitmask)
        xgr.apply_token_bitmask_inplace(logits[None] if logits.dim() == 1 else logits, self._bitmask,
                                        vocab_size=self.vocab_size)

    def accept(self, token: int) -> None:
        if not self._m.accept_token(token):
            raise RuntimeError(f"token {token} is outside the grammar")

    @property
    def is_terminated(self) -> bool:
        return self._m.is_terminated()


class Constraint:
    """A compiled grammar; `matcher()` gives each request its own state."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.compiled, self.vocab_size = compiled, vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self.compiled, self.vocab_size)


def _compile(fn, *args, **kw) -> xgr.CompiledGrammar:
    try:
        return _pool.submit(fn, *args, **kw).result(timeout=COMPILE_TIMEOUT)
    except FutureTimeout:
        raise InputError(f"grammar took longer than {COMPILE_TIMEOUT:g} s to compile") from None
    except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError) as e:
        raise InputError(f"invalid grammar: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None


def _depth(value, limit: int = MAX_DEPTH) -> None:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            raise InputError(f"JSON schema nested deeper than {limit} levels")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def bound_numbers(schema):
    """A copy of the schema in which every integer or number without a lower or upper bound gets one
    (+-NUMBER_BOUND around the other bound), which xgrammar turns into a digit-count limit; unbounded, a
    constrained number may take digits until max_tokens."""
    if isinstance(schema, list):
        return [bound_numbers(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else bound_numbers(v) for k, v in schema.items()}
    kinds = out.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "integer" in kinds or "number" in kinds:
        lower = next((out[k] for k in ("minimum", "exclusiveMinimum") if _is_number(out.get(k))), None)
        upper = next((out[k] for k in ("maximum", "exclusiveMaximum") if _is_number(out.get(k))), None)
        if lower is None:
            out["minimum"] = min(upper if upper is not None else 0, 0) - NUMBER_BOUND
        if upper is None:
            out["maximum"] = max(lower if lower is not None else 0, 0) + NUMBER_BOUND
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def any_json_object() -> dict:
    """Any JSON object, as a schema whose numbers are bounded (xgrammar's built-in "any JSON" is not)."""
    value = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
                       {"type": "array", "items": {"$ref": "#/$defs/value"}},
                       {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}]}
    return {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}, "$defs": {"value": value}}


def check_schema(schema) -> str:
    """A JSON schema (object or JSON text) within the bounds, as canonical JSON text with its numbers bounded."""
    if isinstance(schema, str):
        if len(schema.encode()) > MAX_SCHEMA_BYTES:
            raise InputError(f"JSON schema larger than {MAX_SCHEMA_BYTES // 1024} KiB")
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InputError(f"JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InputError(f"a JSON schema must be an object, got {type(schema).__name__}")
    _depth(schema)
    if len(json.dumps(schema).encode()) > MAX_SCHEMA_BYTES:
        raise InputError(f"JSON schema larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    return json.dumps(bound_numbers(schema))


def compile_constraint(tokenizer, config, *, ebnf: str | None = None, schema=None, json_object: bool = False,
                       strict: bool = True, indent: int | None = None, stop_ids=None,
                       allowed: tuple[str, ...] = ()) -> Constraint:
    """Exactly one of: an EBNF grammar (xgrammar's GBNF dialect, root rule `root`), a JSON schema, or any JSON
    object (`json_object`). JSON comes on one line with `", "` and `": "` separators, or pretty-printed with
    `indent` spaces (0..8); no other whitespace is allowed. `stop_ids` end the reply once the grammar is complete
    (default: the tokenizer's chat format's); `allowed` are the control tokens an EBNF grammar may write."""
    if sum((ebnf is not None, schema is not None, json_object)) != 1:
        raise ValueError("give exactly one of ebnf, schema, json_object")
    if indent is not None and (isinstance(indent, bool) or not isinstance(indent, int)
                               or not 0 <= indent <= MAX_INDENT):
        raise InputError(f"indent = {indent!r}: must be an integer between 0 and {MAX_INDENT}")
    vocab_size = max(config.vocab_size, tokenizer.vocab_size)
    if stop_ids is None:
        from .formats import format_for

        stop_ids = format_for(tokenizer).stop_ids
    stops = tuple(sorted(stop_ids))
    c = compiler(tokenizer, vocab_size, stops, tuple(sorted(allowed)) if ebnf is not None else ())
    if ebnf is not None:
        if len(ebnf.encode()) > MAX_SCHEMA_BYTES:
            raise InputError(f"grammar larger than {MAX_SCHEMA_BYTES // 1024} KiB")
        compiled = _compile(c.compile_grammar, ebnf)
    else:
        text = check_schema(any_json_object() if json_object else schema)
        compiled = _compile(c.compile_json_schema, text, strict_mode=strict and not json_object,
                             any_whitespace=False, indent=indent)
    return Constraint(compiled, vocab_size)


def from_response_format(tokenizer, config, rf: dict, indent: int | None = None, stop_ids=None) -> Constraint | None:
    """OpenAI `response_format`: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}};
    `indent` asks for pretty-printed JSON."""
    if not isinstance(rf, dict):
        raise InputError("response_format must be an object")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return compile_constraint(tokenizer, config, json_object=True, indent=indent, stop_ids=stop_ids)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InputError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return compile_constraint(tokenizer, config, schema=spec["schema"], strict=spec.get("strict") is not False,
                                  indent=indent, stop_ids=stop_ids)
    raise InputError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def from_ollama_format(tokenizer, config, fmt, indent: int | None = None, stop_ids=None) -> Constraint | None:
    """Ollama `format`: "json" or a JSON schema object."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return compile_constraint(tokenizer, config, json_object=True, indent=indent, stop_ids=stop_ids)
    if isinstance(fmt, dict):
        return compile_constraint(tokenizer, config, schema=fmt, indent=indent, stop_ids=stop_ids)
    raise InputError('format must be "json" or a JSON schema object')
