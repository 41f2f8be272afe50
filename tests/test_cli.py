"""The command line, run as a user would (a child process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from tiny import hf_model, write_gguf


def gemrun(*args, input=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gemrun.cli", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_gguf(path, hf_model(seed=21, query_pre_attn_scalar=16))
    return path


def test_generate_default_model_greedy():
    out = gemrun("generate", "The capital of France is", "--temperature", "0", "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(" the capital of the country of France.")  # same text as transformers
    assert "tok/s prefill" in out.stderr and "decode" in out.stderr


def test_tokenize_and_bos(tiny_path):
    out = gemrun("tokenize", "the cat", "--model", tiny_path)
    ids = json.loads(out.stdout)
    assert ids and ids[0] != 2
    assert json.loads(gemrun("tokenize", "the cat", "--model", tiny_path, "--bos").stdout) == [2, *ids]


def test_chat_one_shot_and_repl(tiny_path):
    out = gemrun("chat", "--model", tiny_path, "--message", "hello", "--max-tokens", "5", "--seed", "1")
    assert out.returncode == 0, out.stderr
    repl = gemrun("chat", "--model", tiny_path, "--max-tokens", "3", "--seed", "1",
                  input="hello \\\nthere\n/system be brief\n/reset\nhi\n/quit\n")
    assert repl.returncode == 0, repl.stderr
    assert "system prompt set" in repl.stderr and "conversation cleared" in repl.stderr


def test_perplexity(tiny_path, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat. " * 20)
    out = gemrun("perplexity", f, "--model", tiny_path, "--context", "16")
    res = json.loads(out.stdout)
    assert res["tokens"] > 50 and 1 < res["perplexity"] < 10_000
    same = json.loads(gemrun("quality", f, "--model", tiny_path, "--context", "16", "--chunk", "5").stdout)
    assert same["tokens"] == res["tokens"] and same["kl_mean"] == same["kl_max"] == 0 and same["top1_agreement"] == 1
    assert same["perplexity"] == same["ref_perplexity"] and abs(same["perplexity"] / res["perplexity"] - 1) < 1e-5
    bf16 = json.loads(gemrun("quality", f, "--model", tiny_path, "--dtype", "bfloat16", "--context", "16").stdout)
    assert 0 < bf16["kl_mean"] <= bf16["kl_max"] < 0.1 and bf16["top1_agreement"] > 0.8
    bad = gemrun("quality", tmp_path / "missing.txt", "--model", tiny_path)
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_info(tiny_path):
    res = json.loads(gemrun("info", tiny_path).stdout)
    assert res["layers"] == 6 and res["global_layers"] == 1 and res["parameters"] > 0
    res = json.loads(gemrun("info", "gemma-3-12b").stdout)
    assert res["kv_cache_bytes_bf16"] == 8_925_478_912
    by = res["kv_cache_by_type"]  # one entry per --kv-cache choice
    assert set(by) == {"f32", "bf16", "q8_0"} and by["bf16"]["at_context"] == "8.31 GiB"
    assert by["f32"]["bytes_per_token"] == 2 * by["bf16"]["bytes_per_token"]
    assert by["q8_0"]["bytes_per_token"] == by["bf16"]["bytes_per_token"] * (1 + 2 / 32) / 2
    bad = gemrun("generate", "hi", "--model", tiny_path, "--kv-cache", "q4")
    assert bad.returncode == 2 and "not one of" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--model", "/nonexistent.gguf"], "does not exist"),
    (["generate", "hi", "--dtype", "float16"], "float16 is refused"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--device", "tpu"], "device"),
])
def test_errors_are_clean(args, message, tiny_path):
    args = [a if a != "hi" else "hi" for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_path)]
    out = gemrun(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_prompt_past_context_cli(tiny_path):
    out = gemrun("generate", "the " * 100, "--model", tiny_path, "--max-context", "16")
    assert out.returncode == 2 and "context holds 16" in out.stderr and "Traceback" not in out.stderr


def test_corrupt_file_cli(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    out = gemrun("generate", "hi", "--model", bad)
    assert out.returncode == 2 and "GGUF" in out.stderr and "Traceback" not in out.stderr


def test_chat_with_images(tmp_path):
    """--image on the command line and /image in the REPL, on a tiny multimodal HF directory."""
    import numpy as np
    from PIL import Image
    from tiny import hf_mm_model, save_mm_dir

    root = tmp_path / "mm"
    save_mm_dir(hf_mm_model(seed=2), root)
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(img)
    out = gemrun("chat", "--model", root, "--image", img, "--message", "what is it", "--max-tokens", "4",
                 "--temperature", "0", "--pan-and-scan")
    assert out.returncode == 0, out.stderr
    assert "prompt" in out.stderr
    repl = gemrun("chat", "--model", root, "--max-tokens", "3", "--seed", "1",
                  input=f"/image {img}\nwhat\n/image {tmp_path / 'nope.png'}\nagain\n/quit\n")
    assert repl.returncode == 0, repl.stderr
    assert "attached to the next message" in repl.stderr and "does not exist" in repl.stderr
    text_only = gemrun("chat", "--image", img, "--message", "hi", "--max-tokens", "2")
    assert text_only.returncode == 2 and "text-only" in text_only.stderr


def test_make_random_gguf_and_hf(tmp_path):
    out = gemrun("make-random", tmp_path / "r.gguf", "--preset", "gemma-3-270m", "--quant", "q8_0")
    assert out.returncode == 0, out.stderr
    res = json.loads(gemrun("info", tmp_path / "r.gguf").stdout)
    assert res["layers"] == 18 and res["hidden_size"] == 640 and res["parameters"] > 2.6e8
    gen = gemrun("generate", "hi", "--model", tmp_path / "r.gguf", "--max-tokens", "3")
    assert gen.returncode == 0, gen.stderr
    hf = gemrun("make-random", tmp_path / "hf", "--preset", "gemma-3-270m", "--format", "hf", "--quant", "bf16")
    assert hf.returncode == 0, hf.stderr
    res = json.loads(gemrun("info", tmp_path / "hf").stdout)
    assert res["layers"] == 18 and res["vocab_size"] == 262144
    bad = gemrun("make-random", tmp_path / "x", "--preset", "gemma-3-270m", "--format", "hf", "--vision")
    assert bad.returncode == 2 and "no vision tower" in bad.stderr


def test_threads_option():
    out = gemrun("--threads", "1", "bench", "--prompt-tokens", "16", "--gen-tokens", "2", "--repeat", "1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["threads"] == 1
    bad = gemrun("--threads", "0", "info", "gemma-3-1b")
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_bench_at_depth(tiny_path):
    """--depth: that many tokens are in the cache (reused, not prefilled) before each timed prompt."""
    out = gemrun("bench", "--model", tiny_path, "--depth", "40", "--prompt-tokens", "8", "--gen-tokens", "3",
                 "--repeat", "2")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["depth"] == 40 and res["prompt_tokens"] == 8 and len(res["runs"]) == 2
    assert all(r["cached_tokens"] == 40 and r["decode_tok_s"] > 0 for r in res["runs"])
    bad = gemrun("bench", "--model", tiny_path, "--depth", "1000000", "--prompt-tokens", "8")
    assert bad.returncode != 0 and "exceed the context" in bad.stderr and "Traceback" not in bad.stderr


def test_timed_runs_chained_through_one_pool(tiny_path):
    """benchmarks/multiturn.py's new-tokens-only timings: with the caller's pool, each depth's untimed fill starts
    from the previous run's prompt (its prompt end is a checkpoint, also for the sliding layers) and every timed
    prompt finds exactly its depth cached."""
    from gemrun.api import load
    from gemrun.cli.measure import bench_tokens, timed_run
    from gemrun.prefix import PrefixPool

    m = load(tiny_path)
    every, pool = bench_tokens(m, 48), PrefixPool(1 << 40)
    assert timed_run(m, every[:28], 20, 2, pool)[5] == 20
    assert (pool.hits, pool.misses, pool.reused_tokens) == (1, 1, 20)  # first fill from nothing
    assert timed_run(m, every[:48], 40, 2, pool)[5] == 40
    assert (pool.hits, pool.misses, pool.reused_tokens) == (3, 1, 20 + 28 + 40)  # the fill reused the 28-token prompt


# --- the REPL through a pseudo-terminal, as a person types ---------------------------------------------------------

def _repl(*args):
    pexpect = pytest.importorskip("pexpect")
    # SIGINT back to its default in the child: a test run started in the background by a shell without job control
    # (`pytest &`) ignores SIGINT, a child inherits that, and Python then installs no Ctrl-C handler
    child = pexpect.spawn(sys.executable, ["-m", "gemrun.cli", "chat", *map(str, args)], encoding="utf-8",
                          timeout=900, env={**__import__("os").environ, "COLUMNS": "200", "TERM": "dumb"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(">>> ")
    return child


def test_repl_help_save_load_and_errors(tiny_path, tmp_path):
    child = _repl("--model", tiny_path, "--max-tokens", "3", "--seed", "1")
    child.sendline("/help")
    child.expect("/save FILE")
    child.expect(">>> ")
    child.sendline("/?")
    child.expect("/load FILE")
    child.expect(">>> ")
    child.sendline("hello there")
    child.expect("finish")
    child.expect(">>> ")
    saved = tmp_path / "conv.json"
    child.sendline(f"/save {saved}")
    child.expect("saved")
    child.expect(">>> ")
    assert json.loads(saved.read_text())["messages"][0] == {"role": "user", "content": "hello there"}
    child.sendline(f"/image {tmp_path / 'missing.png'}")  # an error inside the REPL never ends it
    child.expect("text-only")
    child.expect(">>> ")
    child.sendline("/nonsense")
    child.expect("unknown command")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("cleared")
    child.sendline(f"/load {saved}")
    child.expect("loaded 2 messages")
    child.expect(">>> ")
    child.sendline(f"/load {tmp_path / 'nope.json'}")
    child.expect("cannot load")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_ctrl_c_stops_a_reply_and_keeps_the_conversation(tmp_path):
    """The base 270M rambles: Ctrl-C stops its reply, the conversation goes on; at the prompt one Ctrl-C only
    says how to leave, a second one leaves."""
    child = _repl("--max-tokens", "2000", "--temperature", "0")
    child.sendline("Write a very long story about the sea.")
    child.expect(r"sea\.\r\n")  # the echo of the line
    child.expect(r"\w{3}")  # the reply is streaming
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(">>> ")
    saved = tmp_path / "c.json"
    child.sendline(f"/save {saved}")
    child.expect(">>> ")
    history = json.loads(saved.read_text())["messages"]
    assert len(history) == 2 and history[1]["role"] == "assistant" and history[1]["content"]
    _interrupt_at_prompt(child, "again")
    _interrupt_at_prompt(child, pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def _interrupt_at_prompt(child, expected) -> None:
    """Ctrl-C at an idle prompt until `expected` shows. CPython's input() loses a SIGINT that lands between
    readline printing the prompt and its select() (the flag is set, select is not woken: about 1 in 300 at once
    after the prompt on a loaded machine); a user's second press, like this retry, gets through."""
    pexpect = pytest.importorskip("pexpect")
    for _ in range(5):
        child.sendintr()
        if child.expect([expected, pexpect.TIMEOUT], timeout=10) == 0:
            return
    raise AssertionError(f"no {expected!r} after five Ctrl-C at the prompt: {child.before!r}")


def test_small_things(tiny_path):
    assert gemrun("--version").stdout.startswith("gemrun ")
    bad = gemrun("info", "gemma-5")
    assert bad.returncode == 2 and "gemma-3-12b" in bad.stderr and "Traceback" not in bad.stderr
    preset = json.loads(gemrun("info", "gemma-3-12b").stdout)
    assert preset["parameters"] == 11_766_034_176
    out = gemrun("generate", "hi", "--model", tiny_path, "--max-tokens", "100000", "--temperature", "0")
    assert out.returncode == 0 and "clamped" in out.stderr
    one = gemrun("generate", "hi", "--model", tiny_path, "--max-tokens", "1")
    assert "generated 1 token," in one.stderr and "--max-tokens" in one.stderr  # the length-limit hint
