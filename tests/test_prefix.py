"""Prefix reuse: a request takes the KV caches of an earlier sequence that shares its prefix and prefills only the
rest. Every turn's greedy tokens and logits equal a cold run's: with sliding windows that wrapped (tiny models with
a window of 8), with Gemma 4's thoughts stripped between turns (the next prompt diverges at the reply), with images
(the key holds a hash of each soft token), after an earlier message is edited, and when the pool evicts."""

from __future__ import annotations

import json
import random

import pytest
from tiny import hf_mm_model, hf_model, save_mm_dir, write_gguf

import gemrun
from gemrun.generate import Sequence, decode_step, stop_ids_for
from gemrun.prefix import PrefixPool
from gemrun.sampling import SamplingParams

WORDS = "the sea is blue and deep a ship sails on the waves under grey sky birds fly over it".split()
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "tiny.gguf"
    write_gguf(path, hf_model(seed=41, sliding_window=8))
    return gemrun.load(path, device="cpu", dtype="float32", max_context=512)


def run(m, prompt, pool, params=GREEDY):
    """(token ids, logits of every step, prompt tokens reused) of one greedy sequence."""
    seq = Sequence(m.model, prompt, params, stop_ids_for(m.model, params), m.max_context, m.tokenizer.vocab_size,
                   pool=pool)
    rows = []
    while not seq.prefilled:
        seq.prefill_step()
    rows.append(seq.logits.clone())
    seq.choose(seq.logits)
    while not seq.finished:
        row = decode_step(m.model, [seq])[0]
        rows.append(row.clone())
        seq.choose(row)
    seq.release()
    return [t.id for t in seq.tokens], rows, seq.stats.cached_tokens


def same(warm, cold, tol=1e-4) -> None:
    assert warm[0] == cold[0]
    for a, b in zip(warm[1], cold[1]):
        assert (a - b).abs().max() <= tol


def sentence(rng) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def test_twenty_conversations_equal_cold_runs(tiny3):
    pool, reused = PrefixPool(1 << 30), []
    rng = random.Random(0)
    for _ in range(20):
        messages = []
        for _turn in range(3):
            messages.append({"role": "user", "content": sentence(rng)})
            prompt = tiny3.chat_prompt(messages)
            warm, cold = run(tiny3, prompt, pool), run(tiny3, prompt, None)
            same(warm, cold)
            reused.append(warm[2])
            messages.append({"role": "assistant", "content": tiny3.tokenizer.decode(warm[0], skip_special=True)})
    assert sum(r > 0 for r in reused) >= 30  # turns 2 and 3 of each conversation (40) mostly reuse


def test_interleaved_conversations_edits_and_eviction(tiny3):
    rng = random.Random(1)
    conversations = [[{"role": "user", "content": sentence(rng)}] for _ in range(4)]
    for pool in (PrefixPool(1 << 30), PrefixPool(1 << 30, max_entries=2), PrefixPool(1)):  # 1 byte: none kept
        convs = [list(c) for c in conversations]
        for _turn in range(3):
            for c in convs:  # interleaved: A, B, C, D, A, B, ...
                prompt = tiny3.chat_prompt(c)
                warm = run(tiny3, prompt, pool)
                same(warm, run(tiny3, prompt, None))
                c += [{"role": "assistant", "content": tiny3.tokenizer.decode(warm[0], skip_special=True)},
                      {"role": "user", "content": sentence(rng)}]
        edited = [{"role": "user", "content": "an edited first message"}] + convs[0][1:]
        prompt = tiny3.chat_prompt(edited)
        same(run(tiny3, prompt, pool), run(tiny3, prompt, None))
        if pool.max_bytes == 1:
            assert pool.hits == 0 and not pool.entries


def test_an_identical_prompt_computes_nothing_and_samples_as_a_cold_run(tiny3):
    """A repeated request (a retry, `n` choices, another seed) takes the whole prompt with the logits it ended on:
    nothing is prefilled, and seeded sampling gives what a cold run gives, bit for bit."""
    pool = PrefixPool(1 << 30)
    prompt = tiny3.chat_prompt([{"role": "user", "content": "the sea is blue and deep"}])
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=8)
    cold = run(tiny3, prompt, PrefixPool(0), sampled)  # cold, with the same cache layout (a checkpoint at its end)
    first = run(tiny3, prompt, pool, sampled)
    again = run(tiny3, prompt, pool, sampled)
    assert first[2] == 0 and again[2] == len(prompt.ids)
    assert again[0] == first[0] == cold[0]
    assert all(bool((a == b).all()) for a, b in zip(again[1], cold[1]))
    assert all(bool((a == b).all()) for a, b in zip(first[1], cold[1]))
    other = run(tiny3, prompt, pool, SamplingParams(temperature=1.0, seed=4, max_tokens=8))
    assert other[2] == len(prompt.ids)
    assert other[0] == run(tiny3, prompt, PrefixPool(0), SamplingParams(temperature=1.0, seed=4, max_tokens=8))[0]
    longer = tiny3.chat_prompt([{"role": "user", "content": "the sea is blue and deep and grey"}])
    assert run(tiny3, longer, pool)[2] < len(longer.ids)  # a different prompt still prefills its own end


def test_common_prefix_of_keys():
    """The pool compares keys as bytes (`_ids`) by a binary search of memcmp'd prefixes: the same length as
    walking the two lists, at any limit."""
    from gemrun.prefix import _common, _ids

    rng = random.Random(3)
    for _ in range(3000):
        a = [rng.randrange(4) for _ in range(rng.randrange(40))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(40))]
        limit = rng.randrange(-2, 45)
        n = 0
        while n < min(len(a), len(b), limit) and a[n] == b[n]:
            n += 1
        assert _common(_ids(a), _ids(b), limit) == n
    assert _common(_ids([5, 2**40, 7]), _ids([5, 0, 7]), 9) == 1  # ids differing only past their low bytes


@pytest.mark.parametrize("think", [True, False])
@pytest.mark.parametrize("reply", [8, 24])  # within the sliding window of 8, and longer (a long thought)
def test_gemma4_with_thoughts_stripped(tmp_path, reply, think):
    """Thinking on: the history's replies lose their thoughts, so the next prompt diverges at the previous
    reply; the prompt-end checkpoint of the sliding layers is what makes the prefix reusable, also when the reply
    outgrew the window (the checkpoint's ring was copied aside). Thinking off: the prompt ends on an empty thought
    channel the history does not repeat, so the next prompt diverges a few tokens before the previous one's end;
    the rings' spare slots (`cache.REWIND`) let the cache be rewound there."""
    from tiny_gemma4 import write_model_dir

    from gemrun.prefix import _common, _ids

    m = gemrun.load(str(write_model_dir(tmp_path / "g4")), dtype="float32")
    pool, rng, params = PrefixPool(1 << 30), random.Random(2), SamplingParams(temperature=0, max_tokens=reply)
    for _ in range(3):
        messages, before = [], []
        for turn in range(3):
            messages.append({"role": "user", "content": sentence(rng)})
            prompt = m.chat_prompt(messages, think=think)
            warm = run(m, prompt, pool, params)
            same(warm, run(m, prompt, None, params))
            shared = _common(_ids(before), _ids(prompt.ids), len(before))  # where it diverges from the previous prompt
            assert warm[2] >= shared and (not before or shared >= len(before) - (0 if think else 4))
            before = prompt.ids
            thought = f"<|channel>thought\nturn {turn} thoughts<channel|>" if think else ""
            messages.append({"role": "assistant", "content": thought + sentence(rng)})


def test_images_are_part_of_the_key(tmp_path):
    import io

    from PIL import Image

    save_mm_dir(hf_mm_model(seed=3), tmp_path / "mm")
    m = gemrun.load(tmp_path / "mm", device="cpu", dtype="float32")

    def png(color) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buf, format="PNG")
        return buf.getvalue()

    def turn(image: bytes, follow: bool):
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what"}]}]
        if follow:
            msgs += [{"role": "assistant", "content": "a thing"}, {"role": "user", "content": "and then"}]
        return m.chat_prompt(msgs)

    pool = PrefixPool(1 << 30)
    red, blue = png((250, 10, 10)), png((10, 10, 250))
    first = run(m, turn(red, False), pool)
    warm = run(m, turn(red, True), pool)
    same(warm, run(m, turn(red, True), None))
    assert warm[2] > 0
    other = run(m, turn(blue, True), pool)  # the same ids, another image: reused only up to the image
    same(other, run(m, turn(blue, True), None))
    placeholder = turn(blue, True).ids.index(502)
    assert other[2] <= placeholder and first[0]


def test_server_reports_cached_tokens(tiny3):
    import httpx
    from server_util import PATIENCE, LiveServer

    with LiveServer(lambda: tiny3) as s:
        name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
        msgs = [{"role": "user", "content": "the sea is blue"}]
        body = {"model": name, "messages": msgs, "max_tokens": 6, "temperature": 0}
        first = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=PATIENCE).json()
        msgs += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "and the sky"}]
        second = httpx.post(s.url + "/v1/chat/completions", json={**body, "messages": msgs}, timeout=PATIENCE).json()
        cached, usage = second["usage"]["prompt_tokens_details"]["cached_tokens"], second["usage"]
        assert 0 < cached < usage["prompt_tokens"]
        timings = second["timings"]  # llama.cpp server's: what was reused, what was prefilled and how fast
        assert timings["cache_n"] == cached and timings["prompt_n"] == usage["prompt_tokens"] - cached
        assert timings["predicted_n"] == usage["completion_tokens"] and timings["prompt_ms"] > 0
        assert timings["prompt_per_second"] == pytest.approx(1000 * timings["prompt_n"] / timings["prompt_ms"])
        # streamed, n = 2: the last choice's final chunk carries them, once; the identical prompt prefills nothing
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=PATIENCE,
                          json={**body, "messages": msgs, "stream": True, "n": 2,
                                "stream_options": {"include_usage": True}}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        timed = [i for i, c in enumerate(chunks) if "timings" in c]
        ends = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"]]
        assert timed == ends[-1:] and len(ends) == 2
        again = chunks[timed[0]]["timings"]
        assert again["cache_n"] == usage["prompt_tokens"] and again["prompt_n"] == 0
        assert again["predicted_n"] == chunks[-1]["usage"]["completion_tokens"] > 0
        tiny3.pool.clear()
        cold = tiny3.chat(msgs, SamplingParams(temperature=0, max_tokens=6))
        assert second["choices"][0]["message"]["content"] == cold
        assert s.metric("gemrun_prefix_cache_hits_total") >= 1 and s.metric("gemrun_prefix_cache_bytes") > 0
        olla = httpx.post(s.url + "/api/chat", json={"model": name, "messages": msgs, "stream": False,
                                                     "options": {"num_predict": 4, "temperature": 0}},
                          timeout=PATIENCE).json()
        assert olla["prompt_eval_count"] < len(tiny3.chat_prompt(msgs).ids)  # only the new tokens, as Ollama
