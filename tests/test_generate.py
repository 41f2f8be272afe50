"""Generation loop on a tiny GGUF model: context limits, stops, streaming, seeds, cache memory."""

from __future__ import annotations

import pytest
import torch
from tiny import hf_model, write_gguf

import gemrun
from gemrun.errors import InputError
from gemrun.generate import Stats, _held_back, stream
from gemrun.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny.gguf"
    write_gguf(path, hf_model(seed=11, query_pre_attn_scalar=16))
    return gemrun.load(path, device="cpu", max_context=40)


def test_prompt_past_the_context_is_refused_naming_both_numbers(tiny):
    ids = lambda n: [2] + [300] * (n - 1)  # noqa: E731
    out = list(stream(tiny.model, tiny.tokenizer, ids(39), SamplingParams(temperature=0, max_tokens=50), 40))
    assert out[-1].finish_reason == "length"  # ctx-1 fits and stops when the context is full
    for n in (40, 41):
        with pytest.raises(InputError, match=rf"{n} tokens.*context holds 40"):
            list(stream(tiny.model, tiny.tokenizer, ids(n), SamplingParams(), 40))
    with pytest.raises(InputError, match="empty"):
        list(stream(tiny.model, tiny.tokenizer, [], SamplingParams(), 40))


def test_max_tokens_and_finish_reasons(tiny):
    tiny.generate("the", temperature=0, max_tokens=5, ignore_eos=True)
    assert tiny.last_stats.generated_tokens == 5 and tiny.last_stats.finish_reason == "length"


def test_stop_token_ids_end_generation(tiny):
    greedy = list(stream(tiny.model, tiny.tokenizer, [2, 300, 301], SamplingParams(temperature=0, max_tokens=8,
                                                                                   ignore_eos=True), 40))
    first = [i for c in greedy for i in c.token_ids][0]
    stats = Stats()
    out = list(stream(tiny.model, tiny.tokenizer, [2, 300, 301],
                      SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first], ignore_eos=True), 40, stats))
    assert stats.generated_tokens == 1 and stats.finish_reason == "stop" and "".join(c.text for c in out) == ""


def test_stop_strings_are_cut_and_streaming_equals_non_streaming(tiny):
    full = tiny.generate("the", seed=5, max_tokens=30, ignore_eos=True, top_k=0, top_p=1.0)
    assert len(full) > 6
    stop = full[3:6]
    cut = tiny.generate("the", seed=5, max_tokens=30, ignore_eos=True, top_k=0, top_p=1.0, stop=[stop])
    assert cut == full[:full.index(stop)] and tiny.last_stats.finish_reason == "stop"
    pieces = list(tiny.generate("the", seed=5, max_tokens=30, ignore_eos=True, top_k=0, top_p=1.0, stop=[stop],
                                stream=True))
    assert "".join(pieces) == cut
    assert "".join(tiny.generate("the", seed=5, max_tokens=30, ignore_eos=True, top_k=0, top_p=1.0,
                                 stream=True)) == full


def test_held_back_prefixes():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0
    assert _held_back("ab", ["abc", "b"]) == 2


def test_seeds(tiny):
    kw = dict(max_tokens=20, ignore_eos=True, top_k=0, top_p=1.0)
    a = tiny.generate("the", seed=1, **kw)
    assert a == tiny.generate("the", seed=1, **kw)
    assert a != tiny.generate("the", seed=2, **kw)


def test_sliding_cache_memory_does_not_grow(tiny):
    caches = tiny.model.make_caches()
    ids = torch.randint(10, 500, (1, 30))
    tiny.model(ids, caches)
    sizes = [c.nbytes for c, s in zip(caches, tiny.model.specs) if s.sliding]
    for i in range(5):
        tiny.model(ids[:, i:i + 1], caches)
    assert sizes == [c.nbytes for c, s in zip(caches, tiny.model.specs) if s.sliding]
    assert all(c.k.shape[2] == tiny.config.sliding_window for c, s in zip(caches, tiny.model.specs) if s.sliding)


def test_cache_trim_rewinds():
    ref = hf_model(seed=12)
    from tiny import ours_from

    m = ours_from(ref)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        caches = m.make_caches(spare=4)
        m(ids[:, :15], caches)
        for i in range(15, 18):
            m(ids[:, i:i + 1], caches)
        for c in caches:
            c.trim(3)
        got = torch.cat([m(ids[:, i:i + 1], caches) for i in range(15, 20)], 1)
        full = m(ids, m.make_caches())[:, 15:]
    assert (got - full).abs().max().item() < 1e-5
    with torch.no_grad():  # without spare slots, a sliding ring past its window cannot be rewound
        caches = m.make_caches()
        m(ids, caches)
    sliding = next(c for c, s in zip(caches, m.specs) if s.sliding)
    with pytest.raises(ValueError, match="cannot rewind"):
        sliding.trim(3)


def test_kv_arithmetic_12b():
    from gemrun.config import preset

    cfg = preset("gemma-3-12b")
    per_layer = 2 * 8 * 256 * 2  # K and V, 8 heads x 256, bf16
    assert cfg.kv_cache_bytes(131072) == 8 * 131072 * per_layer + 40 * 1024 * per_layer == 8_925_478_912
    assert cfg.kv_bytes_per_token() == {"global": 8 * per_layer, "sliding": 40 * per_layer}
    with pytest.raises(Exception, match="unknown preset"):
        preset("gemma-3-12")


def test_per_layer_cache_shapes_and_sharing():
    """Layers with their own head size / KV heads get caches of that shape; a sharing layer reads what its
    source's latest update returned and adds no bytes (Gemma 4's per-layer shapes and KV sharing)."""
    from gemrun.cache import FullCache, SharedCache, SlidingCache, make_caches
    from gemrun.config import LayerSpec, Rope, TextConfig

    specs = (LayerSpec(True, 16, 2, Rope(1e4), 8), LayerSpec(False, 32, 1, Rope(1e6), None),
             LayerSpec(True, 16, 2, Rope(1e4), 8, kv_source=0), LayerSpec(False, 32, 1, Rope(1e6), None, kv_source=1))
    caches = make_caches(specs, 1, torch.float32, "cpu", capacity=4)
    assert isinstance(caches[0], SlidingCache) and isinstance(caches[1], FullCache)
    assert isinstance(caches[2], SharedCache) and caches[3].source is caches[1] and caches[3].nbytes == 0
    assert caches[1].k.shape == (1, 1, 4, 32) and caches[0].k.shape == (1, 2, 8, 16)
    k = torch.randn(1, 1, 3, 32)
    caches[1].update(k, k, torch.arange(3))
    kk, _, pos = caches[3].update(None, None, torch.arange(3)).single()
    assert torch.equal(kk, k) and pos.tolist() == [0, 1, 2] and caches[3].length == 3

    class Shared(TextConfig):
        @property
        def layers(self):
            return specs

    cfg = Shared(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64, intermediate_size=64,
                 vocab_size=32, sliding_window=8)
    assert cfg.kv_bytes_per_token(2) == {"sliding": 2 * 2 * 16 * 2, "global": 2 * 1 * 32 * 2}
    assert cfg.kv_cache_bytes(100, 2) == 8 * 2 * 2 * 16 * 2 + 100 * 2 * 32 * 2
