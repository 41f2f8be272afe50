"""Chat formats, one per model family (`gemma3.py`, `gemma4.py`) behind one protocol (`base.ChatFormat`): how
messages become a prompt, which tokens end a reply, how a reply splits into content, reasoning and tool calls,
how a tool call is forced, and how media placeholders expand. No torch, no model, no server here: a new family is
a new file in this package, its model file and its weight names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tokenizer import Tokenizer
from .base import ChatFormat, Rendered, ReplyParser
from .gemma3 import GEMMA3_TEMPLATE, Gemma3Format
from .gemma4 import GEMMA4_TEMPLATE, Gemma4Format
from .messages import MediaSlot, normalize_messages, normalize_tool_choice, validate_tools
from .template import ChatTemplate

__all__ = ["ChatFormat", "ChatTemplate", "GEMMA3_TEMPLATE", "GEMMA4_TEMPLATE", "MediaSlot", "Rendered",
           "ReplyParser", "format_for", "is_gemma4", "normalize_messages", "normalize_tool_choice", "prompt_tokens",
           "render_prompt", "template_for", "validate_tools"]


def is_gemma4(tokenizer: Tokenizer) -> bool:
    """Whether a tokenizer speaks Gemma 4's chat format (`<|turn>` at id 105)."""
    return tokenizer.id_to_token(105) == "<|turn>"


def format_for(tokenizer: Tokenizer, template: ChatTemplate | None = None) -> ChatFormat:
    """The chat format of a tokenizer's family, with the checkpoint's own template when it ships one (or
    `template`), else the family's built-in one."""
    family = Gemma4Format if is_gemma4(tokenizer) else Gemma3Format
    return family(tokenizer, template)


def template_for(tokenizer: Tokenizer) -> ChatTemplate:
    """The checkpoint's own template when it ships one, else the family's built-in template."""
    return format_for(tokenizer).template


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  template: ChatTemplate | None = None, images: list | None = None, audio: list | None = None,
                  videos: list | None = None, **extra: Any) -> str:
    """The template's text for `messages` (media sources appended to `images` / `audio` / `videos`); `extra`
    goes to the template (Gemma 4's reads `tools`, `enable_thinking` and `preserve_thinking`)."""
    media = {k: v for k, v in (("image", images), ("audio", audio), ("video", videos)) if v is not None}
    return format_for(tokenizer, template).render_template(messages, add_generation_prompt, media, **extra)


def prompt_tokens(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  template: ChatTemplate | None = None, **extra: Any) -> list[int]:
    """Messages -> token ids. The template writes `<bos>` itself, so none is added (no double BOS)."""
    return tokenizer.encode_template(render_prompt(tokenizer, messages, add_generation_prompt, template, **extra))
