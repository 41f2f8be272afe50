"""Gemma 3's chat format: Google's template (system folded into the first user turn, `assistant` spelled
`model`), tools by Google's prompted convention (declarations in the first user turn, calls as Python in a
```tool_code block, results in ```tool_output blocks: `pycall.py`), images as `<start_of_image>` expanded to
soft tokens as `Gemma3Processor` does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from .base import ChatFormat, Rendered
from .messages import MediaSlot, normalize_tool_choice, validate_tools
from .pycall import ToolStreamParser, render_calls, tool_grammar
from .stream import Passthrough

# Gemma 3 instruction-tuned template, as Google ships it in tokenizer_config.json.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# Google's instructions, reworded; the call example matches what `pycall.parse_tool_calls` accepts.
TOOLS_PROMPT = (
    "You have access to the functions declared below. If you decide to call one or more of them, reply with "
    "the calls as Python, one per line, keyword arguments only, inside a block fenced with ```tool_code, e.g.\n"
    '```tool_code\nfunction_name(param="value", other=2)\n```\n'
    "Call only the functions declared here, and write nothing else in a reply that calls a function. Each "
    "result will come back to you in a ```tool_output block; use it to make further calls or to answer.\n\n"
)


def apply_tools(messages: list[dict], tools: list[dict] | None, tool_choice: Any = "auto") -> list[dict]:
    """OpenAI messages -> messages Gemma 3's template accepts (alternating user/assistant, plus system).

    Assistant `tool_calls` become a ```tool_code block; runs of `tool` messages become one user turn of
    ```tool_output blocks, merged with a neighbouring user turn so that roles still alternate. With tools and a
    choice other than "none", the declarations and instructions open the first user turn (after the system
    message, which the template folds in itself)."""
    tools = validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    if not isinstance(messages, list):
        raise InputError("messages must be a list")
    out: list[tuple[dict, bool]] = []  # (message, holds tool output)
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role is None:
            out.append((m, False))  # not a message: left for normalize_messages to report
            continue
        if role == "tool":
            block = f"```tool_output\n{_text(m.get('content'), f'messages[{i}].content')}\n```"
            msg, merge = {"role": "user", "content": block}, True
        elif role in ("assistant", "model") and m.get("tool_calls"):
            text = _text(m.get("content"), f"messages[{i}].content")
            code = render_calls(m["tool_calls"], f"messages[{i}].tool_calls")
            msg, merge = {"role": "assistant", "content": f"{text}\n\n{code}" if text.strip() else code}, False
        else:
            msg, merge = m, False  # passed through; normalize_messages validates it
        if out and msg.get("role") == "user" and _role(out[-1][0]) == "user" and (merge or out[-1][1]):
            prev = out.pop()[0]
            msg, merge = {"role": "user", "content": _join(prev.get("content"), msg.get("content"))}, True
        out.append((msg, merge))
    result = [m for m, _ in out]
    if not tools or choice == "none":
        return result
    prompt = TOOLS_PROMPT + json.dumps([t["function"] for t in tools], indent=2, ensure_ascii=False)
    if choice == "required":
        prompt += "\n\nYou must call at least one of these functions in your reply."
    elif isinstance(choice, dict):
        prompt += f"\n\nYou must call the function {choice['function']['name']} in your reply."
    first = next((k for k, m in enumerate(result) if _role(m) == "user"), None)
    if first is None:  # no user turn yet: the instructions become one, after any system message
        return result + [{"role": "user", "content": prompt}]
    result[first] = {**result[first], "content": _join(prompt, result[first].get("content"))}
    return result


def _role(m: Any) -> Any:
    return m.get("role") if isinstance(m, dict) else None


def _text(content: Any, where: str) -> str:
    """The text of a tool result or assistant message: a string, None, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise InputError(f"{where} must be a string or a list of text parts")


def _join(a: Any, b: Any) -> Any:
    """Two message contents as one; lists of parts (text, images) stay lists, adjacent texts are merged."""
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n\n{b}"
    pa = [{"type": "text", "text": a}] if isinstance(a, str) else list(a or [])
    pb = [{"type": "text", "text": b}] if isinstance(b, str) else list(b or [])
    if pa and pb and pa[-1].get("type") == "text" and pb[0].get("type") == "text":
        # the template trims and concatenates parts, so keep the paragraph break inside one part
        return pa[:-1] + [{"type": "text", "text": f"{pa[-1]['text']}\n\n{pb[0]['text']}"}] + pb[1:]
    return pa + pb


def image_sequence(tokens_per_image: int) -> str:
    """What one image (or crop) becomes in the prompt text; the newlines merge with their neighbours when the
    whole string is tokenized, as in the reference."""
    return f"\n\n{BOI}{IMAGE_TOKEN * tokens_per_image}{EOI}\n\n"


def expand_images(rendered: str, slots: Sequence[MediaSlot]) -> str:
    """Replace each `<start_of_image>` the template emitted by its full sequence; an image with Pan & Scan crops
    gets the reference's wording around the original and its crops (Gemma3Processor.replace_image_token)."""
    parts = rendered.split(BOI)
    if len(parts) - 1 != len(slots) or any(s.kind != "image" for s in slots):
        raise InputError(f"the prompt has {len(parts) - 1} image placeholders for {len(slots)} images")
    out = [parts[0]]
    for slot, rest in zip(slots, parts[1:]):
        seq = image_sequence(slot.tokens)
        if slot.crops:
            out.append(f"Here is the original image {seq} and here are some crops to help you see better "
                       + " ".join([seq] * slot.crops))
        else:
            out.append(seq)
        out.append(rest)
    return "".join(out)


class Gemma3Format(ChatFormat):
    name = "gemma3"
    title = "Gemma 3"
    default_template = GEMMA3_TEMPLATE
    end_of_turn = ("<end_of_turn>",)

    def render(self, messages, add_generation_prompt=True, *, media_kinds=(), tools=None, tool_choice=None,
               think=None) -> Rendered:
        media = {kind: [] for kind in media_kinds}
        messages = list(messages) if isinstance(messages, tuple) else messages
        messages = apply_tools(messages, tools, tool_choice)  # tool turns become text, with or without tools
        return Rendered(self.render_template(messages, add_generation_prompt, media), media)

    def expand_media(self, text, slots):
        return expand_images(text, slots) if slots else text

    def reply_parser(self, tools=None, in_thought=False):
        return ToolStreamParser(tools) if tools else Passthrough()

    def tool_grammar(self, tools, choice, in_thought=False):
        return tool_grammar(tools, choice)
