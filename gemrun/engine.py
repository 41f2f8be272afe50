"""Continuous batching: one thread owns the model and steps every request in flight together.

Each step prefills one chunk of one waiting prompt (so a long prompt never stalls the others for long), then
runs one batched decode forward for all sequences past their prompt (`generate.decode_step`). Sequences join
and leave between steps; each keeps its own caches, penalty counts, generator and grammar, so a seeded request
gives the same tokens alone or batched (the packed CPU kernels and per-row attention are batch-invariant).
Requests beyond `max_batch` wait in a bounded queue; past it, `submit` raises `Overloaded`.

With a drafter (`speculative.Speculator`, Gemma 4's MTP assistant), requests without logprobs or a grammar run
speculatively instead: each is its own batch-1 `Speculator.generate`, advanced one token per step (a round of
draft + verify costs one target forward and yields up to k + 1 tokens), so greedy output equals plain decoding.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import GemrunError, ModelLost
from .generate import Prompt, Sequence, Stats, Token, check_context, decode_step
from .quant.native import release_openmp_workers
from .sampling import SamplingParams

log = logging.getLogger("gemrun.engine")
RESERVE = 512  # output tokens of KV cache allocated up front per request; global-layer caches grow past it


class Overloaded(GemrunError):
    """The wait queue is full (HTTP 429)."""


class Unavailable(GemrunError):
    """The engine is stopping or stopped (HTTP 503)."""


@dataclass
class Done:
    """The last event of a request: why it ended, and its stats."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "timeout" | "shutdown" | "error"
    stats: Stats
    error: str | None = None


@dataclass
class Request:
    prompt: Prompt
    params: SamplingParams
    stop_ids: set[int]
    matcher: object | None = None
    logprobs: int | None = None
    deadline: float | None = None  # time.monotonic() after which the request is ended ("timeout")
    events: object = None  # asyncio.Queue (async callers) or queue.SimpleQueue
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq: Sequence | None = None
    spec: Iterator[int] | None = None  # speculative generation (token ids), instead of `seq`
    stats: Stats | None = None  # a speculative request's stats (a plain one's are seq.stats)
    submitted: float = field(default_factory=time.monotonic)
    group: object = None  # the client request this is one choice of (its `n` choices share a group)

    def emit(self, event: Token | Done) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        else:
            self.events.put(event)

    def cancel(self) -> None:
        """Ask the engine to drop this request; its caches are freed before the next step."""
        self.cancelled.set()

    async def __aiter__(self):
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, Done):
                return

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, Done):
                return


@dataclass
class Counters:
    """Totals since start, read by /metrics."""

    requests: int = 0
    finished: dict = field(default_factory=dict)  # finish reason -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and how many the target accepted
    accepted_tokens: int = 0


class Engine:
    def __init__(self, runtime, max_batch: int = 8, max_queue: int = 64, chunk: int = 256, draft=None):
        """`runtime`: a runtime.Runtime (a gemrun.api.Model is one). `draft`: a speculative.Speculator (default:
        the runtime's `draft`)."""
        from .quant.native import DENSE_ROWS

        if not 1 <= max_batch < DENSE_ROWS:  # a decode batch must stay on the packed kernels (batch-invariant)
            raise GemrunError(f"max_batch must be in 1..{DENSE_ROWS - 1}, got {max_batch}")
        self.runtime, self.max_batch, self.max_queue, self.chunk = runtime, max_batch, max_queue, chunk
        self.draft = draft if draft is not None else runtime.draft
        self.pool = runtime.pool  # finished sequences' caches, for prompts that share a prefix
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.counters = Counters()
        self._wake = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._cut = False  # stop() reached its deadline with requests in flight
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # set when the step loop itself died

    # --- called from request handlers -------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams, stop_ids: set[int], matcher=None,
               logprobs: int | None = None, timeout: float | None = None, group: object = None) -> Request:
        """Queue a request; iterate it (sync or async) for Token events and a final Done. Requests of one `group`
        (the choices of one client request) never hold more than `max_batch - 1` slots together, so one `n: 8`
        request cannot shut everyone else out of the batch."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        req = Request(prompt, params, stop_ids, matcher, logprobs,
                      None if timeout is None else time.monotonic() + timeout,
                      asyncio.Queue() if loop else queue.SimpleQueue(), loop, group=group)
        check_context(len(prompt.ids), self.runtime.max_context)  # fails the caller, before anything is queued
        with self._wake:
            if self.error is not None:
                raise Unavailable(f"the engine stopped: {self.error}")
            if not self._accepting or self._stopped:
                raise Unavailable("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are already waiting (queue limit {self.max_queue})")
            self.waiting.append(req)
            self.counters.requests += 1
            self._wake.notify()
        return req

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV cache held by requests in flight."""
        total = 0
        for req in list(self.active):
            seen = set()
            for c in req.seq.caches if req.seq else ():
                if id(c) not in seen:
                    seen.add(id(c))
                    total += c.nbytes
        return total

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the step loop's thread, the one that computes from here on: the calling thread lets its OpenMP
        workers go (`native.release_openmp_workers`), or each of the engine's parallel regions would run throttled."""
        release_openmp_workers()
        self._thread = threading.Thread(target=self._run, name="gemrun-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, deadline: float = 10.0) -> None:
        """Refuse new work, let requests in flight finish for up to `deadline` seconds, then end the rest with
        finish reason "shutdown" (each still gets its Done event, so every reply ends well-formed)."""
        with self._wake:
            self._accepting = False
            self._wake.notify()
        end = time.monotonic() + deadline
        while (self.active or self.waiting) and time.monotonic() < end and self.alive:
            time.sleep(0.02)
        with self._wake:
            self._cut = bool(self.active or self.waiting)
            self._stopped = True
            for req in list(self.waiting) + list(self.active):
                req.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the step loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self.waiting and not self.active and not self._stopped:
                        self._wake.wait()
                    if self._stopped and not self.waiting and not self.active:
                        return
                    admitted = self._admissions()
                    stopping = self._stopped
                if stopping:  # end everything still here and exit
                    for req in list(self.active) + list(self.waiting):
                        self._end(req, "shutdown")
                    self.waiting.clear()
                    return
                for req in admitted:  # caches exist only for admitted requests, never for waiting ones
                    self._admit(req)
                t0 = time.perf_counter()
                try:
                    self._step()
                except ModelLost:  # the model cannot run any more (a tensor-parallel rank is gone): stop
                    raise
                except Exception as e:  # e.g. out of memory in a batched forward: fail the batch, keep serving
                    log.exception("engine step failed")
                    for req in list(self.active):
                        self._end(req, "error", f"{type(e).__name__}: {e}")
                self.counters.busy_seconds += time.perf_counter() - t0
                self.counters.steps += 1
        except Exception as e:  # a bug in the loop: fail every request rather than hang them
            log.exception("engine step loop died")
            self.error = f"{type(e).__name__}: {e}"
            for req in list(self.active) + list(self.waiting):
                self._end(req, "error", self.error)

    def _admissions(self) -> list[Request]:
        """The waiting requests that take the free slots, oldest first; one group (a request's `n` choices) may
        hold at most `max_batch - 1` slots, so another client can always start."""
        share = max(1, self.max_batch - 1)
        held = Counter(r.group for r in self.active if r.group is not None)
        admitted = []
        for req in list(self.waiting):
            if len(self.active) + len(admitted) >= self.max_batch:
                break
            if req.group is not None and held[req.group] >= share:
                continue
            held[req.group] += 1
            self.waiting.remove(req)
            admitted.append(req)
        self.active += admitted  # in flight from here on (stop() must see them), caches made outside the lock
        return admitted

    def _admit(self, req: Request) -> None:
        if self.draft is not None and req.matcher is None and req.logprobs is None:
            req.stats = Stats()
            req.spec = self.draft.generate(self.runtime.model, req.prompt, req.params, req.stop_ids,
                                           self.runtime.max_context, self.runtime.tokenizer.vocab_size, req.stats,
                                           self.chunk)
            return
        try:
            req.seq = Sequence(self.runtime.model, req.prompt, req.params, req.stop_ids, self.runtime.max_context,
                               self.runtime.tokenizer.vocab_size, req.matcher, req.logprobs, self.chunk,
                               reserve=RESERVE, pool=self.pool)
        except Exception as e:
            self._end(req, "error", _message(e))

    def _step(self) -> None:
        now = time.monotonic()
        for req in list(self.active):
            if req.cancelled.is_set():
                self._end(req, "shutdown" if self._cut else "cancelled")
            elif req.deadline is not None and now > req.deadline:
                self._end(req, "timeout", "the request ran past its deadline")
        for req in [r for r in self.active if r.spec is not None]:
            self._advance(req)
        prefilling = [r for r in self.active if r.spec is None and not r.seq.prefilled]
        if prefilling:  # one chunk of the oldest prompt per step
            req = prefilling[0]
            try:
                req.seq.prefill_step()
                if req.seq.prefilled:
                    self.counters.prompt_tokens += len(req.seq.prompt.ids)
                    self._deliver(req, req.seq.choose(req.seq.logits))
            except ModelLost:
                raise
            except Exception as e:
                self._end(req, "error", _message(e))
        decoding = [r for r in self.active
                    if r.spec is None and r.seq.prefilled and r.seq.tokens and not r.seq.finished]
        if decoding:
            logits = decode_step(self.runtime.model, [r.seq for r in decoding])  # (B, V)
            for req, row in zip(decoding, logits):
                try:  # non-finite logits (or a grammar error) fail only their own request
                    self._deliver(req, req.seq.choose(row))
                except Exception as e:
                    self._end(req, "error", _message(e))

    def _advance(self, req: Request) -> None:
        """The next token of a speculative request (its first call prefills the whole prompt)."""
        try:
            token = next(req.spec)
        except StopIteration:
            return self._end(req, req.stats.finish_reason or "stop")
        except Exception as e:
            return self._end(req, "error", _message(e))
        if req.stats.generated_tokens == 1:
            self.counters.prompt_tokens += req.stats.prompt_tokens
        self.counters.generated_tokens += 1
        req.emit(Token(token))
        if req.stats.finish_reason is not None:
            self._end(req, req.stats.finish_reason)

    def _deliver(self, req: Request, token: Token) -> None:
        self.counters.generated_tokens += 1
        req.emit(token)
        if req.seq.finished:
            self._end(req, req.seq.finish_reason)

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        if req in self.active:
            self.active.remove(req)
        if req.spec is not None:
            req.spec.close()  # its Sequence, caches included, goes with the generator
            req.spec, stats = None, req.stats
            stats.finish_reason = reason
            self.counters.drafted_tokens += stats.drafted_tokens
            self.counters.accepted_tokens += stats.accepted_tokens
        elif req.seq is not None:
            req.seq.finish(reason)
            stats = req.seq.stats
            if reason == "error":  # caches a failed step left half-written are never reused
                req.seq.pool = None
            req.seq.release()  # to the prefix pool, or freed now (not when the handler lets go of the request)
        else:
            stats = req.stats or Stats()
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
        req.emit(Done(reason, stats, error))


def _message(e: Exception) -> str:
    if isinstance(e, GemrunError):
        return str(e)
    log.error("request failed: %s: %s", type(e).__name__, e)
    return f"internal error ({type(e).__name__})"
