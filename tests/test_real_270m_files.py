"""The real Gemma 3 270M as an HF safetensors directory (transformers' own reading of the embedded GGUF, cached
by the `hf_270m_dir` fixture): gemrun loads it into the model it makes from the GGUF, with a bounded memory peak.
A module of its own, so the reference model of test_real_270m.py is not held beside these loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

import gemrun


def test_safetensors_and_gguf_give_the_same_output(tmp_path, model_270m, hf_270m_dir):
    """transformers' copy of the GGUF weights, as HF safetensors, loads into the same model."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("model.safetensors", "config.json"):
        try:
            os.link(hf_270m_dir / name, hf / name)  # no second gigabyte on disk where the file system allows
        except OSError:
            shutil.copy(hf_270m_dir / name, hf / name)
    model_270m.tokenizer.backend.save(str(hf / "tokenizer.json"))
    m = gemrun.load(hf, device="cpu")
    ids = model_270m.tokenizer.encode("The capital of France is", bos=True)
    assert torch.equal(m.logits(ids), model_270m.logits(ids))
    assert m.generate("The capital of France is", temperature=0, max_tokens=12) == \
        model_270m.generate("The capital of France is", temperature=0, max_tokens=12)


def test_safetensors_peak_memory_is_model_plus_one_tensor(hf_270m_dir):
    """float32 file -> bfloat16 model in a child process: peak RSS growth stays near model + largest tensor,
    far from file + model."""
    from safetensors import safe_open

    with safe_open(str(hf_270m_dir / "model.safetensors"), "pt") as f:
        largest_f32 = max(4 * torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert json.loads((hf_270m_dir / "config.json").read_text())["dtype"] == "float32"
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
    out = subprocess.run([sys.executable, "-c", code, str(hf_270m_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown, model_bytes = map(int, out.stdout.split())
    file_bytes = (hf_270m_dir / "model.safetensors").stat().st_size
    print(f"peak growth {grown / 2**30:.2f} GiB, model {model_bytes / 2**30:.2f} GiB, file {file_bytes / 2**30:.2f}")
    assert grown < model_bytes + 1.15 * largest_f32 + (64 << 20)
    assert grown < file_bytes + model_bytes - (256 << 20)
