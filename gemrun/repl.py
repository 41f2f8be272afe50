"""`gemrun chat`'s interactive loop, behaving like Ollama's: Ctrl-C stops a reply and keeps the conversation, at
an idle prompt it only says how to leave (twice in a row leaves); /help lists the commands; /save and /load keep
a conversation in a JSON file; an error is printed and the loop goes on."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import GemrunError

HELP = """Commands:
  /help, /?            this list
  /system TEXT         set the system prompt (clears the conversation); /system alone removes it
  /image PATH          attach an image to the next message
  /reset, /clear       forget the conversation
  /save FILE           save the conversation (JSON)
  /load FILE           load a saved conversation
  /bye, /quit, /exit   leave (or Ctrl-D)
End a line with \\ to continue the message on the next line. Ctrl-C stops a reply."""


class Conversation:
    """The messages so far, the system prompt, and media waiting for the next user message."""

    def __init__(self, system: str | None = None, images: list[str] = (), audio: list[str] = (),
                 videos: list[str] = ()):
        self.system, self.history = system, []
        self.images, self.audio, self.videos = list(images), list(audio), list(videos)

    def messages(self, text: str) -> list[dict]:
        """The whole conversation with `text` (and any pending media) as the new user turn."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [
            user_message(text, self.images, self.audio, self.videos)]

    def add(self, user: dict, reply: str) -> None:
        self.history += [user, {"role": "assistant", "content": reply}]
        self.drop_media()

    def drop_media(self) -> None:
        self.images, self.audio, self.videos = [], [], []

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"system": self.system, "messages": self.history}, ensure_ascii=False, indent=1))

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GemrunError(f"cannot load a conversation from {path}: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                                                     for m in messages):
            raise GemrunError(f"{path} is not a saved conversation (a JSON object with 'messages')")
        system = data.get("system")
        self.system = system if isinstance(system, str) else None
        self.history = messages


def user_message(text: str, images: list[str], audio: list[str] = (), videos: list[str] = ()) -> dict:
    """A user turn; images and videos go before the text (Gemma's documented order), audio after it."""
    if not (images or audio or videos):
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images),
                                        *({"type": "video", "video": p} for p in videos),
                                        {"type": "text", "text": text},
                                        *({"type": "audio", "audio": p} for p in audio)]}


class Repl:
    """`reply(messages)` yields ("content" | "reasoning", text) events of one answer; `done()` reports after it."""

    def __init__(self, conversation: Conversation, reply: Callable[[list[dict]], Iterator[tuple[str, Any]]],
                 done: Callable[[], None], err: Console, reads_images: bool, read: Callable[[str], str] = input):
        self.conv, self.reply, self.done, self.err = conversation, reply, done, err
        self.reads_images, self.read = reads_images, read

    def answer(self, text: str) -> None:
        """Stream one reply to stdout (thoughts dimmed on stderr); Ctrl-C stops it and keeps what was said."""
        messages = self.conv.messages(text)
        pieces: list[str] = []
        events = None
        try:
            events = self.reply(messages)
            for kind, piece in events:
                if kind == "reasoning":
                    self.err.print(piece, style="dim", end="")
                    continue
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            if events is not None:
                events.close()
            sys.stdout.write("\n")
            self.err.print("[dim](stopped)[/dim]")
        else:
            sys.stdout.write("\n")
            self.done()
        self.conv.add(messages[-1], "".join(pieces))

    def line(self) -> str | None:
        """One message from the prompt (lines ending in \\ continue it); None at end of input."""
        lines = []
        try:
            line = self.read(">>> ")
            while line.endswith("\\"):
                lines.append(line[:-1])
                line = self.read("... ")
        except EOFError:
            return None
        return "\n".join([*lines, line]).strip()

    def command(self, text: str) -> bool:
        """Run a /command; False when it ends the session."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/bye", "/quit", "/exit"):
            return False
        if name in ("/help", "/?"):
            self.err.print(HELP, markup=False)
        elif name in ("/reset", "/clear"):
            self.conv.history.clear()
            self.err.print("[dim]conversation cleared[/dim]")
        elif name == "/system":
            self.conv.system, self.conv.history = arg or None, []
            self.err.print(f"[dim]system prompt {'set' if arg else 'cleared'}; conversation cleared[/dim]")
        elif name == "/image":
            if not arg:
                self.err.print("[red]usage:[/red] /image PATH")
            elif not self.reads_images:
                self.err.print("[red]error:[/red] this model is text-only and cannot read images")
            else:
                self.conv.images.append(arg)
                self.err.print(f"[dim]image {arg} attached to the next message[/dim]")
        elif name in ("/save", "/load"):
            if not arg:
                self.err.print(f"[red]usage:[/red] {name} FILE")
            elif name == "/save":
                self.conv.save(Path(arg).expanduser())
                self.err.print(f"[dim]conversation saved to {arg}[/dim]")
            else:
                self.conv.load(Path(arg).expanduser())
                self.err.print(f"[dim]loaded {len(self.conv.history)} messages from {arg}[/dim]")
        else:
            self.err.print(f"[red]unknown command {name}[/red]; /help lists them")
        return True

    def run(self) -> None:
        self.err.print("[dim]gemrun chat: /help for commands, /bye or Ctrl-D to leave[/dim]")
        interrupted = False
        while True:
            try:
                text = self.line()
            except KeyboardInterrupt:
                if interrupted:
                    return
                interrupted = True
                self.err.print("\n[dim](Ctrl-C again, /bye or Ctrl-D to leave)[/dim]")
                continue
            interrupted = False
            if text is None:
                return
            if not text:
                continue
            try:
                if text.startswith("/"):
                    if not self.command(text):
                        return
                else:
                    self.answer(text)
            except GemrunError as e:
                self.err.print(f"[red]error:[/red] {e}")
                self.conv.drop_media()  # a bad attachment must not fail every message after it
            except Exception as e:  # noqa: BLE001 - the session goes on whatever one message did
                self.err.print(f"[red]error:[/red] {type(e).__name__}: {e}")
                self.conv.drop_media()
