"""Chat messages -> prompt tokens through the checkpoint's jinja template (sandboxed) or Gemma 3's built-in one.

User-supplied text is escaped before rendering (see `Tokenizer.escape`), so only the template's own spellings
of control tokens become control tokens.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError, TemplateError
from .tokenizer import Tokenizer

# Gemma 3 instruction-tuned template, as Google ships it in tokenizer_config.json: the system message is folded
# into the first user turn; `assistant` is spelled `model`.
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

ROLES = {"system", "user", "assistant", "model", "tool"}
MAX_OUTPUT = 4 << 20  # characters a template may produce
TIME_LIMIT = 2.0  # seconds a template may run


class _Env(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on `*` / `**` so `'a' * 10**9` cannot exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateError("chat template: exponent too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise TemplateError("chat template: repetition too large")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


_ENV = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.globals.update(raise_exception=_raise, strftime_now=lambda fmt: time.strftime(fmt))
_ENV.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str | None = None):
        self.source = source or GEMMA3_TEMPLATE
        try:
            self.template = _ENV.from_string(self.source)
        except JinjaError as e:
            raise TemplateError(f"chat template does not compile: {e}") from None

    def render(self, messages: list[dict], bos_token: str = "<bos>", eos_token: str = "<eos>",
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render with a time limit and an output cap (a trace hook stops loops that print nothing)."""
        deadline = time.monotonic() + TIME_LIMIT

        def tracer(frame, event, arg):
            if time.monotonic() > deadline:
                raise TemplateError(f"chat template ran longer than {TIME_LIMIT} s")
            return tracer

        out, size = [], 0
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in self.template.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt, **extra):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateError(f"chat template output exceeds {MAX_OUTPUT} characters")
                out.append(chunk)
        except TemplateError:
            raise
        except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)
        return "".join(out)


def image_source(part: dict) -> object:
    """The image a content part points at: {"type": "image", "image"|"url"|"path": ...} (gemrun, HF),
    {"type": "image_url", "image_url": {"url": ...} or "..."} (OpenAI chat) or {"type": "input_image",
    "image_url": ...} (OpenAI responses)."""
    for key in ("image", "url", "path", "image_url"):
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if value is not None:
            return value
    raise InputError(f"image part has no image, url or path: {sorted(part)}")


def normalize_messages(messages: Sequence[dict], tokenizer: Tokenizer, images: list | None = None) -> list[dict]:
    """Validate OpenAI-style messages and escape their text. Content is a string or a list of parts: text, and
    image parts whose sources are appended to `images` in order (None: a text-only model, images refused)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}")
        if isinstance(content, str):
            content = tokenizer.escape(content)
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": tokenizer.escape(part["text"])})
                elif kind in ("image", "image_url", "input_image"):
                    if images is None:
                        raise InputError(f"messages[{i}].content[{j}]: this model is text-only and cannot read "
                                         "images")
                    images.append(image_source(part))
                    parts.append({"type": "image"})
                else:
                    raise InputError(f"messages[{i}].content[{j}] has unsupported type {kind!r}")
            content = parts
        elif content is None and role == "assistant":
            content = ""
        else:
            raise InputError(f"messages[{i}].content must be a string or a list of parts")
        out.append({"role": "assistant" if role == "model" else role, "content": content})
    return out


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  template: ChatTemplate | None = None, images: list | None = None, **extra: Any) -> str:
    """The rendered prompt text; image sources found in the messages are appended to `images`."""
    template = template or ChatTemplate(tokenizer.chat_template)
    bos = tokenizer.id_to_token(tokenizer.bos_id) or "<bos>"
    eos = tokenizer.id_to_token(tokenizer.eos_id) or "<eos>"
    return template.render(normalize_messages(messages, tokenizer, images), bos_token=bos, eos_token=eos,
                           add_generation_prompt=add_generation_prompt, **extra)


def prompt_tokens(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  template: ChatTemplate | None = None, **extra: Any) -> list[int]:
    """Messages -> token ids. The template writes `<bos>` itself, so none is added (no double BOS)."""
    return tokenizer.encode_template(render_prompt(tokenizer, messages, add_generation_prompt, template, **extra))
