"""Generation as one loop: prefill (in chunks) -> sample -> decode steps -> stop checks -> streamed text.
Every caller (CLI, Python API, later the server) goes through `stream`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import REWIND, trim_buffers
from .errors import InputError
from .sampling import SamplingParams, probabilities, sample, speculative_choice
from .tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None
    drafted_tokens: int = 0  # speculative decoding: tokens the drafter proposed, and how many the target kept
    accepted_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from an earlier sequence (prefix reuse)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

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
    in_thought: bool = False  # Gemma 4: the prompt ends inside an open thought channel
    key: list[int] | None = None  # what prefix reuse compares: ids, media soft tokens as hashes of their content

    @property
    def cache_key(self) -> list[int]:
        return self.key if self.key is not None else self.ids


@dataclass
class Token:
    """A sampled token; with logprobs asked for, its log-probability and the top alternatives (id, logprob)
    under the model's distribution (before sampling filters, as OpenAI and vLLM report them)."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Chunk:
    text: str
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last chunk

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]


def check_context(n_prompt: int, max_context: int) -> None:
    if n_prompt < 1:
        raise InputError("the prompt is empty")
    if n_prompt >= max_context:
        raise InputError(f"prompt has {n_prompt} tokens but the context holds {max_context} "
                         f"(at most {max_context - 1} leave room for one new token)")


def chunk_bounds(n: int, chunk: int, blocks: torch.Tensor | None, start: int = 0) -> list[tuple[int, int]]:
    """Prefill chunks of about `chunk` tokens from `start` on; a chunk never ends inside an image block, whose
    tokens must see each other."""
    bounds = []
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
    for a, b in chunk_bounds(len(prompt.ids), chunk, prompt.blocks):
        logits = prefill_chunk(model, prompt, caches, a, b)
    return logits


def chunk_inputs(model, prompt: Prompt, a: int, b: int) -> tuple:
    """(ids (1, T), embeds (1, T, E) or None, blocks (T,) or None) of prompt positions a..b."""
    ids = torch.tensor([prompt.ids[a:b]], device=model.device)
    embeds = None if prompt.embeds is None else prompt.embeds[:, a:b]
    blocks = None if prompt.blocks is None else prompt.blocks[a:b]
    return ids, embeds, blocks


def prefill_chunk(model, prompt: Prompt, caches: list, a: int, b: int) -> torch.Tensor:
    """Prompt positions a..b into the caches; float32 logits (V,) of position b - 1."""
    ids, embeds, blocks = chunk_inputs(model, prompt, a, b)
    return model(ids, caches, embeds=embeds, last_only=True, blocks=blocks)[0, -1].float()


class Sequence:
    """One generation in flight: caches, penalty counts, its own generator, an optional grammar, the output.

    Lifecycle: `prefill_step()` until `prefilled`, then a token is chosen from each step's logits with `choose`
    (the engine batches the decode forwards of many sequences; `generate_ids` runs one alone). With a `pool`
    (`cache.PrefixPool`), the caches of an earlier sequence sharing a prefix are taken from it, only the rest of
    the prompt is prefilled, and `release()` gives the caches back at the end."""

    def __init__(self, model, prompt: Prompt | list[int], params: SamplingParams, stop_ids: set[int],
                 max_context: int, vocab_limit: int, matcher=None, logprobs: int | None = None,
                 chunk: int = 256, stats: Stats | None = None, reserve: int | None = None, spare: int = 0,
                 keep_hidden: bool = False, pool=None):
        self.prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        n = len(self.prompt.ids)
        check_context(n, max_context)
        self.model, self.params, self.stop_ids, self.max_context = model, params, stop_ids, max_context
        self.vocab_limit, self.matcher, self.logprobs = vocab_limit, matcher, logprobs
        device = model.device
        # global-layer caches are preallocated for `reserve` new tokens (default: all of max_tokens) and grow
        # by doubling past that
        want = params.max_tokens if reserve is None else min(params.max_tokens, reserve)
        self.pool = pool
        reused = None if pool is None else pool.take(self.prompt.cache_key, self.prompt.blocks, not keep_hidden)
        if pool is not None:
            spare = max(spare, REWIND)  # a next turn may diverge a few tokens before this prompt's end
        self.caches, cached, self.end_logits = reused or (model.make_caches(capacity=min(max_context, n + want),
                                                                            spare=spare), 0, None)
        self.counts: torch.Tensor | None = None  # (V,) tokens seen, kept only when a penalty reads it
        if params.penalized:
            self.counts = torch.zeros(model.config.vocab_size, dtype=torch.float32, device=device)
            seen = torch.tensor([i for i in self.prompt.ids if i < model.config.vocab_size], dtype=torch.long,
                                device=device)
            self.counts.index_add_(0, seen, torch.ones(len(seen), device=device))
        self.gen = params.generator(device)
        # an identical prompt's end came with its logits: one empty step (n, n) hands them over
        self.chunks = [(n, n)] if self.end_logits is not None else chunk_bounds(n, chunk, self.prompt.blocks,
                                                                                  start=cached)
        self.logits: torch.Tensor | None = None  # (V,) of the last position, once prefilled
        self.keep_hidden = keep_hidden  # speculative decoding starts from the last final-normed hidden state
        self.hidden: torch.Tensor | None = None  # (1, 1, E), with keep_hidden
        self.tokens: list[Token] = []
        self.finish_reason: str | None = None
        self.stats = stats if stats is not None else Stats()
        self.stats.prompt_tokens, self.stats.cached_tokens = n, cached
        self._t0 = time.perf_counter()

    @property
    def prefilled(self) -> bool:
        return not self.chunks

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        return self.caches[0].length

    @torch.inference_mode()
    def prefill_step(self) -> None:
        a, b = self.chunks.pop(0)
        if a == b:
            self.logits = self.end_logits.clone()  # `choose` masks the logits in place
        elif self.keep_hidden:
            ids, embeds, blocks = chunk_inputs(self.model, self.prompt, a, b)
            self.hidden = self.model.hidden(ids, self.caches, embeds, blocks)[:, -1:]
            self.logits = self.model.project(self.hidden)[0, -1].float()
        else:
            self.logits = prefill_chunk(self.model, self.prompt, self.caches, a, b)
        if not self.chunks:
            trim_buffers()  # a long prompt's converted-read buffers
            self.stats.prefill_seconds = time.perf_counter() - self._t0
            self._t1 = time.perf_counter()
            if self.pool is not None:  # a later prompt may diverge anywhere from here on (a reply re-rendered)
                for c in self.caches:
                    c.checkpoint()
                if not self.keep_hidden:
                    self.end_logits = self.logits.clone()

    @torch.inference_mode()
    def choose(self, logits: torch.Tensor) -> Token:
        """Sample the next token from float32 logits (V,); sets finish_reason when it ends the sequence."""
        logits, raw = self._filter(logits)
        return self._commit(sample(logits, self.counts, self.params, self.gen), raw)

    @torch.inference_mode()
    def choose_draft(self, logits: torch.Tensor, draft: int, q: torch.Tensor | None) -> Token:
        """The next token given a drafted one, by the standard speculative rule: greedy keeps the target's
        choice; sampling accepts the draft with probability min(1, p/q) and otherwise draws from the residual
        max(p - q, 0), so tokens follow the target's distribution p exactly. q (V,) is what the draft was drawn
        from."""
        logits, raw = self._filter(logits)
        if q is None:  # greedy drafting
            return self._commit(sample(logits, self.counts, self.params, self.gen), raw)
        p = probabilities(logits, self.counts, self.params)
        return self._commit(speculative_choice(p, q, draft, self.gen), raw)

    def _filter(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits[self.vocab_limit:] = float("-inf")  # rows past the tokenizer (262208-row 12B head) never sampled
        logits[list(self.model.config.suppress_token_ids)] = float("-inf")  # generation_config suppress_tokens
        raw = logits.clone() if self.logprobs is not None else None
        if self.params.logit_bias:
            ids = torch.tensor(list(self.params.logit_bias), device=logits.device)
            logits.index_add_(0, ids, torch.tensor(list(self.params.logit_bias.values()), device=logits.device))
        if self.matcher is not None:
            self.matcher.mask(logits)
        return logits, raw

    def _commit(self, token_id: int, raw: torch.Tensor | None) -> Token:
        token = Token(token_id)
        if raw is not None:
            lp = torch.log_softmax(raw, -1)
            token.logprob = float(lp[token.id])
            if self.logprobs:
                top = torch.topk(lp, self.logprobs)
                token.top = list(zip(top.indices.tolist(), top.values.tolist()))
        if self.matcher is not None:
            self.matcher.accept(token.id)
        self.tokens.append(token)
        if self.counts is not None:
            self.counts[token.id] += 1
        self.stats.generated_tokens += 1
        self.stats.decode_seconds = time.perf_counter() - self._t1
        if token.id in self.stop_ids or (self.matcher is not None and self.matcher.is_terminated):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens or self.position + 1 >= self.max_context:
            self.finish_reason = "length"
        self.stats.finish_reason = self.finish_reason
        return token

    def finish(self, reason: str) -> None:
        self.finish_reason = self.stats.finish_reason = reason

    def release(self) -> None:
        """Give the caches to the pool (under the key of the tokens they hold), or drop them."""
        if self.pool is not None and self.caches:
            key = self.prompt.cache_key + [t.id for t in self.tokens]
            end = (len(self.prompt.ids), self.end_logits) if self.end_logits is not None and self.prefilled else None
            self.pool.put(key[:self.caches[0].length], self.caches, end)
        self.caches = []


@torch.inference_mode()
def decode_step(model, sequences: list[Sequence]) -> torch.Tensor:
    """One batched forward for the last token of every sequence -> float32 logits (B, V); each sequence then
    chooses its next token from its row."""
    tokens = torch.tensor([[s.tokens[-1].id] for s in sequences], device=model.device)
    return model.decode(tokens, [s.caches for s in sequences])[:, -1].float()


def generate_ids(model, prompt: Prompt | list[int], params: SamplingParams, stop_ids: set[int], max_context: int,
                 vocab_limit: int, stats: Stats, chunk: int = 256, draft=None, pool=None) -> Iterator[int]:
    """Token ids as they are sampled; the last one is a stop token when generation stopped on one.
    Sets stats.finish_reason to "stop" or "length" (max_tokens or a full context). `draft` (a
    `speculative.Speculator`) drafts tokens that the model verifies several at a time. `pool` (a
    `cache.PrefixPool`) reuses an earlier sequence's caches for a shared prefix and keeps these ones after."""
    if draft is not None:
        yield from draft.generate(model, prompt, params, stop_ids, max_context, vocab_limit, stats, chunk)
        return
    seq = Sequence(model, prompt, params, stop_ids, max_context, vocab_limit, chunk=chunk, stats=stats, pool=pool)
    try:
        while not seq.prefilled:
            seq.prefill_step()
        yield seq.choose(seq.logits).id
        while not seq.finished:
            yield seq.choose(decode_step(model, [seq])[0]).id
    finally:  # also when the caller stops early (a stop string, Ctrl-C)
        seq.release()


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string (held until resolved)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


class TextStream:
    """Sampled tokens -> text pieces: stop tokens are not shown, stop strings are cut (held back until it is
    clear they do not match), and a character split across tokens is only emitted whole. Used by `stream` and
    by the server for every request, so streamed text equals non-streamed text."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], stop_ids: set[int], keep_special: bool = False):
        self.decoder = tokenizer.stream(skip_special=not keep_special)
        self.stop, self.stop_ids = stop, stop_ids
        self.pending, self.tokens = "", []
        self.stopped = False  # a stop string matched: nothing more is to be shown

    def push(self, token: Token) -> Chunk | None:
        self.tokens.append(token)
        if token.id in self.stop_ids:
            return None
        self.pending += self.decoder.push(token.id)
        if self.stop:
            hits = [self.pending.find(s) for s in self.stop if s in self.pending]
            if hits:
                self.stopped = True
                text, self.pending = self.pending[:min(hits)], ""
                return Chunk(text, self._take(), "stop")
            keep = _held_back(self.pending, self.stop)
        else:
            keep = 0
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return Chunk(out, self._take()) if out else None

    def flush(self, finish_reason: str | None) -> Chunk:
        """The last chunk: what was held back (cut at a stop string found in it) with the finish reason."""
        if self.stopped:
            return Chunk("", self._take(), "stop")
        tail = self.pending + self.decoder.flush()
        hits = [tail.find(s) for s in self.stop if s in tail]
        if hits:
            tail, finish_reason = tail[:min(hits)], "stop"
        return Chunk(tail, self._take(), finish_reason)

    def _take(self) -> list[Token]:
        tokens, self.tokens = self.tokens, []
        return tokens


def stop_ids_for(model, params: SamplingParams) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(model.config.stop_token_ids))


def stream(model, tokenizer: Tokenizer, prompt: Prompt | list[int], params: SamplingParams, max_context: int,
           stats: Stats | None = None, chunk: int = 256, draft=None, keep_special: bool = False,
           pool=None) -> Iterator[Chunk]:
    """Text chunks of the continuation (see TextStream); the last one carries the finish reason.
    `keep_special` keeps control tokens in the text (Gemma 4's channel and tool-call syntax, parsed later)."""
    stats = stats if stats is not None else Stats()
    stop_ids = stop_ids_for(model, params)
    text = TextStream(tokenizer, params.stop, stop_ids, keep_special)
    for token in generate_ids(model, prompt, params, stop_ids, max_context, tokenizer.vocab_size, stats, chunk,
                              draft, pool):
        piece = text.push(Token(token))
        if text.stopped:
            stats.finish_reason = "stop"
            yield piece
            return
        if piece is not None:
            yield piece
    last = text.flush(stats.finish_reason)
    stats.finish_reason = last.finish_reason
    yield last
