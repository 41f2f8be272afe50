"""Gemma 4's chat format: Google's template (shipped verbatim as templates/gemma4.jinja, for checkpoints that
carry none), a native system role, thinking (`<|channel>thought\\n...<channel|>` before the answer), native tool
tokens (`gemma4_calls.py`), and image / audio / video placeholders expanded as `Gemma4UnifiedProcessor` does.

Thinking output: every `<|channel>` (and its `thought` name line) opens reasoning up to the next `<channel|>`. A
prompt may already have opened the channel: after a tool response with thinking on, the template ends the prompt
with `<|channel>thought\\n`, so the output starts inside the reasoning (`opens_in_thought`). With thinking off it
ends with an empty `<|channel>thought\\n<channel|>` and the output is plain answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from ..errors import InputError
from .base import ChatFormat, Rendered
from .gemma4_calls import CALL_TOKENS, Gemma4ToolStreamParser, parse_gemma4_tool_calls, tool_grammar
from .messages import MediaSlot, normalize_tool_choice, validate_tools
from .stream import Events, Trimmed, prefix_tail

# Google's template (google/gemma-4-31B-it chat_template.jinja, "Published: 2026-07-09"; the 12B and 26B ship the
# same bytes).
GEMMA4_TEMPLATE = resources.files("gemrun").joinpath("templates/gemma4.jinja").read_text(encoding="utf-8")
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
HEADER = "thought"  # the channel's name, then an optional newline, right after CHANNEL_OPEN
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = "<|image|>", "<|video|>", "<|audio|>"
BOI, EOI, BOA, EOA = "<|image>", "<image|>", "<|audio>", "<audio|>"
PLAIN_ROLES = ("system", "developer", "user", "assistant")  # the roles `Gemma4Format.native` writes


def strip_thinking(text: str) -> str:
    """A past model turn without its thoughts, exactly as the template's `strip_thinking` macro does it (split on
    `<channel|>`, drop what follows a `<|channel>` in each piece, trim). It runs before escaping, which would
    otherwise hide the markers from the template's own copy of it."""
    return "".join(part.split(CHANNEL_OPEN)[0] for part in text.split(CHANNEL_CLOSE)).strip()


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
    """(reasoning, answer) of a model output, each stripped. An unclosed channel is reasoning to the end; a stray
    `<channel|>` outside a channel is dropped. `in_thought`: the prompt already opened the channel."""
    reasoning, content = [], []
    pos, thought, start = 0, in_thought, -1
    while True:
        if thought:
            end = text.find(CHANNEL_CLOSE, pos)
            if end < 0:
                reasoning.append(text[pos:])
                break
            reasoning.append(text[pos:end])
            pos, thought = end + len(CHANNEL_CLOSE), False
        else:
            if start < pos:  # the next opening is found once, not again after each stray close (linear time)
                start = text.find(CHANNEL_OPEN, pos)
                start = len(text) if start < 0 else start
            stray = text.find(CHANNEL_CLOSE, pos, start)
            if stray >= 0:
                content.append(text[pos:stray])
                pos = stray + len(CHANNEL_CLOSE)
                continue
            content.append(text[pos:start])
            if start == len(text):
                break
            pos, thought = _skip_header(text, start + len(CHANNEL_OPEN)), True
    return "".join(reasoning).strip(), "".join(content).strip()


class ThinkingSplitter:
    """Push text deltas, get ("reasoning", str) and ("content", str) events (the thought channel and the answer,
    each stripped). Channel markers never reach either stream: a tail that could be the start of a marker (or of
    the `thought` name) is held until the next push. Each push scans only the text it holds once."""

    def __init__(self, in_thought: bool = False):
        self.buf = ""
        self.mode = "thought" if in_thought else "content"  # "content" | "header" | "thought"
        self.streams = {"reasoning": Trimmed("reasoning"), "content": Trimmed("content")}

    def push(self, text: str) -> Events:
        self.buf += text
        events: Events = []
        pos, start = 0, -1
        while True:
            if self.mode == "header":
                rest = self.buf[pos:]
                if len(rest) <= len(HEADER) and (HEADER + "\n").startswith(rest):
                    break  # "thou", "thought": the name line may still be arriving
                pos, self.mode = _skip_header(self.buf, pos), "thought"
            if self.mode == "thought":
                end = self.buf.find(CHANNEL_CLOSE, pos)
                if end < 0:
                    keep = prefix_tail(self.buf, CHANNEL_CLOSE)
                    self._emit("reasoning", self.buf[pos:max(pos, len(self.buf) - keep)], events)
                    pos = max(pos, len(self.buf) - keep)
                    break
                self._emit("reasoning", self.buf[pos:end], events)
                pos, self.mode = end + len(CHANNEL_CLOSE), "content"
                continue
            if start < pos:  # found once per push, not again after each stray close (linear time)
                start = self.buf.find(CHANNEL_OPEN, pos)
                start = len(self.buf) if start < 0 else start
            stray = self.buf.find(CHANNEL_CLOSE, pos, start)
            if stray >= 0:
                self._emit("content", self.buf[pos:stray], events)
                pos = stray + len(CHANNEL_CLOSE)
                continue
            if start == len(self.buf):
                keep = max(prefix_tail(self.buf, CHANNEL_OPEN), prefix_tail(self.buf, CHANNEL_CLOSE))
                self._emit("content", self.buf[pos:max(pos, len(self.buf) - keep)], events)
                pos = max(pos, len(self.buf) - keep)
                break
            self._emit("content", self.buf[pos:start], events)
            pos, self.mode = start + len(CHANNEL_OPEN), "header"
        self.buf = self.buf[pos:]
        return events

    def finish(self) -> Events:
        """Flush what is held: a partial marker is text of the current stream; trailing whitespace is dropped."""
        events: Events = []
        pos = _skip_header(self.buf, 0) if self.mode == "header" else 0
        self.mode = "thought" if self.mode == "header" else self.mode
        self._emit("reasoning" if self.mode == "thought" else "content", self.buf[pos:], events)
        self.buf = ""
        for s in self.streams.values():
            s.end()
        return events

    def _emit(self, kind: str, text: str, events: Events) -> None:
        self.streams[kind].emit(text, events)


def parse_gemma4_output(text: str, tools: list | None = None,
                        in_thought: bool = False) -> tuple[str, str, list[dict]]:
    """A whole Gemma 4 reply -> (reasoning, content, tool calls): the thought channel is split off first (calls
    inside the reasoning stay reasoning), then calls are taken from the answer."""
    reasoning, answer = split_thinking(text, in_thought)
    content, calls = parse_gemma4_tool_calls(answer, tools)
    return reasoning, content, calls


class Gemma4OutputParser:
    """Incremental `parse_gemma4_output`: push decoded text deltas (special tokens kept), get ("reasoning", str),
    ("content", str) and ("tool_call", dict) events; `finish()` at the end of generation. Pass
    `parse_tools=False` to leave tool calls unparsed (they stay content)."""

    def __init__(self, tools: list | None = None, in_thought: bool = False, parse_tools: bool = True):
        self.thinking = ThinkingSplitter(in_thought)
        self.calls = Gemma4ToolStreamParser(tools) if parse_tools else None

    def push(self, text: str) -> Events:
        return self._route(self.thinking.push(text), final=False)

    def finish(self) -> Events:
        return self._route(self.thinking.finish(), final=True)

    def _route(self, events: Events, final: bool) -> Events:
        out: Events = []
        for kind, text in events:
            if kind == "content" and self.calls is not None:
                out += self.calls.push(text)
            else:
                out.append((kind, text))
        if final and self.calls is not None:
            out += self.calls.finish()
        return out


def native_tools(tools: list | None, tool_choice: Any = "auto") -> list[dict] | None:
    """The `tools` to hand the template, which declares tools itself: the validated list, or None when there are
    none or tool_choice is "none". Messages need no rewriting: `tool_calls` and `role: tool` messages go to the
    template as they are (`normalize_messages` checks them). The template has no way to force a call, so
    "required" and a named function are only honoured by constraining decoding."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    return tools if tools and choice != "none" else None


_PLACEHOLDER = re.compile("|".join(re.escape(t) for t in (IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN)))
_KINDS = {IMAGE_TOKEN: "image", AUDIO_TOKEN: "audio", VIDEO_TOKEN: "video"}


def _slot_text(slot: MediaSlot) -> str:
    if slot.kind == "image":
        return BOI + IMAGE_TOKEN * slot.tokens + EOI
    if slot.kind == "audio":
        return BOA + AUDIO_TOKEN * slot.tokens + EOA
    # a video: its frames only (the reference puts no audio in a video's expansion)
    frame = BOI + VIDEO_TOKEN * slot.tokens + EOI
    return " ".join(f"{t} {frame}" for t in slot.timestamps)


def expand_media(text: str, slots: Sequence[MediaSlot]) -> str:
    """The rendered prompt with its `<|image|>`, `<|audio|>` and `<|video|>` placeholders replaced, in order, by
    each item's soft-token run (replace_image_token / replace_audio_token / replace_video_token of
    `Gemma4UnifiedProcessor`). Each kind's placeholder count must equal its item count."""
    found = [_KINDS[t] for t in _PLACEHOLDER.findall(text)]
    queues: dict[str, list[MediaSlot]] = {"image": [], "audio": [], "video": []}
    for slot in slots:
        queues[slot.kind].append(slot)
    for kind, items in queues.items():
        if found.count(kind) != len(items):
            token = next(t for t, k in _KINDS.items() if k == kind)
            raise InputError(f"the prompt has {found.count(kind)} {token} placeholders for {len(items)} items")
    iters = {kind: iter(items) for kind, items in queues.items()}
    return _PLACEHOLDER.sub(lambda m: _slot_text(next(iters[_KINDS[m.group()]])), text)


class Gemma4Format(ChatFormat):
    name = "gemma4"
    title = "Gemma 4"
    default_template = GEMMA4_TEMPLATE
    keep_special = True  # the thought channel and tool calls are control tokens
    thinking = True
    end_of_turn = ("<turn|>", "<|tool_response>")
    call_tokens = CALL_TOKENS
    past_reply = staticmethod(strip_thinking)

    def render(self, messages, add_generation_prompt=True, *, media_kinds=(), tools=None, tool_choice=None,
               think=None) -> Rendered:
        media = {kind: [] for kind in media_kinds}
        extra: dict[str, Any] = {}
        if think is not None:
            extra["enable_thinking"] = bool(think)
        declared = native_tools(tools, tool_choice or "auto") if tools else None
        if declared:
            extra["tools"] = declared
        text = self.render_template(messages, add_generation_prompt, media, **extra)
        return Rendered(text, media, opens_in_thought(text))

    def native(self, messages, add_generation_prompt, bos, extra):
        """Google's template's text for a conversation of plain text turns (system or developer first, user,
        assistant; no tools, tool turns, reasoning fields or content parts), the same bytes (tests/test_template4.py
        holds it to the template and to transformers) in one pass: the sandboxed render of 10 turns took ~1.5 ms,
        growing with the conversation, on every request."""
        if set(extra) - {"enable_thinking"} or any(
                len(m) != 2 or m["role"] not in PLAIN_ROLES or not isinstance(m["content"], str) for m in messages):
            return None
        think, turns, out = bool(extra.get("enable_thinking")), messages, [bos]
        system = messages[0]["role"] in ("system", "developer")
        if think or system:
            out.append("<|turn>system\n" + ("<|think|>\n" if think else ""))
            if system:
                out.append(messages[0]["content"].strip())
                turns = messages[1:]
            out.append("<turn|>\n")
        for i, m in enumerate(turns):
            model = m["role"] == "assistant"
            if not (model and i and turns[i - 1]["role"] == "assistant"):  # consecutive replies are one model turn
                out.append("<|turn>" + ("model" if model else m["role"]) + "\n")
            out.append(strip_thinking(m["content"]) if model else m["content"].strip())
            if not (model and i + 1 < len(turns) and turns[i + 1]["role"] == "assistant"):
                out.append("<turn|>\n")
        if add_generation_prompt:
            out.append("<|turn>model\n" + ("" if think else "<|channel>thought\n<channel|>"))
        return "".join(out)

    def expand_media(self, text, slots):
        return expand_media(text, slots) if slots else text

    def reply_parser(self, tools=None, in_thought=False):
        return Gemma4OutputParser(tools, in_thought=in_thought, parse_tools=bool(tools))

    def tool_grammar(self, tools, choice, in_thought=False):
        return tool_grammar(tools, choice, in_thought)
