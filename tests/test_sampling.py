"""Sampling: pure processors, determinism, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from gemrun.errors import InputError
from gemrun.sampling import SamplingParams, apply_penalties, min_p_filter, sample, top_k_filter, top_p_filter


def test_defaults_follow_gemma3_generation_config():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 64, 0.95)
    assert p.repetition_penalty == 1.0 and p.presence_penalty == 0 and p.frequency_penalty == 0


def test_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.71)).tolist() == [True, True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [True, False, False, False, False]
    assert torch.isfinite(min_p_filter(logits, 0.3)).tolist() == [True, True, True, False, False]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_p_filter(logits, 1.0), logits)


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    counts = torch.tensor([1.0, 2.0, 0.0, 3.0])
    rep = apply_penalties(logits, counts, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.25]
    pf = apply_penalties(logits, counts, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert pf.tolist() == pytest.approx([2 - 0.5 - 0.25, -2 - 0.5 - 0.5, 1.0, 0.5 - 0.5 - 0.75])
    assert torch.equal(apply_penalties(logits, counts, SamplingParams()), logits)


def test_greedy_and_seeded_sampling():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(1000)
    assert sample(logits, counts, SamplingParams(temperature=0), None) == int(logits.argmax())
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=42)
    a = [sample(logits, counts, p, g) for g in [p.generator()] for _ in range(20)]
    b = [sample(logits, counts, p, g) for g in [p.generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    p = SamplingParams(top_k=0, top_p=1.0, seed=1)
    g = p.generator()
    draws = [sample(probs.log(), torch.zeros(3), p, g) for _ in range(3000)]
    freq = [draws.count(i) / 3000 for i in range(3)]
    assert freq == pytest.approx([0.6, 0.3, 0.1], abs=0.04)


def test_top_k_path_keeps_the_filtered_distribution():
    # top-k picks the survivors first; top-p then runs over them: [.5, .3, .15, .05] -> k=3 -> p=0.75 -> [.5, .3]
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    p = SamplingParams(top_k=3, top_p=0.75, seed=3)
    g = p.generator()
    draws = [sample(probs.log(), torch.zeros(4), p, g) for _ in range(3000)]
    freq = [draws.count(i) / 3000 for i in range(4)]
    assert freq == pytest.approx([0, 0.625, 0, 0.375], abs=0.04)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(min_p=2), dict(max_tokens=0), dict(max_tokens=1.5),
                                 dict(repetition_penalty=0), dict(presence_penalty=3), dict(seed="x"),
                                 dict(stop=[""]), dict(stop=["s"] * 17), dict(stop_token_ids=[-1]),
                                 dict(seed=2**64), dict(seed=-(2**63) - 1), dict(seed=True)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad)


def test_seed_range_is_what_the_generator_takes():
    """Seeds past 64 bits made torch's manual_seed raise a bare ValueError (a 500 from the server)."""
    for seed in (0, 2**63 - 1, 2**64 - 1, -1, -(2**63)):
        SamplingParams(seed=seed).generator()
    with pytest.raises(InputError, match="seed"):
        SamplingParams(seed=2**64)


def test_non_finite_logits_fail_cleanly():
    with pytest.raises(InputError, match="finite"):
        sample(torch.full((10,), float("nan")), torch.zeros(10), SamplingParams(), torch.Generator())


def test_fast_top_k_and_argmax_equal_torch():
    from gemrun.sampling import argmax, has_finite, top_k

    g = torch.Generator().manual_seed(7)
    for n in (1000, 262144, 262208):
        x = torch.randn(n, generator=g)
        x[n // 3] = 9.0  # a clear maximum inside one block
        values, ids = top_k(x, 64)
        want = torch.topk(x, 64)
        assert torch.equal(values, want.values) and torch.equal(ids, want.indices)
        assert argmax(x) == int(torch.argmax(x)) == n // 3
    x[5] = float("nan")
    assert argmax(x) == int(torch.argmax(x)) == 5 and has_finite(x)
    assert not has_finite(torch.full((10,), float("-inf"))) and has_finite(torch.tensor([float("inf"), 0.0]))
    with pytest.raises(InputError, match="finite"):
        sample(torch.full((300,), float("nan")), torch.zeros(300), SamplingParams(), torch.Generator())


def test_a_request_leaves_the_process_generators_alone_and_penalties_see_prompt_and_output():
    """An unseeded request draws its own seed without reseeding torch's default generator (a caller's
    torch.manual_seed stays in force); penalty counts cover the prompt and every generated token, and are kept
    only when a penalty reads them."""
    import tiny

    from gemrun.generate import Sequence

    model = tiny.ours_from(tiny.hf_model())
    vocab = model.config.vocab_size
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    seq = Sequence(model, [2, 5, 6, 7], SamplingParams(), set(), 64, vocab)
    assert torch.equal(torch.get_rng_state(), state) and seq.counts is None
    while not seq.prefilled:
        seq.prefill_step()
    seq.choose(seq.logits)
    penalized = Sequence(model, [2, 5, 6, 5], SamplingParams(temperature=0, presence_penalty=2.0), set(), 64,
                         vocab)
    while not penalized.prefilled:
        penalized.prefill_step()
    seen = [2, 5, 6, 5, penalized.choose(penalized.logits).id]
    assert all(penalized.counts[t] == seen.count(t) for t in seen) and penalized.counts.sum() == len(seen)
