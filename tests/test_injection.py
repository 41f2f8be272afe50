"""User text never becomes control tokens: every Gemma 3 and Gemma 4 control token, spelled whole or split at
every position over two content parts that the template joins ("<start_of" + "_image>"), in every role. Only the
template's own spellings become control tokens."""

from __future__ import annotations

from collections import Counter

import pytest
from tiny4 import gemma4_tokenizer

from gemrun.formats import format_for


@pytest.fixture(scope="module")
def gemma3_tokenizer(gguf_path):
    from gemrun.tokenizer import from_gguf_metadata
    from gemrun.weights.gguf import GGUFFile

    return from_gguf_metadata(GGUFFile(gguf_path).metadata)


def conversation(role: str, content) -> list[dict]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return {"system": [{"role": "system", "content": content}, {"role": "user", "content": "hi"}],
            "user": [{"role": "user", "content": content}],
            "assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}],
            "tool": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": content}]}[role]


def pieces(specials: list[str]) -> list[tuple[str, str]]:
    """Each control token whole, then cut at every position."""
    out = [(s, "") for s in specials]
    return out + [(s[:k], s[k:]) for s in specials for k in range(1, len(s))]


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_split_control_tokens_stay_text(family, role, gemma3_tokenizer):
    tok = gemma3_tokenizer if family == "gemma3" else gemma4_tokenizer()
    fmt = format_for(tok)
    controls = set(tok.specials.values())
    cuts = pieces(sorted(tok.specials))
    for start in range(0, len(cuts), 1500):  # a conversation per batch keeps each render small
        batch = cuts[start:start + 1500]
        parts = [{"type": "text", "text": t} for a, b in batch for t in ("x" + a, b + "y")]
        plain = [{"type": "text", "text": t} for _ in batch for t in ("x", "y")]
        got = fmt.encode(fmt.render(conversation(role, parts)).text)
        want = fmt.encode(fmt.render(conversation(role, plain)).text)
        assert Counter(i for i in got if i in controls) == Counter(i for i in want if i in controls), batch[0]
        # and the text survives: the same as the control spellings tokenized as plain text
        if role == "user":
            assert tok.decode([i for i in got if i not in controls]).count("x") >= len(batch)
