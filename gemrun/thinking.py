"""Gemma 4 thinking output: `<|channel>thought\\n{reasoning}<channel|>{answer}` split into reasoning and answer.

The text these functions read must be decoded with special tokens kept (`skip_special=False`), since the channel
markers are control tokens. A prompt may already have opened the channel: after a tool response with thinking on,
Google's template ends the prompt with `<|channel>thought\\n`, so the output starts inside the reasoning
(`opens_in_thought` tells). With thinking off it ends with an empty `<|channel>thought\\n<channel|>` and the output
is plain answer.
"""

from __future__ import annotations

__all__ = ["CHANNEL_OPEN", "CHANNEL_CLOSE", "split_thinking", "opens_in_thought", "ThinkingSplitter"]

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
HEADER = "thought"  # the channel's name, then an optional newline, right after CHANNEL_OPEN


def opens_in_thought(prompt: str) -> bool:
    """Whether a rendered prompt leaves a thought channel open, so that generation starts inside the reasoning."""
    i = prompt.rfind(CHANNEL_OPEN)
    return i >= 0 and CHANNEL_CLOSE not in prompt[i:] and "<turn|>" not in prompt[i:]


def _skip_header(text: str, pos: int) -> int:
    if text.startswith(HEADER, pos):
        pos += len(HEADER)
        if text.startswith("\n", pos):
            pos += 1
    return pos


def split_thinking(text: str, in_thought: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a model output, each stripped. Every `<|channel>` (and its `thought` name line)
    opens reasoning up to the next `<channel|>`; an unclosed channel is reasoning to the end; a stray `<channel|>`
    outside a channel is dropped. `in_thought`: the prompt already opened the channel (see `opens_in_thought`)."""
    reasoning, content = [], []
    pos, thought = 0, in_thought
    while True:
        if thought:
            end = text.find(CHANNEL_CLOSE, pos)
            if end < 0:
                reasoning.append(text[pos:])
                break
            reasoning.append(text[pos:end])
            pos, thought = end + len(CHANNEL_CLOSE), False
        else:
            start, stray = text.find(CHANNEL_OPEN, pos), text.find(CHANNEL_CLOSE, pos)
            if stray >= 0 and (start < 0 or stray < start):
                content.append(text[pos:stray])
                pos = stray + len(CHANNEL_CLOSE)
                continue
            if start < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:start])
            pos, thought = _skip_header(text, start + len(CHANNEL_OPEN)), True
    return "".join(reasoning).strip(), "".join(content).strip()


class ThinkingSplitter:
    """Incremental `split_thinking`: push text deltas, get ("reasoning", str) and ("content", str) events whose
    concatenations equal the one-shot result. Channel markers never reach either stream: a tail that could be the
    start of a marker (or of the `thought` name) is held until the next push; trailing whitespace of each stream is
    held until more text follows it (both are stripped, as in the one-shot function)."""

    def __init__(self, in_thought: bool = False):
        self.buf = ""
        self.mode = "thought" if in_thought else "content"  # "content" | "header" | "thought"
        self.started = {"reasoning": False, "content": False}
        self.space = {"reasoning": "", "content": ""}

    def push(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        events: list[tuple[str, str]] = []
        while True:
            if self.mode == "header":
                if len(self.buf) <= len(HEADER) and (HEADER + "\n").startswith(self.buf):
                    return events  # "thou", "thought": the name line may still be arriving
                self.buf, self.mode = self.buf[_skip_header(self.buf, 0):], "thought"
            if self.mode == "thought":
                end = self.buf.find(CHANNEL_CLOSE)
                if end < 0:
                    keep = _prefix_tail(self.buf, CHANNEL_CLOSE)
                    self._emit("reasoning", self.buf[:len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                self._emit("reasoning", self.buf[:end], events)
                self.buf, self.mode = self.buf[end + len(CHANNEL_CLOSE):], "content"
                continue
            start, stray = self.buf.find(CHANNEL_OPEN), self.buf.find(CHANNEL_CLOSE)
            if stray >= 0 and (start < 0 or stray < start):
                self._emit("content", self.buf[:stray], events)
                self.buf = self.buf[stray + len(CHANNEL_CLOSE):]
                continue
            if start < 0:
                keep = max(_prefix_tail(self.buf, CHANNEL_OPEN), _prefix_tail(self.buf, CHANNEL_CLOSE))
                self._emit("content", self.buf[:len(self.buf) - keep], events)
                self.buf = self.buf[len(self.buf) - keep:]
                return events
            self._emit("content", self.buf[:start], events)
            self.buf, self.mode = self.buf[start + len(CHANNEL_OPEN):], "header"

    def finish(self) -> list[tuple[str, str]]:
        """Flush what is held: a partial marker is text of the current stream; trailing whitespace is dropped."""
        events: list[tuple[str, str]] = []
        if self.mode == "header":
            self.buf, self.mode = self.buf[_skip_header(self.buf, 0):], "thought"
        self._emit("reasoning" if self.mode == "thought" else "content", self.buf, events)
        self.buf = ""
        self.space = {"reasoning": "", "content": ""}
        return events

    def _emit(self, kind: str, text: str, events: list) -> None:
        if not self.started[kind]:
            text = text.lstrip()
        text = self.space[kind] + text
        core = text.rstrip()
        self.space[kind] = text[len(core):]
        if core:
            events.append((kind, core))
            self.started[kind] = True


def _prefix_tail(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker` (it may become `marker`)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
