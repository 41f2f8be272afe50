"""The `gemrun` command line: results on stdout, progress and statistics on stderr.

torch and the model code are imported inside the commands that need them, so `gemrun --help`, `gemrun info` and
argument errors answer at once."""

from __future__ import annotations

import sys

from ..errors import GemrunError
from . import measure, models, run  # noqa: F401  (each registers its commands on the app)
from .common import app, err

__all__ = ["app", "main"]

ORDER = ["generate", "chat", "serve", "bench", "perplexity", "quality", "tokenize", "convert", "make-random", "info"]
app.registered_commands.sort(key=lambda c: ORDER.index(c.name or c.callback.__name__))  # --help lists them so


def main() -> None:
    try:
        app()
    except GemrunError as e:
        from rich.markup import escape

        err.print(f"[red]error:[/red] {escape(str(e))}")  # messages may quote brackets (paths, collectives' errors)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
