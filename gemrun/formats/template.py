"""Chat templates (jinja2): a checkpoint's template is untrusted code. It is parsed here (syntax errors surface at
once), then compiled and rendered by the sandbox (`sandbox.py`) in a separate small worker process whose address
space is capped at `MEMORY_LIMIT`, with a time limit and an output cap: no template can exhaust this process's
memory or hang it. A worker that fails is replaced."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import TemplateError
from . import sandbox

MEMORY_LIMIT = 512 << 20  # bytes of address space the render worker may use
MAX_OUTPUT, TIME_LIMIT = sandbox.MAX_OUTPUT, sandbox.TIME_LIMIT


class _Worker:
    """One sandbox process, one JSON request and one JSON reply a line. Renders are serialised; a worker that
    dies, runs over time or answers garbage is killed and replaced."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def render(self, source: str, context: dict) -> str:
        try:
            request = (json.dumps({"source": source, "context": context}, ensure_ascii=False) + "\n").encode()
        except (TypeError, ValueError) as e:
            raise TemplateError(f"chat template input is not JSON: {e}") from None
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(  # -I: isolated, only jinja2 from site-packages is needed
                    [sys.executable, "-I", str(Path(sandbox.__file__)), str(MEMORY_LIMIT)], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            error = None
            try:
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
                # its own limit stops it first; this catches a worker stuck anyway
                reply = _read_line(self.proc.stdout.fileno(), TIME_LIMIT + 10)
            except (OSError, ValueError):
                error = "the chat template worker stopped"
            if error is None and not reply:
                error = "chat template ran out of time or memory"
            if error is None:
                try:
                    answer = json.loads(reply)
                except ValueError:
                    error = "the chat template worker answered garbage"
            if error is not None:
                self.close()
                raise TemplateError(error)
        if "error" in answer:
            raise TemplateError(answer["error"])
        return answer["text"]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _read_line(fd: int, timeout: float) -> bytes:
    """One line from the worker's pipe (read here with select, not by a reader thread per render: ~0.5 ms less
    a render), or b"" when it closes first or `timeout` seconds pass. Its buffered file object is never read, so
    nothing waits there unseen."""
    parts, end = [], time.monotonic() + timeout
    while not parts or not parts[-1].endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        if not (part := os.read(fd, 1 << 20)):
            return b""
        parts.append(part)
    return b"".join(parts)


_worker = _Worker()


class ChatTemplate:
    """A sandboxed jinja chat template."""

    def __init__(self, source: str):
        try:
            sandbox.check_syntax(source)
        except sandbox.SandboxError as e:
            raise TemplateError(str(e)) from None
        self.source = source

    def render(self, messages: list[dict], bos_token: str = "<bos>", eos_token: str = "<eos>",
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """The template's text for JSON-like `messages` and `extra` variables, rendered by the worker."""
        context = {"messages": messages, "bos_token": bos_token, "eos_token": eos_token,
                   "add_generation_prompt": add_generation_prompt, **extra}
        return _worker.render(self.source, context)
