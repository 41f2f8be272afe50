"""Prompt assembly for every caller (Python API, CLI, server): messages and their media -> `Prompt` (token ids,
embeddings with soft tokens in place of media placeholders, blocks of bidirectional attention).

The chat format (`formats`) renders the messages and expands media placeholders; the model's media input
(`Loaded.inputs`: Gemma 3's SigLIP images, Gemma 4's encoder-free images, audio and video) reads, preprocesses
and embeds each item; media are read through one reader (`processing.source`) under the caller's `Sources`
policy (a server's clients may not name local files).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .errors import InputError
from .formats import ChatFormat, MediaSlot
from .generate import Prompt
from .model.multimodal import media_blocks, prompt_embeddings
from .processing.source import LOCAL, MediaRequest, Sources
from .tokenizer import Tokenizer

MAX_VISUAL = 32  # images and videos in one prompt
KINDS = ("image", "audio", "video")


class MediaInput(Protocol):
    """How one family's media reach its model (processing/image.py:Gemma3Images, processing/gemma4.py:
    Gemma4Inputs)."""

    kinds: tuple[str, ...]  # what it reads
    budgets: tuple[int, ...]  # soft tokens an image may be given (empty: fixed)
    vision_ids: tuple[int, ...]  # soft-token ids whose runs attend to each other (an image, a video frame)

    def prepare(self, kind: str, source: Any, request: MediaRequest) -> Any: ...  # an item with a `.slot`

    def embed(self, items: list) -> dict[int, torch.Tensor]: ...  # placeholder id -> soft tokens (M, E)


def media_key(ids: list[int], soft: dict[int, torch.Tensor]) -> list[int]:
    """The prompt as prefix reuse sees it: ids, except that each media placeholder becomes a (negative) hash of
    its soft token, so two prompts share a prefix only as far as their images and audio are the same."""
    key = list(ids)
    for token_id, rows in soft.items():
        at = [i for i, t in enumerate(ids) if t == token_id]
        data = rows.detach().float().cpu().numpy()
        for i, row in zip(at, data):
            key[i] = -1 - int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=7).digest(), "little")
    return key


@dataclass
class PromptBuilder:
    """Messages -> Prompt for one loaded model. `sources` says where its callers' media may come from."""

    model: torch.nn.Module
    format: ChatFormat
    inputs: MediaInput | None = None
    sources: Sources = LOCAL
    max_context: int | None = None  # when set, text whose length alone rules it out is refused before tokenizing

    @property
    def tokenizer(self) -> Tokenizer:
        return self.format.tokenizer

    @property
    def media_kinds(self) -> tuple[str, ...]:
        return self.inputs.kinds if self.inputs is not None else ()

    def check_budget(self, image_tokens: int | None) -> int | None:
        """A soft-token budget per image, checked against what the model's images take (ignored where they take a
        fixed number, as an unknown processor option is)."""
        budgets = self.inputs.budgets if self.inputs is not None else ()
        if image_tokens is None or not budgets:
            return None
        if isinstance(image_tokens, bool) or image_tokens not in budgets:
            raise InputError(f"max_soft_tokens must be one of {budgets}, got {image_tokens!r}")
        return image_tokens

    def check_length(self, text: str) -> None:
        """Refuse text that cannot fit the context whatever it tokenizes to: n bytes are at least
        n / (the longest token's bytes) tokens. Tokenizing megabytes only to refuse them would waste seconds."""
        if self.max_context is None or len(text) < self.max_context:
            return
        least = -(-len(text.encode("utf-8", "surrogatepass")) // self.tokenizer.max_token_bytes)
        if least >= self.max_context:
            raise InputError(f"prompt has at least {least} tokens ({len(text)} characters) but the context holds "
                             f"{self.max_context}")

    def text(self, text: str | Sequence[int], bos: bool = True) -> Prompt:
        """A raw prompt: text (with <bos> when `bos` and the tokenizer asks for it), or token ids as they are."""
        tk = self.tokenizer
        if isinstance(text, str):
            self.check_length(text)
            return Prompt(tk.encode(text, bos=bos and tk.add_bos))
        ids = list(text)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tk.vocab_size for i in ids):
            raise InputError(f"prompt token ids must be integers in 0..{tk.vocab_size - 1}")
        return Prompt(ids)

    @torch.inference_mode()
    def chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, *, tools: list | None = None,
             tool_choice: Any = None, think: bool | None = None, image_tokens: int | None = None,
             pan_and_scan: bool | None = None) -> Prompt:
        """The prompt of a conversation: rendered by the format, media read, preprocessed and embedded."""
        budget = self.check_budget(image_tokens)
        rendered = self.format.render(messages, add_generation_prompt, media_kinds=self.media_kinds, tools=tools,
                                      tool_choice=tool_choice, think=think)
        self.check_length(rendered.text)
        sources = [(kind, src) for kind in KINDS for src in rendered.media.get(kind, ())]
        if not sources:
            return Prompt(self.format.encode(rendered.text), in_thought=rendered.in_thought)
        if sum(kind != "audio" for kind, _ in sources) > MAX_VISUAL:
            raise InputError(f"more than {MAX_VISUAL} images and videos in one prompt")
        request = MediaRequest(self.sources, budget, pan_and_scan)
        items = [self.inputs.prepare(kind, src, request) for kind, src in sources]
        slots: list[MediaSlot] = [item.slot for item in items]
        ids = self.format.encode(self.format.expand_media(rendered.text, slots))
        ids_t = torch.tensor(ids, device=self.model.device)
        soft = self.inputs.embed(items)
        embeds = prompt_embeddings(self.model, ids_t, soft)
        return Prompt(ids, embeds, media_blocks(ids_t, self.inputs.vision_ids), in_thought=rendered.in_thought,
                      key=media_key(ids, soft))
