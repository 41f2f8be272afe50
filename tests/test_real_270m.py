"""The real Gemma 3 270M (embedded GGUF): gemrun against transformers loaded from the same file."""

from __future__ import annotations

import pytest
import torch

from gemrun.formats import GEMMA3_TEMPLATE, prompt_tokens, render_prompt
from gemrun.generate import Stats, generate_ids
from gemrun.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Les plus beaux paysages du Japon sont",
           "1, 2, 3, 5, 8, 13,"]

CORPUS = [
    "Hello world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Runs of spaces:      six, and  two.", "Digits 1234567890 and 3.14159e-10, 1,000,000",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵", "中文分词测试，还有标点。", "日本語のテキストとカタカナ", "한국어 문장입니다.",
    "Русский текст с ёлкой", "العربية من اليمين إلى اليسار", "हिन्दी में वाक्य", "Ελληνικά γράμματα",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n",
    "<html><body><div class=\"x\">tags</div></body></html>", "naïve café résumé Zoë", "\u00a0nbsp\u2003em space",
    "rare chars: \u0f3a \U0001d54f \u2603 \ufb01", "mixed 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and combining e\u0301", "", " ", "\n",
    "a" * 300, "The quick brown fox jumps over the lazy dog. " * 5,
]


def test_logits_equal_reference(model_270m, hf_270m, hf_tokenizer_270m):
    for prompt in PROMPTS:
        ids = hf_tokenizer_270m(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = hf_270m(ids).logits[0]
        got = model_270m.logits(ids[0].tolist())
        # same float32 operations in the same order: agreement to fp32 rounding
        assert (expected - got).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_greedy_continuations_equal_reference(model_270m, hf_270m, hf_tokenizer_270m):
    for prompt in PROMPTS:
        ids = hf_tokenizer_270m(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_270m.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = out[0, ids.shape[1]:].tolist()
        assert model_270m.tokenizer.encode(prompt, bos=True) == ids[0].tolist()
        got = list(generate_ids(model_270m.model, ids[0].tolist(), SamplingParams(temperature=0, max_tokens=32),
                                set(), model_270m.max_context, model_270m.tokenizer.vocab_size, Stats()))
        assert got == expected, prompt


def test_generate_api_text(model_270m, hf_tokenizer_270m, hf_270m):
    text = model_270m.generate("The capital of France is", temperature=0, max_tokens=16)
    ids = hf_tokenizer_270m("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_270m.generate(ids, max_new_tokens=16, do_sample=False)
    assert text == hf_tokenizer_270m.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text or "capital" in text


def test_tokenizer_ids_equal_reference(model_270m, hf_tokenizer_270m):
    tok = model_270m.tokenizer
    for text in CORPUS:
        assert tok.encode(text) == hf_tokenizer_270m.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hi", bos=True)[0] == 2
    assert tok.vocab_size == 262144


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": [{"type": "text", "text": "Tell me\na joke."}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Speak French."}]},
     {"role": "user", "content": "Bonjour"}],
])
def test_template_equals_reference(model_270m, hf_tokenizer_270m, messages):
    hf_tokenizer_270m.chat_template = GEMMA3_TEMPLATE
    expected_text = hf_tokenizer_270m.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompt(model_270m.tokenizer, messages) == expected_text
    expected_ids = hf_tokenizer_270m.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)
    if isinstance(expected_ids, dict):
        expected_ids = expected_ids["input_ids"]
    got = prompt_tokens(model_270m.tokenizer, messages)
    assert got == list(expected_ids)
    assert got[:2] != [2, 2] and got[0] == 2  # exactly one <bos>


def test_template_golden_text(model_270m):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is this?"}]
    assert render_prompt(model_270m.tokenizer, msgs) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is this?<end_of_turn>\n<start_of_turn>model\n")
    ids = prompt_tokens(model_270m.tokenizer, [{"role": "user", "content": "Hello world!"}], False)
    assert ids == [2, 105, 2364, 107, 9259, 1902, 236888, 106, 107]


def test_chat_stops_at_end_of_turn(model_270m):
    model_270m.chat([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=200)
    assert model_270m.last_stats.finish_reason in ("stop", "length")
    params = SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[])
    ids = prompt_tokens(model_270m.tokenizer, [{"role": "user", "content": "Say hi."}])
    out = list(generate_ids(model_270m.model, ids, params, {1, 106}, 32768, 262144, Stats()))
    if out[-1] in (1, 106):  # the model ended its turn: the API must show no control token
        text = model_270m.chat([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=60)
        assert "<end_of_turn>" not in text and model_270m.last_stats.finish_reason == "stop"
