"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON streaming), /api/tags, /api/show, /api/ps,
/api/version. Same runner as the OpenAI routes; only the shapes differ."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request

from ..engine import Unavailable
from ..errors import InputError
from ..formats import validate_tools
from ..sampling import SamplingParams
from .protocol import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaRequest, OllamaShowRequest
from .runner import Event, Service, ready, version
from .streaming import ndjson_stream

router = APIRouter()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _params(s: Service, options: OllamaOptions | None, prompt_len: int) -> SamplingParams:
    options = options or OllamaOptions()
    return options.sampling(s.max_tokens(options.max_tokens, prompt_len, "options.num_predict"),
                            s.tokenizer.vocab_size)


def _think(s: Service, body: OllamaRequest) -> bool | None:
    s.check_thinking(body.think_switch)
    return body.think_switch


def chat_messages(messages) -> list[dict]:
    """Ollama messages -> OpenAI-style ones: images (base64) become image parts before the text; tool calls
    carry arguments as objects and get ids; tool results become `tool` messages."""
    out = []
    for i, m in enumerate(messages):
        msg: dict = {"role": m.role, "content": m.content}
        if m.thinking:
            msg["thinking"] = m.thinking
        if m.images:
            msg["content"] = [{"type": "image_url", "image_url": {"url": img}} for img in m.images]
            msg["content"].append({"type": "text", "text": m.content})
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InputError(f"messages[{i}].tool_calls[{j}] needs function.name")
                args = fn.get("arguments", {})
                calls.append({"id": f"call_{i}_{j}", "type": "function",
                              "function": {"name": fn["name"],
                                           "arguments": args if isinstance(args, str) else json.dumps(args)}})
            msg["tool_calls"] = calls
        if m.role == "tool":  # Gemma 4's template names the function from the call id, else from `name`
            msg["tool_call_id"] = m.tool_name or ""
            if m.tool_name:
                msg["name"] = m.tool_name
        out.append(msg)
    return out


def _call(event_call: dict) -> dict:
    fn = event_call["function"]
    return {"function": {"name": fn["name"], "arguments": json.loads(fn["arguments"])}}


def _final(ev: Event, reason: str, started: float) -> dict:
    """The last line's figures, in nanoseconds: evaluation of the prompt and of the reply as the engine timed them,
    and as load_duration what came before (prompt assembly, media decoding, waiting for a batch slot: the model
    itself stays loaded)."""
    ns = 1e9
    total = time.perf_counter() - started
    prefill = ev.stats.prefill_seconds if ev.stats else 0.0
    decode = ev.stats.decode_seconds if ev.stats else 0.0
    cached = ev.stats.cached_tokens if ev.stats else 0  # as Ollama, only the tokens evaluated now count
    return {"done": True, "done_reason": reason or "stop", "total_duration": int(total * ns),
            "load_duration": int(max(0.0, total - prefill - decode) * ns), "prompt_eval_count": ev.usage[0] - cached,
            "prompt_eval_duration": int(prefill * ns), "eval_count": ev.usage[1], "eval_duration": int(decode * ns)}


async def _gather(events) -> tuple[Event, list[dict], list]:
    """Non-streaming: the whole reply as one event (text, reasoning, tokens, the last event's end and figures) and
    its tool calls; a reply cut by shutdown is an error (503)."""
    whole, calls = Event(0), []
    async for ev in events:
        if ev.finish_reason == "shutdown":
            raise Unavailable("the server shut down before the reply was complete")
        whole.text += ev.text
        whole.reasoning += ev.reasoning
        whole.tokens += ev.tokens
        if ev.tool_call:
            calls.append(_call(ev.tool_call))
        if ev.finish_reason:
            whole.finish_reason, whole.usage, whole.stats = ev.finish_reason, ev.usage, ev.stats
    return whole, calls


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    s = ready(request.app)
    s.check_model(body.model)
    started = time.perf_counter()
    if not body.messages:  # Ollama answers an empty chat by loading the model
        return {"model": s.name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    tools = validate_tools(body.tools) if body.tools else None
    prompt = await s.chat_prompt(chat_messages(body.messages), tools, "auto", think=_think(s, body))
    constraint = s.constraint(prompt, ollama_format=body.format)
    params = _params(s, body.options, len(prompt.ids))
    events = s.run(prompt, params, 1, constraint, None, tools, request.is_disconnected)

    def line(ev: Event) -> dict:
        message: dict = {"role": "assistant", "content": ev.text}
        if ev.reasoning:
            message["thinking"] = ev.reasoning
        if ev.tool_call:
            message["tool_calls"] = [_call(ev.tool_call)]
        out = {"model": s.name, "created_at": _now(), "message": message, "done": False}
        if ev.finish_reason:
            out.update(_final(ev, "stop" if ev.finish_reason == "tool_calls" else ev.finish_reason, started))
        return out

    if body.stream:
        async def lines():
            async for ev in events:
                if ev.text or ev.reasoning or ev.tool_call or ev.finish_reason:
                    yield line(ev)

        return ndjson_stream(lines(), events.aclose)
    whole, calls = await _gather(events)
    out = line(whole)
    if calls:
        out["message"]["tool_calls"] = calls
    return out


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    s = ready(request.app)
    s.check_model(body.model)
    started = time.perf_counter()
    if body.suffix:
        raise InputError("suffix (fill-in-the-middle) is not supported by Gemma 3")
    if body.template:
        raise InputError("template overrides are not supported; the checkpoint's chat template is used")
    if not body.prompt and not body.images:
        return {"model": s.name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    if body.raw:
        if body.images:
            raise InputError("images need the chat template (raw is false)")
        prompt = await s.text_prompt(body.prompt, bos=not body.context)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        content: str | list = body.prompt
        if body.images:
            content = [{"type": "image_url", "image_url": {"url": img}} for img in body.images]
            content.append({"type": "text", "text": body.prompt})
        messages.append({"role": "user", "content": content})
        prompt = await s.chat_prompt(messages, think=_think(s, body))
    if body.context:  # continue an earlier exchange: its tokens, then this prompt
        context = (await s.text_prompt(body.context)).ids
        prompt.ids = context + prompt.ids[1 if prompt.ids[:1] == [s.tokenizer.bos_id] else 0:]
        if prompt.embeds is not None:
            raise InputError("context cannot be combined with images")
    params = _params(s, body.options, len(prompt.ids))
    constraint = s.constraint(prompt, ollama_format=body.format)
    events = s.run(prompt, params, 1, constraint, None, None, request.is_disconnected)
    generated: list[int] = []

    def line(ev: Event) -> dict:
        generated.extend(t.id for t in ev.tokens)
        out = {"model": s.name, "created_at": _now(), "response": ev.text, "done": False}
        if ev.reasoning:
            out["thinking"] = ev.reasoning
        if ev.finish_reason:
            out.update(_final(ev, ev.finish_reason, started))
            out["context"] = prompt.ids + generated
        return out

    if body.stream:
        async def lines():
            async for ev in events:
                if ev.text or ev.reasoning or ev.finish_reason:
                    yield line(ev)
                else:
                    generated.extend(t.id for t in ev.tokens)

        return ndjson_stream(lines(), events.aclose)
    whole, _ = await _gather(events)
    return line(whole)


def _details(s: Service) -> dict:
    loaded = s.runtime.loaded
    level = loaded.format
    if loaded.gguf is not None:
        import gguf

        ftype = loaded.gguf.metadata.get("general.file_type")
        try:
            level = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (TypeError, ValueError):
            level = "unknown"
    family = _family(s)
    return {"parent_model": "", "format": "gguf" if loaded.gguf is not None else "safetensors",
            "family": family, "families": [family] + (["clip"] if s.reads("image") else []),
            "parameter_size": _human(_parameter_count(s)), "quantization_level": level}


def _family(s: Service) -> str:
    return s.format.name


def _parameter_count(s: Service) -> int:
    loaded = s.runtime.loaded
    if loaded.gguf is not None:
        total = 0
        for t in loaded.gguf.tensors.values():
            n = 1
            for d in t.shape:
                n *= int(d)
            total += n
        return total
    return sum(p.numel() for p in s.runtime.model.parameters())


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _file_facts(s: Service) -> tuple[int, str, str]:
    path = s.runtime.loaded.path
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    mtime = max(p.stat().st_mtime for p in files)
    # a digest of identity, not content: hashing a 12B file on every /api/tags would take a minute
    digest = hashlib.sha256(f"{path}:{size}:{mtime}".encode()).hexdigest()
    stamp = datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z")
    return size, digest, stamp


@router.get("/api/tags")
async def tags(request: Request):
    s = ready(request.app)
    size, digest, stamp = _file_facts(s)
    return {"models": [{"name": s.name, "model": s.name, "modified_at": stamp, "size": size, "digest": digest,
                        "details": _details(s)}]}


@router.get("/api/ps")
async def ps(request: Request):
    s = ready(request.app)
    size, digest, _ = _file_facts(s)
    return {"models": [{"name": s.name, "model": s.name, "size": size, "digest": digest, "details": _details(s),
                        "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": s.runtime.max_context}]}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    s = ready(request.app)
    s.check_model(body.model or body.name)
    cfg = s.runtime.config
    _, _, stamp = _file_facts(s)
    defaults = SamplingParams()
    f = _family(s)
    stops = [s.tokenizer.id_to_token(i) for i in sorted(set(cfg.stop_token_ids))]
    parameters = "\n".join([f"temperature {defaults.temperature}", f"top_k {defaults.top_k}",
                            f"top_p {defaults.top_p}"] + [f'stop "{t}"' for t in stops if t])
    return {"license": "", "modelfile": f"# served by gemrun\nFROM {s.runtime.loaded.path.name}\n",
            "parameters": parameters, "template": s.format.template.source, "details": _details(s),
            "model_info": {"general.architecture": f, "general.parameter_count": _parameter_count(s),
                           f"{f}.context_length": s.runtime.max_context, f"{f}.embedding_length": cfg.hidden_size,
                           f"{f}.block_count": cfg.num_layers, f"{f}.attention.head_count": cfg.num_heads},
            "capabilities": ["completion", "tools"] + (["thinking"] if s.format.thinking else [])
            + (["vision"] if s.reads("image") else []) + (["audio"] if s.reads("audio") else []),
            "modified_at": stamp}


@router.get("/api/version")
async def api_version():
    return {"version": version()}
