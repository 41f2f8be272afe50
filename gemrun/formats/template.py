"""Chat templates (jinja2): a checkpoint's template is untrusted code. It is parsed here (syntax errors surface at
once), then compiled and rendered by the sandbox (`sandbox.py`) in a separate small worker process whose address
space is capped at `MEMORY_LIMIT`, with a time limit and an output cap: no template can exhaust this process's
memory or hang it. A worker that fails is replaced."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
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
            request = json.dumps({"source": source, "context": context}, ensure_ascii=False) + "\n"
        except (TypeError, ValueError) as e:
            raise TemplateError(f"chat template input is not JSON: {e}") from None
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen(  # -I: isolated, only jinja2 from site-packages is needed
                    [sys.executable, "-I", str(Path(sandbox.__file__)), str(MEMORY_LIMIT)], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
            proc, reply, error = self.proc, [], None
            reader = threading.Thread(target=lambda: reply.append(proc.stdout.readline()), daemon=True)
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
                reader.start()
                reader.join(TIME_LIMIT + 10)  # its own limit stops it first; this catches a worker stuck anyway
            except (OSError, ValueError):
                error = "the chat template worker stopped"
            if error is None and (not reply or not reply[0]):
                error = "chat template ran out of time or memory"
            if error is None:
                try:
                    answer = json.loads(reply[0])
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
