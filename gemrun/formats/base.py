"""The protocol every model family's chat format implements (`ChatFormat`), with what they share: sandboxed
template rendering of checked messages, prompt ids, stop tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InputError
from ..tokenizer import Tokenizer
from .messages import MediaSlot, escape_tree, normalize_messages
from .stream import Events
from .template import ChatTemplate


class ReplyParser(Protocol):
    """Decoded reply text in (deltas), ("content" | "reasoning", str) and ("tool_call", dict) events out."""

    def push(self, text: str) -> Events: ...

    def finish(self) -> Events: ...


@dataclass
class Rendered:
    """A rendered prompt: its text (media still as one placeholder each), the media sources per kind in prompt
    order, and whether the reply starts inside the reasoning channel."""

    text: str
    media: dict[str, list] = field(default_factory=dict)
    in_thought: bool = False


class ChatFormat:
    """How one model family talks: messages -> prompt text and ids, the tokens that end a reply, the reply split
    into content / reasoning / tool-call events, the grammar that forces a tool call, and media placeholders."""

    name = ""
    title = ""  # the family's name in messages
    default_template = ""
    keep_special = False  # replies carry syntax in control tokens: decode them with those tokens kept
    thinking = False  # the format has a thinking switch
    end_of_turn: tuple[str, ...] = ()  # tokens besides <eos> that end a reply
    call_tokens: tuple[str, ...] = ()  # control tokens a forced tool call writes (its grammar may emit them)

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None = None):
        self.tokenizer = tokenizer
        self.template = template or ChatTemplate(tokenizer.chat_template or self.default_template)
        self.builtin = self.template.source == self.default_template  # the family's own template, byte for byte

    # --- prompt side ---
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, *,
               media_kinds: Sequence[str] = (), tools: list[dict] | None = None, tool_choice: Any = None,
               think: bool | None = None) -> Rendered:
        """Messages (OpenAI-style) -> the prompt; media parts of a kind outside `media_kinds` are refused.
        `tools` are declared to the model unless `tool_choice` is "none"; `think` switches thinking."""
        raise NotImplementedError

    def render_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                        media: dict[str, list] | None = None, **extra: Any) -> str:
        """The template's text for checked, escaped messages; media sources go to `media` (kind -> list).
        `extra` reaches the template (a `tools` list is escaped first)."""
        media = media if media is not None else {}
        tok = self.tokenizer
        if extra.get("tools") is not None:
            extra["tools"] = escape_tree(extra["tools"], tok, "tools")
        msgs = normalize_messages(messages, tok, media.get("image"), media.get("audio"), media.get("video"),
                                  past_reply=self.past_reply)
        bos = tok.id_to_token(tok.bos_id) or "<bos>"
        if self.builtin and (text := self.native(msgs, add_generation_prompt, bos, extra)) is not None:
            return text
        return self.template.render(msgs, bos_token=bos, eos_token=tok.id_to_token(tok.eos_id) or "<eos>",
                                    add_generation_prompt=add_generation_prompt, **extra)

    def native(self, messages: list[dict], add_generation_prompt: bool, bos: str, extra: dict) -> str | None:
        """The family's own template's text written directly for the checked messages it covers (None: render
        the template). Used only while that template is the one in use."""
        return None

    past_reply = None  # rewrites past assistant text before escaping (None: kept as written)

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids: the template's control-token spellings become control tokens, user text stays
        text. The template writes <bos> itself, so none is added."""
        return self.tokenizer.encode_template(text)

    def expand_media(self, text: str, slots: Sequence[MediaSlot]) -> str:
        """The prompt with each media placeholder replaced by its soft-token run."""
        if slots:
            raise InputError(f"{self.title} prompts take no media")
        return text

    @property
    def stop_ids(self) -> set[int]:
        """<eos> and the end-of-turn tokens present in the vocabulary."""
        ids = {self.tokenizer.eos_id} | {self.tokenizer.specials.get(t) for t in self.end_of_turn}
        return ids - {None}

    # --- reply side ---
    def reply_parser(self, tools: list[dict] | None = None, in_thought: bool = False) -> ReplyParser:
        raise NotImplementedError

    def tool_grammar(self, tools: list[dict], choice: Any, in_thought: bool = False) -> str:
        """GBNF (xgrammar's dialect, root rule `root`) for a reply that is exactly one call: to any declared tool
        ("required") or to the named one. `in_thought`: the prompt left the reasoning channel open."""
        raise InputError(f'tool_choice "required" or a named function is not supported with {self.title} yet; '
                         'use "auto"')
