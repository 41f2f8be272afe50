"""Pieces shared by the streaming reply parsers: a marker that may be cut between two text deltas, an output
stream trimmed incrementally (the streaming `str.strip()`), a search for a closing marker outside quoted strings,
and the parser of fenced tool-call blocks that both families' call syntaxes specialise."""

from __future__ import annotations

from typing import Any

Events = list[tuple[str, Any]]  # ("content" | "reasoning", str) or ("tool_call", OpenAI call dict)
MAX_BLOCK = 64 << 10  # characters of a call block we try to parse; longer ones stay content


def prefix_tail(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker` (it may become `marker`)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class Trimmed:
    """One output stream whose concatenated events equal the one-shot text `.strip()`ped: leading whitespace is
    dropped, trailing whitespace is held until more text follows it (and dropped at the end)."""

    def __init__(self, kind: str):
        self.kind, self.started, self.space = kind, False, ""

    def emit(self, text: str, events: Events) -> None:
        if not self.started:
            text = text.lstrip()
        text = self.space + text
        core = text.rstrip()
        self.space = text[len(core):]
        if core:
            events.append((self.kind, core))
            self.started = True

    def end(self) -> None:
        self.space = ""


def find_unquoted(text: str, close: str, quote: str, pos: int, quoted: bool = False) -> tuple[int, int, bool]:
    """(index of the first `close` at or after `pos` outside `quote` pairs, or -1; where a later search over a
    longer `text` may resume; the quote state there). `quoted`: `pos` lies inside a quoted string."""
    while True:
        q = text.find(quote, pos)
        if not quoted:
            c = text.find(close, pos)
            if c >= 0 and (q < 0 or c < q):
                return c, pos, quoted
        if q < 0:  # resume where a marker cut by the end of the text may begin
            return -1, max(pos, len(text) - max(len(quote), len(close)) + 1), quoted
        quoted, pos = not quoted, q + len(quote)


class CallStream:
    """Incremental extraction of tool calls written between an OPEN and a CLOSE marker: push text deltas, get
    ("content", str) and ("tool_call", dict) events.

    Text passes through at once, except a tail that could begin OPEN and trailing whitespace (content is
    stripped, as in the one-shot parsers). A block is held until its closing marker, then becomes calls or, if it
    does not parse, content; a block past `MAX_BLOCK` is streamed as content while its closing marker is sought.
    Subclasses give the markers and `_parse`; `quote` (if any) is a string delimiter inside which CLOSE does not
    count."""

    OPEN = CLOSE = ""
    quote = ""

    def __init__(self, names: set[str] | None = None):
        self.names = names
        self.buf = ""
        self.mode = "text"  # "text" | "block" (held) | "long" (too long to parse, passed through)
        self.scan, self.quoted = 0, False  # where the search for the block's end resumes, and its quote state
        self.content = Trimmed("content")

    def push(self, text: str) -> Events:
        self.buf += text
        events: Events = []
        while True:
            if self.mode == "text":
                start = self.buf.find(self.OPEN)
                if start < 0:
                    keep = prefix_tail(self.buf, self.OPEN)
                    self.content.emit(self.buf[:len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                self.content.emit(self.buf[:start], events)
                self.buf, self.mode = self.buf[start:], "block"
                self.scan, self.quoted = len(self.OPEN), False
            end = self._block_end() if self.mode == "block" else self.buf.find(self.CLOSE)
            if end < 0:
                if self.mode == "block" and len(self.buf) - len(self.OPEN) > MAX_BLOCK + len(self.CLOSE):
                    self.mode = "long"  # the body is already too long, whatever follows
                if self.mode == "long":
                    keep = prefix_tail(self.buf, self.CLOSE)
                    self.content.emit(self.buf[:len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep:]
                return events
            raw, self.buf = self.buf[:end + len(self.CLOSE)], self.buf[end + len(self.CLOSE):]
            parsed = self._parse(raw[len(self.OPEN):end]) if self.mode == "block" else None
            if parsed is None:
                self.content.emit(raw, events)
            events += [("tool_call", c) for c in parsed or []]
            self.mode = "text"

    def finish(self) -> Events:
        """Flush what is held: an unfinished marker or block is content; trailing whitespace is dropped."""
        events: Events = []
        self.content.emit(self.buf, events)
        self.buf, self.mode = "", "text"
        self.content.end()
        return events

    def _block_end(self) -> int:
        """Index in `buf` (which starts with OPEN) of the CLOSE that ends the block, or -1 while none has come;
        each call scans only what arrived since the last."""
        if self.quote:
            end, self.scan, self.quoted = find_unquoted(self.buf, self.CLOSE, self.quote, self.scan, self.quoted)
            return end
        end = self.buf.find(self.CLOSE, self.scan)
        if end < 0:
            self.scan = max(self.scan, len(self.buf) - len(self.CLOSE) + 1)
        return end

    def _parse(self, body: str) -> list[dict] | None:
        raise NotImplementedError


class Passthrough:
    """A reply parser for replies without structure: every delta is content."""

    def push(self, text: str) -> Events:
        return [("content", text)] if text else []

    def finish(self) -> Events:
        return []
