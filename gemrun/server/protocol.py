"""Request bodies of the OpenAI and Ollama APIs (pydantic). Unknown fields are accepted and ignored, as the
real servers do; fields we cannot honour are refused where they are read, never silently dropped."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Lenient):
    include_usage: bool = False


class Sampling(Lenient):
    """Sampling fields shared by chat/completions, completions and responses (vLLM's extensions included)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None


class Multimodal(Sampling):
    """Gemma 4's per-request switches: thinking (OpenAI's `reasoning_effort`, vLLM's
    `chat_template_kwargs.enable_thinking`) and the soft-token budget of each image (vLLM's
    `mm_processor_kwargs.max_soft_tokens`, or `image_tokens`)."""

    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    image_tokens: int | None = None


class ChatCompletionRequest(Multimodal):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(Sampling):
    model: str
    prompt: str | list[str] | list[int]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = 16  # the legacy endpoint's documented default
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = None


class ResponsesRequest(Multimodal):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None  # {"effort": ...}


class TokenizeRequest(Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[int]


class OllamaMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class OllamaChatRequest(Lenient):
    model: str
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    keep_alive: str | int | None = None
    think: bool | str | None = None


class OllamaGenerateRequest(Lenient):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    stream: bool = True
    raw: bool = False
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | None = None
    think: bool | str | None = None


class OllamaShowRequest(Lenient):
    model: str | None = None
    name: str | None = None  # older clients
