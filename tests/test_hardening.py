"""Untrusted model directories: config.json values out of type or range, files that are not regular or that link
out of the directory. Each must fail with a clean error naming the field or file, quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import hf_config, hf_model, tiny_vocab

from gemrun.config import from_hf_config
from gemrun.errors import ConfigError, TokenizerError, WeightsError
from gemrun.tokenizer import build_backend, from_directory
from gemrun.weights.load import load_hf

OLD_STYLE = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 1e6,
             "rope_scaling": {"rope_type": "linear", "factor": 8.0}}


def _nested(path: str, value) -> dict:
    """The transformers 5 dump of the tiny config with `path` (dotted) set to `value`."""
    raw = hf_config().to_dict()
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


@pytest.mark.parametrize("raw, match", [
    pytest.param({**OLD_STYLE, "rope_theta": float("nan")}, "config.json rope_theta = nan", id="theta-nan"),
    pytest.param({**OLD_STYLE, "rope_theta": 0}, "config.json rope_theta = 0", id="theta-0"),
    pytest.param({**OLD_STYLE, "rope_theta": -10000.0}, "config.json rope_theta = -10000.0", id="theta-neg"),
    pytest.param({**OLD_STYLE, "rope_theta": 1e-45}, "config.json rope_theta = 1e-45", id="theta-1e-45"),
    pytest.param({**OLD_STYLE, "query_pre_attn_scalar": 1e-45}, "query_pre_attn_scalar = 1e-45", id="qscale-tiny"),
    pytest.param({**OLD_STYLE, "rope_theta": "1e6"}, "config.json rope_theta = '1e6'", id="theta-str"),
    pytest.param({**OLD_STYLE, "rope_local_base_freq": float("inf")}, "rope_local_base_freq = inf", id="local-inf"),
    pytest.param({**OLD_STYLE, "rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor = 0",
                 id="factor-0"),
    pytest.param({**OLD_STYLE, "rope_scaling": [8]}, "rope_scaling must be an object", id="scaling-list"),
    pytest.param(_nested("rope_parameters.full_attention.rope_theta", float("nan")),
                 "rope_parameters.full_attention.rope_theta = nan", id="nested-theta-nan"),
    pytest.param(_nested("rope_parameters.sliding_attention.rope_theta", -1.0),
                 "rope_parameters.sliding_attention.rope_theta = -1.0", id="nested-local-neg"),
    pytest.param({**OLD_STYLE, "rms_norm_eps": float("inf")}, "config.json rms_norm_eps = inf", id="eps-inf"),
    pytest.param({**OLD_STYLE, "rms_norm_eps": 1e30}, "config.json rms_norm_eps = 1e\\+30", id="eps-1e30"),
    pytest.param({**OLD_STYLE, "rms_norm_eps": True}, "config.json rms_norm_eps = True", id="eps-bool"),
    pytest.param({**OLD_STYLE, "num_hidden_layers": 1e9}, "num_hidden_layers = 1000000000.0", id="layers-1e9"),
    pytest.param({**OLD_STYLE, "num_hidden_layers": 10**9}, r"num_hidden_layers = 1000000000: .*\[1, 1024\]",
                 id="layers-10^9"),
    pytest.param({**OLD_STYLE, "hidden_size": 2**20}, "config.json hidden_size = 1048576", id="hidden-2^20"),
    pytest.param({**OLD_STYLE, "vocab_size": 2**40}, "config.json vocab_size", id="vocab-2^40"),
    pytest.param({**OLD_STYLE, "max_position_embeddings": 2**40}, "max_position_embeddings", id="context-2^40"),
    pytest.param({**OLD_STYLE, "num_attention_heads": "4"}, "num_attention_heads = '4'", id="heads-str"),
    pytest.param({**OLD_STYLE, "sliding_window_pattern": 0}, "sliding_window_pattern = 0", id="pattern-0"),
    pytest.param({**OLD_STYLE, "eos_token_id": [1, -5]}, "eos_token_id = -5", id="eos-negative"),
    pytest.param({**OLD_STYLE, "query_pre_attn_scalar": float("nan")}, "query_pre_attn_scalar = nan", id="qscale"),
    pytest.param({**OLD_STYLE, "model_type": 3}, "model_type must be a string", id="model-type-int"),
    pytest.param({"text_config": [1]}, "text_config must be an object", id="text-config-list"),
    pytest.param({**OLD_STYLE, "layer_types": "sliding"}, "layer_types must be a list", id="layer-types-str"),
    pytest.param({**_nested("model_type", "gemma4_text"), "num_kv_shared_layers": 1.5},
                 "num_kv_shared_layers = 1.5", id="gemma4-shared"),
    pytest.param({**_nested("model_type", "gemma4_text"), "attention_k_eq_v": "false"}, "attention_k_eq_v",
                 id="gemma4-bool"),
    pytest.param({**_nested("model_type", "gemma4_text"), "per_layer_config": {"x": 1}}, "per_layer_config",
                 id="gemma4-per-layer"),
])
def test_config_json_values_are_type_and_range_checked(raw, match):
    """Before: NaN, zero or negative RoPE bases and infinite, huge or boolean epsilons loaded (garbage logits),
    10^9 layers or a 2^40 context were accepted (the model build then hung or ran out of memory), and strings or
    lists escaped as ValueError/AttributeError."""
    from_hf_config(OLD_STYLE)  # the base itself is fine
    with pytest.raises(ConfigError, match=match):
        from_hf_config(raw)


# --- files of a model directory --------------------------------------------------------------------------------

def _tokenizer_json(path: Path) -> Path:
    tokens, types = tiny_vocab()
    build_backend(tokens, types).save(str(path))
    return path


def _model_dir(root: Path, ref=None) -> Path:
    """A tiny HF directory: config.json, and the weights when `ref` is given."""
    root.mkdir(parents=True)
    if ref is not None:
        ref.save_pretrained(root)
    else:
        (root / "config.json").write_text(json.dumps(hf_config().to_dict()))
    return root


def test_fifo_shard_is_refused_not_waited_on(tmp_path):
    """A FIFO named *.safetensors blocked the loader forever (safetensors opens it and waits for a writer); it
    runs in a child process so that the old behaviour fails the test instead of hanging it."""
    d = _model_dir(tmp_path / "m")
    os.mkfifo(d / "x.safetensors")
    code = ("import torch, sys\nfrom gemrun.weights.load import load_hf\nfrom gemrun.errors import GemrunError\n"
            "try:\n    load_hf(__import__('pathlib').Path(sys.argv[1]), torch.float32, torch.device('cpu'))\n"
            "except GemrunError as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    try:
        out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60,
                             env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a directory with a FIFO shard hung")
    assert "WeightsError" in out.stdout and "'x.safetensors'" in out.stdout and "not a regular file" in out.stdout
    fifo = tmp_path / "fifo-tok"
    fifo.mkdir()
    os.mkfifo(fifo / "tokenizer.json")
    with pytest.raises(TokenizerError, match="'tokenizer.json' .* not a regular file"):
        from_directory(fifo)


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "tokenizer.json",
                                  "tokenizer.model"])
def test_tokenizer_files_never_follow_links_out_of_the_directory(tmp_path, name):
    """Before, each of these was read through a link to anywhere (e.g. a template that renders a secret)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = {"chat_template.jinja": outside / "secret.txt", "tokenizer_config.json": outside / "cfg.json",
              "tokenizer.json": _tokenizer_json(outside / "tok.json"), "tokenizer.model": outside / "sp.model"}[name]
    if not target.exists():
        target.write_text('{"chat_template": "secret"}')
    d = tmp_path / "m"
    d.mkdir()
    if name != "tokenizer.json":
        (d / "sub").mkdir()
        _tokenizer_json(d / "sub" / "tok.json")
        if name != "tokenizer.model":
            (d / "tokenizer.json").symlink_to("sub/tok.json")  # a link inside the directory is fine
    (d / name).symlink_to(target)
    with pytest.raises(TokenizerError, match=f"'{name}' in .* points outside the model directory"):
        from_directory(d)
    (d / name).unlink()
    if name != "tokenizer.model":
        if name == "tokenizer.json":
            _tokenizer_json(d / name)
        assert from_directory(d).vocab_size == 512


def test_shards_and_index_never_follow_links_out_of_the_directory(tmp_path):
    ref = hf_model(seed=3)
    real = _model_dir(tmp_path / "real", ref)
    d = _model_dir(tmp_path / "m")
    (d / "model.safetensors").symlink_to(real / "model.safetensors")
    with pytest.raises(WeightsError, match="'model.safetensors' in .* points outside"):
        load_hf(d, torch.float32, torch.device("cpu"))
    (d / "model.safetensors").unlink()
    (real / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    (d / "model.safetensors.index.json").symlink_to(real / "model.safetensors.index.json")
    with pytest.raises(WeightsError, match="'model.safetensors.index.json' in .* points outside"):
        load_hf(d, torch.float32, torch.device("cpu"))
    # a Hugging Face cache snapshot links its files to the repository's blobs: that stays allowed
    snap = _model_dir(tmp_path / "models--x--y" / "snapshots" / "abc")
    (tmp_path / "models--x--y" / "blobs").mkdir()
    (real / "model.safetensors").rename(tmp_path / "models--x--y" / "blobs" / "123")
    (snap / "model.safetensors").symlink_to("../../blobs/123")
    assert load_hf(snap, torch.float32, torch.device("cpu")).config.num_layers == ref.config.num_hidden_layers


def test_decoded_pixels_are_bounded_per_prompt():
    """32 lossless 7000x7000 WebPs are a few KB of upload; their headers alone are enough to refuse the prompt
    before most of them are decoded (before: 270 s and 1.8 GB)."""
    import io
    import resource
    import time

    from PIL import Image

    from gemrun.errors import InputError
    from gemrun.processing.image import load_image
    from gemrun.processing.source import MAX_REQUEST_PIXELS, MediaRequest

    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (10, 200, 30)).save(buf, format="WEBP", lossless=True)
    data = buf.getvalue()
    assert len(data) < 10_000
    request = MediaRequest()
    t0, rss0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decoded = 0
    with pytest.raises(InputError, match="decoded pixels"):
        for _ in range(32):
            load_image(data, request=request)
            decoded += 1
    assert decoded == MAX_REQUEST_PIXELS // (7000 * 7000)
    assert time.process_time() - t0 < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 1 << 20  # KiB: under 1 GiB more


def test_thinking_split_is_linear_in_stray_markers():
    """Repeated `<channel|>` used to cost quadratic time in split_thinking (a find to the end after each)."""
    import time

    from gemrun.formats.gemma4 import ThinkingSplitter, split_thinking

    def cost(n: int) -> float:
        text = "x<channel|>" * n
        t0 = time.process_time()
        assert split_thinking(text) == ("", "x" * n)
        splitter = ThinkingSplitter()
        events = splitter.push(text) + splitter.finish()
        assert "".join(t for _, t in events) == "x" * n
        return time.process_time() - t0

    cost(1000)
    small, large = cost(20_000), cost(160_000)
    assert large < 20 * max(small, 0.01)  # 8x the input: linear, not 64x


CHILD = '''import os, signal, sys, time, json
from fuzz import fuzz, main_args
args, start, progress = main_args(sys.argv[1:])
def check(m):
    if m < 0.1:
        os.kill(os.getpid(), signal.SIGSEGV)
    if m < 0.2:  # a hang the alarm cannot break (as inside C code)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(600)
    if m < 0.3:
        raise ValueError("a crash")
    if m < 0.4:
        return "a silent accept"
    if m < 0.7:
        raise LookupError("a clean refusal")
print(json.dumps(fuzz(int(args[0]), 7, lambda rng: rng.random(), check, LookupError, 1, start, progress)))
'''


def test_fuzz_supervisor_counts_what_kills_or_hangs_the_child(tmp_path):
    """tests/fuzz.py: a mutant that segfaults the child or hangs it where the alarm cannot reach is counted (crash,
    hang) and the child restarted past it; every other outcome comes from the child's own lines."""
    from fuzz import rng_for, supervise

    (tmp_path / "child.py").write_text(CHILD)
    values = [rng_for(7, i).random() for i in range(30)]
    expected = {"crashes": sum(v < 0.1 or 0.2 <= v < 0.3 for v in values), "hangs": sum(0.1 <= v < 0.2 for v in values),
                "silent": sum(0.3 <= v < 0.4 for v in values), "rejected": sum(0.4 <= v < 0.7 for v in values),
                "accepted": sum(v >= 0.7 for v in values)}
    assert sum(v < 0.1 for v in values) and expected["hangs"]  # segfaults and unbreakable hangs both occur
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    stats = supervise([sys.executable, str(tmp_path / "child.py"), "30"], 30, env, stall=3, setup=60)
    assert stats["mutants"] == 30 and stats["oom"] == 0
    assert {k: stats[k] for k in expected} == expected
    assert any("child died (-11)" in e for e in stats["examples"])  # the supervisor, not the child, counted it
