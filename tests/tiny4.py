"""A Gemma 4 test tokenizer: the real Gemma 3 270M vocabulary (embedded GGUF) with Gemma 4's special tokens put at
their real ids, over `<unusedN>` control tokens of Gemma 3 (Gemma 3's `<start_of_turn>` / `<end_of_turn>` at 105 /
106 and `<start_of_image>` / `<end_of_image>` at 255999 / 256000 give way too). Ordinary text tokenizes as Gemma 3
does, which the chat-format tests do not depend on; every control token the Gemma 4 template writes has its real id.
"""

from __future__ import annotations

import functools
from pathlib import Path

from gemrun.tokenizer import CONTROL, Tokenizer

REFERENCE_TEMPLATE = (Path(__file__).parent / "data" / "gemma4_chat_template.jinja").read_text(encoding="utf-8")

# id -> token, from ../shared/reference/gemma-facts.md sections 4.5 and 5
SPECIALS = {
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>", 255999: "<|image>", 256000: "<|audio>", 258880: "<|image|>",
    258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>",
}


@functools.cache
def gemma4_tokenizer(with_template: bool = False) -> Tokenizer:
    """The tokenizer (built once per process; gemrun caches the backend on disk). `with_template` attaches the
    reference template as the checkpoint's own, else the tokenizer carries none (gemrun's built-in applies)."""
    from gemrun.api import default_model_path
    from gemrun.tokenizer import from_gguf_metadata
    from gemrun.weights.gguf import GGUFFile

    meta = dict(GGUFFile(default_model_path()).metadata)
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    for i, token in SPECIALS.items():
        tokens[i], types[i] = token, CONTROL
    meta.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                 "tokenizer.ggml.add_bos_token": False,  # the IT tokenizer: the template writes <bos>
                 "tokenizer.chat_template": REFERENCE_TEMPLATE if with_template else None})
    return from_gguf_metadata(meta)


def hf_tokenizer():
    """transformers' fast tokenizer over a copy of the same backend, with the reference template."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    backend = Backend.from_str(gemma4_tokenizer().backend.to_str())
    backend.encode_special_tokens = False
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=REFERENCE_TEMPLATE)
