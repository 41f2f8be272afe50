"""The server with Gemma 4 through real clients (openai, ollama, httpx) against a live uvicorn serving a tiny random
Gemma 4 Unified model (tiny_gemma4.write_model_dir: real special-token ids, image and audio embedders, a drafter).

Random weights answer gibberish, so the routing of thoughts and tool calls is tested with a token-level test
double: `script` makes every sequence emit given token ids (then `<turn|>`), whatever the model's logits say, by
wrapping `Sequence._filter`, the one place every sampled token passes (plain, batched and speculative decoding)."""

from __future__ import annotations

import base64
import io
import json
import math
import struct

import httpx
import ollama
import openai
import pytest
import torch
from server_util import PATIENCE, LiveServer

import gemrun
from gemrun.api import Model
from gemrun.generate import Sequence

HELLO = [{"role": "user", "content": "Hello"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
THOUGHT = "<|channel>thought\nLet me think<channel|>Hello there"
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>junk after the stop'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_gemma4 import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("gemma4") / "model", with_drafter=True)


@pytest.fixture(scope="module")
def model(model_dir):
    return gemrun.load(str(model_dir), dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(lambda: model, max_batch=4) as s:
        yield s


@pytest.fixture(scope="module")
def name(server):
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=PATIENCE)


@pytest.fixture(scope="module")
def oclient(server):
    return ollama.Client(host=server.url, timeout=PATIENCE)


@pytest.fixture
def script(model, monkeypatch):
    """`script(text)`: every sequence from now on generates the tokens of `text` (control tokens included), then
    `<turn|>`. Returns the ids."""
    state: dict = {"ids": None}
    original = Sequence._filter

    def forced(self, logits):
        logits, raw = original(self, logits)
        ids = state["ids"]
        if ids is not None:
            i = len(self.tokens)
            logits = torch.full_like(logits, float("-inf"))
            logits[ids[i] if i < len(ids) else 106] = 0.0
        return logits, raw

    monkeypatch.setattr(Sequence, "_filter", forced)

    def set_script(text: str) -> list[int]:
        state["ids"] = model.tokenizer.encode_template(text)
        return state["ids"]

    return set_script


def extra(obj, key: str):
    """A field the openai client does not model (reasoning_content, usage.gemrun)."""
    return (obj.model_extra or {}).get(key)


def wav_base64(seconds: float = 0.5, rate: int = 16000) -> str:
    n = int(seconds * rate)
    samples = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(n))
    head = (b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
                                                                                        rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(samples)))
    return base64.b64encode(head + samples).decode()


def png_base64(size: int = 96) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- thinking -------------------------------------------------------------------------------------------------

def test_thoughts_never_reach_content(client, name, script):
    script(THOUGHT)
    for kw in ({"reasoning_effort": "high"}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}):
        r = client.chat.completions.create(model=name, messages=HELLO, max_tokens=40, **kw)
        msg = r.choices[0].message
        assert msg.content == "Hello there" and r.choices[0].finish_reason == "stop"
        assert extra(msg, "reasoning_content") == extra(msg, "reasoning") == "Let me think"
    chunks = list(client.chat.completions.create(model=name, messages=HELLO, max_tokens=40, stream=True,
                                                 reasoning_effort="low", stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(extra(d, "reasoning_content") or "" for d in deltas)
    assert content == "Hello there" and reasoning == "Let me think"
    assert all("think" not in (d.content or "") and "<|channel>" not in (d.content or "") for d in deltas)
    assert all(extra(d, "reasoning") == extra(d, "reasoning_content") for d in deltas)
    assert chunks[-1].usage.completion_tokens == len(script(THOUGHT)) + 1  # + the <turn|> that stopped it


def test_thinking_switch_changes_the_prompt(server, client, name, model, script):
    script("Hi")
    sizes = {}
    for label, kw in (("on", {"reasoning_effort": "medium"}), ("off", {"reasoning_effort": "none"}),
                      ("on2", {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}),
                      ("off2", {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}),
                      ("default", {})):
        r = client.chat.completions.create(model=name, messages=HELLO, max_tokens=3, **kw)
        sizes[label] = r.usage.prompt_tokens
        assert r.choices[0].message.content == "Hi"
    on, off = model.chat_prompt(HELLO, think=True).ids, model.chat_prompt(HELLO, think=False).ids
    assert on != off and sizes["on"] == sizes["on2"] == len(on) and sizes["off"] == sizes["off2"] == len(off)
    assert sizes["default"] == len(model.chat_prompt(HELLO).ids)
    tokenized = httpx.post(server.url + "/tokenize", json={"messages": HELLO,
                                                           "chat_template_kwargs": {"enable_thinking": True}})
    assert tokenized.json()["tokens"] == on
    assert model.tokenizer.token_to_id("<|think|>") in on and model.tokenizer.token_to_id("<|think|>") not in off
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model=name, messages=HELLO, reasoning_effort="extreme")


def test_responses_api_puts_thoughts_in_a_reasoning_item(client, name, script):
    script(THOUGHT)
    r = client.responses.create(model=name, input="Hello", reasoning={"effort": "high"}, max_output_tokens=40)
    assert r.output_text == "Hello there"
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text == "Let me think"
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(model=name, input="Hello", reasoning={"effort": "high"},
                                          max_output_tokens=40, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let me think"
    done = events[-1].response
    assert [o.type for o in done.output] == ["reasoning", "message"]


# --- tools ----------------------------------------------------------------------------------------------------

def test_native_tool_calls_and_the_tool_response_stop(client, name, script):
    ids = script("<|channel>thought\nI should call it<channel|>" + CALL)
    stop_at = ids.index(50) + 1  # <|tool_response> ends generation; what follows it is never produced
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=TOOLS, reasoning_effort="high", max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and r.usage.completion_tokens == stop_at
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content and extra(choice.message, "reasoning_content") == "I should call it"
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=TOOLS, reasoning_effort="high", max_tokens=60, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_forced_native_tool_calls(client, name, script):
    """tool_choice "required" or a named function decodes under the native call grammar: the scripted call passes
    the grammar token by token (a token outside it would fail the request), thinking on or off."""
    follow = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for text, kw in ((CALL, {}), ("<|channel>thought\nI must call it<channel|>" + CALL, {"reasoning_effort": "high"})):
        script(text)
        for choice in ("required", named):
            r = client.chat.completions.create(model=name, messages=follow, tools=TOOLS, tool_choice=choice,
                                               max_tokens=60, **kw)
            call = r.choices[0].message.tool_calls[0]
            assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Paris"}
    script('<|tool_call>call:get_weather{town:<|"|>Paris<|"|>}<tool_call|>')  # not what was declared
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=name, messages=follow, tools=TOOLS, tool_choice="required",
                                       max_tokens=60)


def test_thoughts_after_a_tool_result_stay_out_of_content(client, name, model, script):
    follow = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}]
    prompt = model.chat_prompt(follow, think=True, tools=TOOLS)
    assert "response:get_weather{" in model.tokenizer.decode(prompt.ids, skip_special=False)
    script(("" if prompt.in_thought else "<|channel>thought\n") + "It says sunny<channel|>It is sunny.")
    r = client.chat.completions.create(model=name, messages=follow, tools=TOOLS, reasoning_effort="high",
                                       max_tokens=40)
    msg = r.choices[0].message
    assert msg.content == "It is sunny." and extra(msg, "reasoning_content") == "It says sunny"
    assert r.usage.prompt_tokens == len(prompt.ids) and r.choices[0].finish_reason == "stop"


# --- Ollama ---------------------------------------------------------------------------------------------------

def test_ollama_think_tools_images(oclient, name, model, script):
    script(THOUGHT)
    r = oclient.chat(model=name, messages=HELLO, think=True, options={"num_predict": 40})
    assert r.message.content == "Hello there" and r.message.thinking == "Let me think" and r.done
    parts = list(oclient.chat(model=name, messages=HELLO, think=True, stream=True, options={"num_predict": 40}))
    assert "".join(p.message.content for p in parts) == "Hello there"
    assert "".join(p.message.thinking or "" for p in parts) == "Let me think" and parts[-1].done
    g = oclient.generate(model=name, prompt="Hello", think=True, options={"num_predict": 40})
    assert g.response == "Hello there" and g.thinking == "Let me think"
    script(CALL)
    t = oclient.chat(model=name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    assert t.message.tool_calls[0].function.name == "get_weather"
    assert t.message.tool_calls[0].function.arguments == {"city": "Paris"} and not t.message.content
    script("Nice")
    msgs = [{"role": "user", "content": "What is this?", "images": [png_base64()]}]
    with_image = oclient.chat(model=name, messages=msgs, options={"num_predict": 5})
    assert with_image.message.content == "Nice"
    assert with_image.prompt_eval_count > len(model.chat_prompt([{"role": "user", "content": "What is this?"}]).ids)
    follow = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": '{"sky": "sunny"}', "tool_name": "get_weather"}]
    assert oclient.chat(model=name, messages=follow, tools=TOOLS).message.content == "Nice"
    show = oclient.show(name)
    assert show.details.family == "gemma4" and {"thinking", "vision", "audio", "tools"} <= set(show.capabilities)


# --- media ----------------------------------------------------------------------------------------------------

def test_audio_and_image_parts(client, name, model, script):
    script("Heard")
    text = [{"type": "text", "text": "What is this?"}]
    plain = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}], max_tokens=3)
    audio = [{"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}}]
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": audio + text}],
                                       max_tokens=3)
    assert r.choices[0].message.content == "Heard" and r.usage.prompt_tokens > plain.usage.prompt_tokens
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(400)}}]
    sizes = []
    for budget in (70, 280):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": image + text}],
                                           max_tokens=3, extra_body={"mm_processor_kwargs": {"max_soft_tokens":
                                                                                             budget}})
        sizes.append(r.usage.prompt_tokens)
    assert plain.usage.prompt_tokens < sizes[0] < sizes[1]
    for bad, match in (({"data": "not base64!", "format": "wav"}, "base64"),
                       ({"data": base64.b64encode(b"garbage bytes, no audio").decode(), "format": "wav"}, "audio"),
                       ({"data": wav_base64(), "format": "aac"}, "format")):
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(model=name, max_tokens=3, messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": bad}] + text}])
    with pytest.raises(openai.BadRequestError, match="file paths"):
        client.chat.completions.create(model=name, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "audio", "audio": "/etc/passwd"}] + text}])
    with pytest.raises(openai.BadRequestError, match="max_soft_tokens"):
        client.chat.completions.create(model=name, messages=HELLO, extra_body={"image_tokens": 100})


# --- speculative decoding -------------------------------------------------------------------------------------

def test_speculative_serving_equals_plain_and_reports_acceptance(server, client, name, model, model_dir):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=name, messages=msgs, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    assert extra(plain.usage, "gemrun") is None
    fresh = Model(model.loaded, model.tokenizer)  # its own drafter; the plain server's model keeps none
    with LiveServer(lambda: fresh, draft=str(model_dir / "drafter"), draft_tokens=3) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=PATIENCE)
        spec = c.chat.completions.create(**kw)
        a, b = plain.choices[0].message, spec.choices[0].message
        assert (a.content, extra(a, "reasoning_content")) == (b.content, extra(b, "reasoning_content"))
        assert spec.usage.completion_tokens == plain.usage.completion_tokens == 24
        stats = extra(spec.usage, "gemrun")
        assert stats["drafted_tokens"] > 0 and 0 <= stats["accepted_tokens"] <= stats["drafted_tokens"]
        assert stats["acceptance_rate"] == pytest.approx(stats["accepted_tokens"] / stats["drafted_tokens"])
        chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (a.content or "")
        assert extra(chunks[-1].usage, "gemrun")["drafted_tokens"] == stats["drafted_tokens"]
        logprobs = c.chat.completions.create(**kw, logprobs=True)  # not speculative: plain batched decoding
        assert logprobs.choices[0].message.content == a.content and extra(logprobs.usage, "gemrun") is None
        assert s.metric("gemrun_draft_tokens_total") == 2 * stats["drafted_tokens"]
        assert 0 <= s.metric("gemrun_draft_acceptance_rate") <= 1
        assert s.metric("gemrun_requests_running") == 0
