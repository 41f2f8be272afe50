"""Chat templates (jinja2) rendered in a sandbox with a time limit and an output cap: a checkpoint's template is
untrusted input."""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateError

MAX_OUTPUT = 4 << 20  # characters a template may produce
TIME_LIMIT = 2.0  # seconds a template may run


class _Env(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on `*` / `**` so `'a' * 10**9` cannot exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateError("chat template: exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise TemplateError("chat template: repetition too large")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


_ENV = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: time.strftime(fmt))
_ENV.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    try:
        return _ENV.from_string(source)
    except JinjaError as e:
        raise TemplateError(f"chat template does not compile: {e}") from None


class ChatTemplate:
    """A sandboxed jinja chat template."""

    def __init__(self, source: str):
        self.source = source
        self.template = _compile(source)

    def render(self, messages: list[dict], bos_token: str = "<bos>", eos_token: str = "<eos>",
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render with a time limit and an output cap (a trace hook stops loops that print nothing)."""
        deadline = time.monotonic() + TIME_LIMIT

        def tracer(frame, event, arg):
            if time.monotonic() > deadline:
                raise TemplateError(f"chat template ran longer than {TIME_LIMIT} s")
            return tracer

        out, size = [], 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in self.template.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt, **extra):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateError(f"chat template output exceeds {MAX_OUTPUT} characters")
                out.append(chunk)
        except TemplateError:
            raise
        except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)
        return "".join(out)
