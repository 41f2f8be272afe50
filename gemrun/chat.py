"""Chat messages -> prompt tokens through the checkpoint's jinja template (sandboxed) or a built-in one: Gemma 3's,
or Gemma 4's (Google's template, shipped verbatim as templates/gemma4.jinja) for tokenizers with `<|turn>` at 105.

User-supplied text is escaped before rendering (see `Tokenizer.escape`), so only the template's own spellings
of control tokens become control tokens. Gemma 4's template renders system turns, thinking (`enable_thinking`),
tool declarations (`tools`), assistant `tool_calls`, `role: tool` results and image/audio/video parts itself:
`normalize_messages` keeps those fields and only checks and escapes them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError, TemplateError
from .thinking import CHANNEL_CLOSE, CHANNEL_OPEN
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

# Google's Gemma 4 template (google/gemma-4-31B-it chat_template.jinja, "Published: 2026-07-09"; the 12B and 26B
# ship the same bytes), for checkpoints that carry none.
GEMMA4_TEMPLATE = resources.files(__package__).joinpath("templates/gemma4.jinja").read_text(encoding="utf-8")

ROLES = {"system", "developer", "user", "assistant", "model", "tool"}
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


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    try:
        return _ENV.from_string(source)
    except JinjaError as e:
        raise TemplateError(f"chat template does not compile: {e}") from None


class ChatTemplate:
    """A sandboxed jinja chat template (Gemma 3's built-in one when `source` is None)."""

    def __init__(self, source: str | None = None):
        self.source = source or GEMMA3_TEMPLATE
        self.template = _compile(self.source)

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


def is_gemma4(tokenizer: Tokenizer) -> bool:
    """Whether a tokenizer speaks Gemma 4's chat format (`<|turn>` at id 105)."""
    return tokenizer.id_to_token(105) == "<|turn>"


def template_for(tokenizer: Tokenizer) -> ChatTemplate:
    """The checkpoint's own template when it ships one, else the built-in Gemma 4 or Gemma 3 template."""
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template)
    return ChatTemplate(GEMMA4_TEMPLATE if is_gemma4(tokenizer) else None)


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


def media_source(part: dict, kind: str) -> object:
    """The audio or video a content part points at: {"type": kind, kind|"url"|"path": ...} (gemrun, HF),
    {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}} (OpenAI; returned as that dict) or
    {"type": "video_url", "video_url": {"url": ...}}."""
    for key in (kind, "url", "path", f"{kind}_url", "input_audio"):
        value = part.get(key)
        if isinstance(value, dict) and key != "input_audio":
            value = value.get("url")
        if value is not None:
            return value
    raise InputError(f"{kind} part has no {kind}, url or path: {sorted(part)}")


_MEDIA = {"image": "image", "image_url": "image", "input_image": "image", "audio": "audio", "input_audio": "audio",
          "video": "video", "video_url": "video"}


def strip_thinking(text: str) -> str:
    """A past model turn without its thoughts, exactly as Google's Gemma 4 template's `strip_thinking` macro
    does it (split on `<channel|>`, drop what follows a `<|channel>` in each piece, trim). It runs before escaping,
    which would otherwise hide the markers from the template's own copy of it."""
    return "".join(part.split(CHANNEL_OPEN)[0] for part in text.split(CHANNEL_CLOSE)).strip()


def _escape_tree(value: Any, tokenizer: Tokenizer, where: str) -> Any:
    """JSON-like data with every string (keys too) escaped; anything but JSON types is refused."""
    if isinstance(value, str):
        return tokenizer.escape(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_escape_tree(v, tokenizer, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {tokenizer.escape(k): _escape_tree(v, tokenizer, where) for k, v in value.items()}
    raise InputError(f"{where} holds a {type(value).__name__}, which is not JSON")


def _tool_calls(calls: Any, tokenizer: Tokenizer, where: str) -> list[dict]:
    """OpenAI tool calls with `arguments` as a mapping (Gemma 4's template refuses a JSON string), escaped."""
    if not isinstance(calls, list):
        raise InputError(f"{where} must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}[{j}].function.name must be a non-empty string")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise InputError(f"{where}[{j}].function.arguments is not valid JSON") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise InputError(f"{where}[{j}].function.arguments must be a JSON object")
        item = {"type": "function", "function": {"name": tokenizer.escape(name),
                                                 "arguments": _escape_tree(args, tokenizer, f"{where}[{j}]")}}
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def normalize_messages(messages: Sequence[dict], tokenizer: Tokenizer, images: list | None = None,
                       audio: list | None = None, videos: list | None = None) -> list[dict]:
    """Validate OpenAI-style messages and escape their text. Content is a string or a list of parts: text, and
    image / audio / video parts whose sources are appended to `images` / `audio` / `videos` in order (None: the
    model cannot read that kind, and such parts are refused). Assistant messages keep `tool_calls` (arguments
    parsed to mappings) and reasoning (`reasoning_content`, also read from `reasoning` / `thinking`), with
    thoughts in their content stripped when the tokenizer has Gemma 4's channel tokens; tool messages keep
    `tool_call_id` and `name`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list")
    sinks = {"image": images, "audio": audio, "video": videos}
    channels = CHANNEL_CLOSE in tokenizer.specials
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}")
        role = "assistant" if role == "model" else role
        past_model = role == "assistant" and channels
        if isinstance(content, str):
            content = tokenizer.escape(strip_thinking(content) if past_model else content)
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text = strip_thinking(part["text"]) if past_model else part["text"]
                    parts.append({"type": "text", "text": tokenizer.escape(text)})
                elif kind in _MEDIA:
                    media = _MEDIA[kind]
                    sink = sinks[media]
                    if sink is None:
                        raise InputError(f"messages[{i}].content[{j}]: this model "
                                         + ("is text-only and cannot read images" if media == "image"
                                            else f"cannot read {media}"))
                    sink.append(image_source(part) if media == "image" else media_source(part, media))
                    parts.append({"type": media})
                else:
                    raise InputError(f"messages[{i}].content[{j}] has unsupported type {kind!r}")
            content = parts
        elif content is None and role == "assistant":
            content = ""
        elif not (content is None and role == "tool"):  # a tool result of None renders as null
            raise InputError(f"messages[{i}].content must be a string or a list of parts")
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], tokenizer, f"messages[{i}].tool_calls")
            reasoning = next((m[k] for k in ("reasoning_content", "reasoning", "thinking") if m.get(k)), None)
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise InputError(f"messages[{i}].reasoning_content must be a string")
                msg["reasoning_content"] = tokenizer.escape(reasoning)
        elif role == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise InputError(f"messages[{i}].{key} must be a string")
                    msg[key] = tokenizer.escape(m[key])
        out.append(msg)
    return out


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  template: ChatTemplate | None = None, images: list | None = None, audio: list | None = None,
                  videos: list | None = None, **extra: Any) -> str:
    """The rendered prompt text; media sources found in the messages are appended to `images` / `audio` /
    `videos`. `extra` goes to the template: Gemma 4's reads `tools` (OpenAI tool list, escaped here),
    `enable_thinking` and `preserve_thinking`."""
    template = template or template_for(tokenizer)
    bos = tokenizer.id_to_token(tokenizer.bos_id) or "<bos>"
    eos = tokenizer.id_to_token(tokenizer.eos_id) or "<eos>"
    if extra.get("tools") is not None:
        extra["tools"] = _escape_tree(extra["tools"], tokenizer, "tools")
    return template.render(normalize_messages(messages, tokenizer, images, audio, videos), bos_token=bos,
                           eos_token=eos, add_generation_prompt=add_generation_prompt, **extra)


def prompt_tokens(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                  template: ChatTemplate | None = None, **extra: Any) -> list[int]:
    """Messages -> token ids. The template writes `<bos>` itself, so none is added (no double BOS)."""
    return tokenizer.encode_template(render_prompt(tokenizer, messages, add_generation_prompt, template, **extra))
