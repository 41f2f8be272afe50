"""Request bodies of the OpenAI and Ollama APIs (pydantic), validated here once and turned into typed values
(`SamplingParams`, thinking switch, image budget) for the routes. Unknown fields are accepted and ignored, as the
real servers do; fields we cannot honour are refused where they are read, never silently dropped."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from ..errors import InputError
from ..sampling import SamplingParams

Number = StrictFloat | StrictInt  # JSON numbers only: no strings, no booleans
MAX_LOGIT_BIAS = 1024
EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Lenient):
    include_usage: StrictBool = False


class Sampling(Lenient):
    """Sampling fields shared by chat/completions, completions and responses (vLLM's extensions included)."""

    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Number] | None = None
    ignore_eos: StrictBool | None = None

    def sampling(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        """SamplingParams for this request; unset fields take the model's generation defaults (Gemma: temperature
        1, top-k 64, top-p 0.95), as Ollama and vLLM do."""
        names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "stop", "ignore_eos")
        kw: dict[str, Any] = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if kw.get("top_k", 0) < 0:  # vLLM spells "off" -1
            kw["top_k"] = 0 if kw["top_k"] == -1 else kw["top_k"]
        kw["logit_bias"] = logit_bias(self.logit_bias or {}, vocab_size)
        return SamplingParams(max_tokens=max_tokens, **kw)


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    if len(bias) > MAX_LOGIT_BIAS:
        raise InputError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    parsed = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InputError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise InputError(f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        if not -100 <= value <= 100:
            raise InputError(f"logit_bias[{key}] = {value!r} must be a number in [-100, 100]")
        parsed[token] = float(value)
    return parsed


class TemplateKwargs(Lenient):
    enable_thinking: StrictBool | None = None


class ProcessorKwargs(Lenient):
    max_soft_tokens: StrictInt | None = None


class Multimodal(Sampling):
    """Per-request switches of thinking models (OpenAI's `reasoning_effort`, vLLM's
    `chat_template_kwargs.enable_thinking`) and the soft-token budget of each image (vLLM's
    `mm_processor_kwargs.max_soft_tokens`, or `image_tokens`)."""

    chat_template_kwargs: TemplateKwargs | None = None
    mm_processor_kwargs: ProcessorKwargs | None = None
    image_tokens: StrictInt | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    def think(self, effort: str | None = None) -> bool | None:
        """Thinking on/off: "none"/"minimal" off, "low".."high" on; `enable_thinking` wins when both are given;
        None: the template's default."""
        effort = effort or self.reasoning_effort
        think = None if effort is None else EFFORTS[effort]
        kwargs = self.chat_template_kwargs
        return kwargs.enable_thinking if kwargs and kwargs.enable_thinking is not None else think

    @property
    def image_budget(self) -> int | None:
        mm = self.mm_processor_kwargs
        return mm.max_soft_tokens if mm and mm.max_soft_tokens is not None else self.image_tokens


class ChatCompletionRequest(Multimodal):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(Sampling):
    model: str
    prompt: str | list[str] | list[StrictInt]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    max_tokens: StrictInt | None = 16  # the legacy endpoint's documented default
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = None


class Reasoning(Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class ResponsesRequest(Multimodal):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: StrictBool = False
    max_output_tokens: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    reasoning: Reasoning | None = None


class TokenizeRequest(Lenient):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: StrictBool = True
    chat_template_kwargs: TemplateKwargs | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: list[StrictInt]


# --- Ollama ---------------------------------------------------------------------------------------------------

class OllamaOptions(Lenient):
    """Ollama's `options` that gemrun honours (others, e.g. num_ctx or num_thread, are accepted and ignored)."""

    temperature: Number | None = None
    top_k: StrictInt | None = None
    top_p: Number | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    repeat_penalty: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    num_predict: StrictInt | None = None

    @property
    def max_tokens(self) -> int | None:
        """What num_predict asks for: None for no limit (-1) or "fill the context" (-2)."""
        if self.num_predict == 0:
            raise InputError("options.num_predict must not be 0")
        return None if self.num_predict is None or self.num_predict < 0 else self.num_predict

    def sampling(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        fields = self.model_dump(include={"temperature", "top_k", "top_p", "min_p", "seed", "stop",
                                          "presence_penalty", "frequency_penalty"}, exclude_none=True)
        if self.repeat_penalty is not None:
            fields["repetition_penalty"] = self.repeat_penalty
        return Sampling(**fields).sampling(max_tokens, vocab_size)


class OllamaMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaRequest(Lenient):
    model: str
    stream: StrictBool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: str | int | None = None
    think: StrictBool | Literal["low", "medium", "high"] | None = None

    @property
    def think_switch(self) -> bool | None:
        """Ollama's `think`: true/false, or a level (gpt-oss style) that means on."""
        return None if self.think is None else self.think is not False


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[StrictInt] | None = None
    images: list[str] | None = None
    raw: StrictBool = False


class OllamaShowRequest(Lenient):
    model: str | None = None
    name: str | None = None  # older clients
