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


def test_safetensors_and_gguf_give_the_same_output(tmp_path, model_270m, hf_270m):
    """transformers' copy of the GGUF weights saved as HF safetensors loads into the same model."""
    import json

    from safetensors.torch import save_file

    import gemrun

    (tmp_path / "hf").mkdir()
    state = {k: v.contiguous() for k, v in hf_270m.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_270m.config.to_dict()))
    model_270m.tokenizer.backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    m = gemrun.load(tmp_path / "hf", device="cpu")
    ids = model_270m.tokenizer.encode("The capital of France is", bos=True)
    assert torch.equal(m.logits(ids), model_270m.logits(ids))
    assert m.generate("The capital of France is", temperature=0, max_tokens=12) == \
        model_270m.generate("The capital of France is", temperature=0, max_tokens=12)


def test_safetensors_peak_memory_is_model_plus_one_tensor(tmp_path, model_270m):
    """float32 file -> bfloat16 model in a child process: peak RSS growth stays near model + largest tensor,
    far from file + model."""
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    state = {f"model.{k}": v.contiguous() for k, v in model_270m.model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = model_270m.config
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "sliding_window": cfg.sliding_window,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings}))
    code = (
        "import sys, torch\n"
        "from gemrun.weights.load import load_checkpoint\n"
        "def hwm():  # VmHWM, not ru_maxrss: the latter is inherited across exec from a big parent\n"
        "    line = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0]\n"
        "    return int(line.split()[1]) * 1024\n"
        "base = hwm()\n"
        "m = load_checkpoint(sys.argv[1], torch.bfloat16, torch.device('cpu')).model\n"
        "peak = hwm()\n"
        "print(peak - base, sum(p.nbytes for p in m.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown, model_bytes = map(int, out.stdout.split())
    largest_f32 = max(v.nbytes for v in state.values())
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    print(f"peak growth {grown / 2**30:.2f} GiB, model {model_bytes / 2**30:.2f} GiB, file {file_bytes / 2**30:.2f}")
    assert grown < model_bytes + 1.15 * largest_f32 + (64 << 20)
    assert grown < file_bytes + model_bytes - (256 << 20)
