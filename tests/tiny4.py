"""A Gemma 4 test tokenizer: the real Gemma 3 270M vocabulary (embedded GGUF) with Gemma 4's special tokens put at
their real ids, over `<unusedN>` control tokens of Gemma 3 (Gemma 3's `<start_of_turn>` / `<end_of_turn>` at 105 /
106 and `<start_of_image>` / `<end_of_image>` at 255999 / 256000 give way too). Ordinary text tokenizes as Gemma 3
does, which the chat-format tests do not depend on; every control token the Gemma 4 template writes has its real id.
"""

from __future__ import annotations

import functools
from pathlib import Path

from gemrun.tokenizer import Tokenizer
from gemrun.weights.random import GEMMA4_SPECIALS, gemma4_stand_in_metadata

# Google's template (google/gemma-4-31B-it chat_template.jinja, "Published: 2026-07-09"; the 12B ships the same
# bytes) is gemrun's built-in copy; its published sha256 pins it to Google's file.
REFERENCE_SHA256 = "ae53464bf3be25802b3a5b37def7fd89667067d7577049b3b2d74c4d8de4c6d4"
REFERENCE_TEMPLATE = (Path(__file__).parents[1] / "gemrun" / "templates" / "gemma4.jinja").read_text(encoding="utf-8")

SPECIALS = GEMMA4_SPECIALS  # id -> token, from ../shared/reference/gemma-facts.md sections 4.5 and 5


@functools.cache
def gemma4_tokenizer(with_template: bool = False) -> Tokenizer:
    """The tokenizer (built once per process; gemrun caches the backend on disk). `with_template` attaches the
    reference template as the checkpoint's own, else the tokenizer carries none (gemrun's built-in applies)."""
    from gemrun.tokenizer import from_gguf_metadata

    meta = gemma4_stand_in_metadata(REFERENCE_TEMPLATE if with_template else None)
    return from_gguf_metadata(meta)


def hf_tokenizer():
    """transformers' fast tokenizer over a copy of the same backend, with the reference template."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    backend = Backend.from_str(gemma4_tokenizer().backend.to_str())
    backend.encode_special_tokens = False
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=REFERENCE_TEMPLATE)
