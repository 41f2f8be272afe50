"""Generation as one loop: prefill (in chunks) -> sample -> decode steps -> stop checks -> streamed text.
Every caller (CLI, Python API, later the server) goes through `stream`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; decode speed counts the steps after it
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


@dataclass
class Prompt:
    """Prompt token ids, and for prompts with images their embeddings (1, T, E) and image blocks (T,)."""

    ids: list[int]
    embeds: torch.Tensor | None = None
    blocks: torch.Tensor | None = None


@dataclass
class Chunk:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last chunk


def check_context(n_prompt: int, max_context: int) -> None:
    if n_prompt < 1:
        raise InputError("the prompt is empty")
    if n_prompt >= max_context:
        raise InputError(f"prompt has {n_prompt} tokens but the context holds {max_context} "
                         f"(at most {max_context - 1} leave room for one new token)")


def chunk_bounds(n: int, chunk: int, blocks: torch.Tensor | None) -> list[tuple[int, int]]:
    """Prefill chunks of about `chunk` tokens; a chunk never ends inside an image block, whose tokens must see
    each other."""
    bounds, start = [], 0
    while start < n:
        end = min(start + chunk, n)
        if blocks is not None:
            while end < n and blocks[end] >= 0 and blocks[end] == blocks[end - 1]:
                end += 1
        bounds.append((start, end))
        start = end
    return bounds


@torch.inference_mode()
def prefill(model, prompt: Prompt | list[int], caches: list, chunk: int = 256) -> torch.Tensor:
    """Run the prompt through the model in chunks; float32 logits (V,) of its last position."""
    prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
    device = model.device
    ids = torch.tensor([prompt.ids], device=device)
    for a, b in chunk_bounds(len(prompt.ids), chunk, prompt.blocks):
        embeds = None if prompt.embeds is None else prompt.embeds[:, a:b]
        blocks = None if prompt.blocks is None else prompt.blocks[a:b]
        logits = model(ids[:, a:b], caches, embeds=embeds, last_only=True, blocks=blocks)
    return logits[0, -1].float()


@torch.inference_mode()
def generate_ids(model, prompt: Prompt | list[int], params: SamplingParams, stop_ids: set[int], max_context: int,
                 vocab_limit: int, stats: Stats, chunk: int = 256) -> Iterator[int]:
    """Token ids as they are sampled; the last one is a stop token when generation stopped on one.
    Sets stats.finish_reason to "stop" or "length" (max_tokens or a full context)."""
    prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
    n = len(prompt.ids)
    check_context(n, max_context)
    device = model.device
    caches = model.make_caches(capacity=min(max_context, n + params.max_tokens))
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float32, device=device)
    seen = torch.tensor([i for i in prompt.ids if i < model.config.vocab_size], dtype=torch.long, device=device)
    counts.index_add_(0, seen, torch.ones(len(seen), device=device))
    gen = params.generator(device)
    stats.prompt_tokens = n
    t0 = time.perf_counter()
    logits = prefill(model, prompt, caches, chunk)
    stats.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    position = n
    while True:
        logits[vocab_limit:] = float("-inf")  # rows past the tokenizer (262208-row 12B head) are never sampled
        token = sample(logits, counts, params, gen)
        stats.generated_tokens += 1
        stats.decode_seconds = time.perf_counter() - t1
        yield token
        if token in stop_ids:
            stats.finish_reason = "stop"
            return
        if stats.generated_tokens >= params.max_tokens or position + 1 >= max_context:
            stats.finish_reason = "length"
            return
        counts[token] += 1
        logits = model(torch.tensor([[token]], device=device), caches)[0, -1].float()
        position += 1


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string (held until resolved)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def stream(model, tokenizer: Tokenizer, prompt: Prompt | list[int], params: SamplingParams, max_context: int,
           stats: Stats | None = None, chunk: int = 256) -> Iterator[Chunk]:
    """Text chunks of the continuation; stop strings are cut (never emitted), stop tokens are not shown,
    and a character split across tokens is only emitted whole."""
    stats = stats if stats is not None else Stats()
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.config.stop_token_ids))
    decoder = tokenizer.stream(skip_special=True)
    pending, ids = "", []
    for token in generate_ids(model, prompt, params, stop_ids, max_context, tokenizer.vocab_size, stats, chunk):
        ids.append(token)
        if token in stop_ids:  # the generator is left suspended at its yield: record the reason here
            stats.finish_reason = "stop"
            break
        pending += decoder.push(token)
        if params.stop:
            hits = [(pending.find(s), s) for s in params.stop if s in pending]
            if hits:
                cut = min(hits)[0]
                stats.finish_reason = "stop"
                yield Chunk(pending[:cut], ids, "stop")
                return
            keep = _held_back(pending, params.stop)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            out, pending = pending, ""
        if out:
            yield Chunk(out, ids)
            ids = []
    tail = pending + decoder.flush()
    hits = [tail.find(s) for s in params.stop if s in tail]
    if hits:
        tail, stats.finish_reason = tail[:min(hits)], "stop"
    yield Chunk(tail, ids, stats.finish_reason)
