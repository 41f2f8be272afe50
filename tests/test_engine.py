"""Continuous batching engine: batched decoding equals decoding alone, queue limits, cancellation, deadlines,
failures confined to one request."""

from __future__ import annotations

import time

import pytest
import torch
from tiny import hf_model, write_gguf

import gemrun
from gemrun.engine import Done, Engine, Overloaded, Unavailable
from gemrun.errors import InputError
from gemrun.generate import Prompt, Sequence, Token, decode_step, prefill
from gemrun.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / "tiny.gguf"
    write_gguf(path, hf_model(seed=5, sliding_window=6))
    return gemrun.load(path, device="cpu", dtype="float32", max_context=128)


def tokens_of(req) -> list[int]:
    return [e.id for e in req if isinstance(e, Token)]


def test_batched_decode_matches_each_sequence_alone(tiny):
    """Rows at different positions (past the sliding window), each with its own caches."""
    net = tiny.model
    prompts = [[2, *range(300, 300 + n)] for n in (3, 9, 17)]
    alone = []
    for p in prompts:
        caches = net.make_caches()
        prefill(net, p, caches)
        alone.append([net(torch.tensor([[t]]), caches)[0, -1] for t in (400, 401, 402, 403, 404, 405, 406, 407)])
    seqs = [net.make_caches() for _ in prompts]
    for p, c in zip(prompts, seqs):
        prefill(net, p, c)
    for step, t in enumerate((400, 401, 402, 403, 404, 405, 406, 407)):
        rows = net.decode(torch.tensor([[t]] * 3), seqs)[:, -1]
        for i in range(3):
            assert (rows[i] - alone[i][step]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype, kv", [("bfloat16", "auto"), ("auto", "bf16")])  # the latter: serve's default
def test_packed_batching_is_exact_on_the_real_270m(dtype, kv):
    m = gemrun.load(dtype=dtype, kv_cache=kv)
    net = m.model
    prompts = [m.tokenizer.encode(t, bos=True) for t in ("The sea is", "def add(a, b):", "One two three")]
    seqs = [Sequence(net, p, SamplingParams(temperature=0, max_tokens=12), set(), 256, 262144) for p in prompts]
    for s in seqs:
        while not s.prefilled:
            s.prefill_step()
        s.choose(s.logits)
    for _ in range(11):
        logits = decode_step(net, seqs)
        for s, row in zip(seqs, logits):
            s.choose(row)
    for p, s in zip(prompts, seqs):
        solo = Sequence(net, p, SamplingParams(temperature=0, max_tokens=12), set(), 256, 262144)
        while not solo.prefilled:
            solo.prefill_step()
        solo.choose(solo.logits)
        while not solo.finished:
            solo.choose(decode_step(net, [solo])[0])
        assert [t.id for t in solo.tokens] == [t.id for t in s.tokens]


def test_engine_runs_requests_together_and_frees_caches(tiny):
    eng = Engine(tiny, max_batch=4, max_queue=8).start()
    try:
        params = [SamplingParams(max_tokens=20, seed=i, ignore_eos=True) for i in range(6)]
        solo = [tokens_of(eng.submit(Prompt([2, 300 + i, 301]), p, set())) for i, p in enumerate(params)]
        reqs = [eng.submit(Prompt([2, 300 + i, 301]), p, set()) for i, p in enumerate(params)]
        together = [tokens_of(r) for r in reqs]
        assert [len(t) for t in together] == [20] * 6
        # float32 dense matmuls differ in the last bits between batch sizes; seeded sampling rarely notices
        assert sum(a == b for a, b in zip(solo, together)) >= 5
        assert eng.running == 0 and eng.cache_bytes == 0 and eng.counters.finished["length"] == 12
    finally:
        eng.stop()


def test_queue_limit_cancel_and_deadline(tiny):
    eng = Engine(tiny, max_batch=1, max_queue=1).start()
    try:
        long = SamplingParams(max_tokens=100, ignore_eos=True)
        first = eng.submit(Prompt([2, 300]), long, set())
        while eng.queue_depth:
            time.sleep(0.01)
        second = eng.submit(Prompt([2, 301]), long, set())  # waits: the batch holds one
        with pytest.raises(Overloaded):
            eng.submit(Prompt([2, 302]), long, set())
        first.cancel()
        events = list(first)
        assert events[-1].finish_reason == "cancelled" and len(events) < 101
        while eng.queue_depth:  # the freed slot goes to the waiting request
            time.sleep(0.01)
        timed = eng.submit(Prompt([2, 303]), SamplingParams(max_tokens=100000, ignore_eos=True), set(),
                           timeout=0.3)
        assert list(second)[-1].finish_reason == "length"
        assert list(timed)[-1].finish_reason == "timeout"
        with pytest.raises(InputError, match="context holds 128"):
            eng.submit(Prompt([2] * 200), long, set())
    finally:
        eng.stop()
    with pytest.raises(Unavailable):
        eng.submit(Prompt([2, 300]), long, set())


def test_a_failing_request_does_not_disturb_the_others(tiny, monkeypatch):
    good_prompt, bad_prompt = Prompt([2, 300, 301]), Prompt([2, 300, 301])
    original = Sequence.choose

    def choose(self, logits):  # the bad request's logits turn non-finite at its 4th token
        if self.prompt is bad_prompt and len(self.tokens) == 3:
            with torch.inference_mode():
                logits.fill_(float("nan"))
        return original(self, logits)

    monkeypatch.setattr(Sequence, "choose", choose)
    eng = Engine(tiny, max_batch=4).start()
    try:
        params = SamplingParams(max_tokens=10, ignore_eos=True, seed=1)
        good = eng.submit(good_prompt, params, set())
        bad = eng.submit(bad_prompt, params, set())
        end = list(bad)[-1]
        assert end.finish_reason == "error" and "finite" in end.error
        events = list(good)
        assert isinstance(events[-1], Done) and events[-1].finish_reason == "length" and len(events) == 11
        assert eng.alive
    finally:
        eng.stop()


def test_shutdown_lets_in_flight_work_finish(tiny):
    eng = Engine(tiny, max_batch=2).start()
    req = eng.submit(Prompt([2, 300]), SamplingParams(max_tokens=30, ignore_eos=True), set())
    time.sleep(0.05)
    eng.stop(deadline=30)
    assert list(req)[-1].finish_reason == "length"
    assert not eng.alive
