"""The chat-template sandbox, standalone (the standard library and jinja2 only), because it runs as its own small
process: `python -I sandbox.py LIMIT` caps its address space at LIMIT bytes, then reads one JSON request a line
({"source", "context"}) and answers one JSON line ({"text"} or {"error"}). jinja2's immutable sandbox forbids
unsafe attributes and mutation; here a trace hook adds a time limit, the output is capped, and the memory cap
bounds whatever a template builds (`'a' | center(10**9)`, format widths, joins, concatenation chains), including
the constant expressions jinja2 evaluates while compiling.

The time limit is an interval timer (SIGALRM) where the platform has one: a trace hook, called on every line the
template's code runs, made a long conversation's render ~5x slower (Gemma 4's template, 10 turns: 11 -> 2 ms)."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time

from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT = 4 << 20  # characters a template may produce
MAX_SOURCE = 1 << 20  # characters of a template's source
TIME_LIMIT = 2.0  # seconds a template may run


class SandboxError(Exception):
    """A template that fails, runs too long, writes too much or needs too much memory."""


class _Env(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on `*` / `**` so `'a' * 10**9` fails at once rather than at the memory cap."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, **options):
        super().__init__(**options)
        self._safe: dict[tuple[type, str], bool] = {}  # (type, attribute name) -> jinja2's verdict

    def is_safe_attribute(self, obj, attr, value):
        """jinja2's verdict, which depends only on the object's type and the name (its checks are isinstance tests
        and name sets; `value` is unused), remembered per pair: a 10-turn Gemma 4 render asks ~430 times, and
        asking was 60% of its time. Names a template reads from its data could be many: at most 4,096 kept."""
        key = (type(obj), attr)
        safe = self._safe.get(key)
        if safe is None:
            safe = super().is_safe_attribute(obj, attr, value)
            if len(self._safe) < 4096:
                self._safe[key] = safe
        return safe

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SandboxError("chat template: exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise SandboxError("chat template: repetition too large")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise SandboxError(f"chat template: {message}")


ENV = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: time.strftime(fmt))
ENV.globals.pop("lipsum", None)  # lipsum(10**9): nothing a chat template needs
ENV.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _checked(build, source: str):
    if len(source) > MAX_SOURCE:
        raise SandboxError(f"chat template is longer than {MAX_SOURCE} characters")
    try:
        return build(source)
    except JinjaError as e:
        raise SandboxError(f"chat template does not compile: {e}") from None
    except RecursionError:
        raise SandboxError("chat template is too deeply nested to compile") from None


def check_syntax(source: str) -> None:
    """Parse only: compiling evaluates constant expressions, which belongs under the memory cap."""
    _checked(ENV.parse, source)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    return _checked(ENV.from_string, source)


class _Late(BaseException):
    """Raised by the timer: a BaseException, so no `except Exception` on the way swallows it (and the timer repeats
    until the render has stopped)."""


def _late(signum, frame):
    raise _Late


def _timed(run):
    """run() under the time limit: the interval timer in the main thread where there is one, else a trace hook
    (which also stops loops that print nothing)."""
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGALRM, _late)
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT, 0.05)
        try:
            return run()
        except _Late:
            raise SandboxError(f"chat template ran longer than {TIME_LIMIT} s") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    deadline = time.monotonic() + TIME_LIMIT

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise SandboxError(f"chat template ran longer than {TIME_LIMIT} s")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return run()
    finally:
        sys.settrace(previous)


def render(source: str, context: dict) -> str:
    """Compile and render, with the time limit and the output cap."""

    def run() -> str:
        out, size = [], 0
        for chunk in _compile(source).generate(**context):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise SandboxError(f"chat template output exceeds {MAX_OUTPUT} characters")
            out.append(chunk)
        return "".join(out)

    try:
        return _timed(run)
    except SandboxError:
        raise
    except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError,
            OverflowError) as e:
        raise SandboxError(f"chat template failed: {type(e).__name__}: {e}") from None


def main() -> None:
    limit = int(sys.argv[1])
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # no address-space cap on this platform: the other bounds still apply
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = {"text": render(request["source"], request["context"])}
        except SandboxError as e:
            reply = {"error": str(e)}
        except _Late:  # the timer fired just as a render ended
            reply = {"error": f"chat template ran longer than {TIME_LIMIT} s"}
        except MemoryError:
            reply = {"error": f"chat template needs more than {limit >> 20} MiB"}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": f"bad render request: {e}"}
        sys.stdout.write(json.dumps(reply, ensure_ascii=False) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
