"""Full-shape Gemma 3 + SigLIP with random weights answers an image prompt; prints image encoding time, prompt
and decode speed, and peak memory (VmHWM). Not part of the test run.

    python benchmarks/vision_full_shape.py --preset gemma-3-12b --dir /tmp/gemma-3-12b-random

The checkpoint is written once by gemrun's own tooling (`gemrun make-random --format hf --vision`), bf16.
A bf16 checkpoint loads zero-copy (memory-mapped), so a model larger than RAM still runs, at disk speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import gemrun
from gemrun.processing.image import preprocess
from gemrun.weights.random import write_random_hf


def hwm_gib() -> float:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma-3-12b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/gemrun-random-12b-vision"))
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.dir / "config.json").is_file():
        t = time.perf_counter()
        write_random_hf(args.preset, args.dir, vision=True)
        print(f"wrote {args.dir} in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    m = gemrun.load(args.dir, device="cpu", dtype="bfloat16")
    load_s = time.perf_counter() - t
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    t = time.perf_counter()
    m.inputs.encode(preprocess(img, m.inputs.config))
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    text = m.chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                {"type": "text", "text": "What is in this image?"}]}],
                  temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    s = m.last_stats
    print(json.dumps({"preset": args.preset, "threads": args.threads, "load_s": round(load_s, 1),
                      "image_encode_s": round(encode_s, 2), "prompt_tokens": s.prompt_tokens,
                      "prefill_tok_s": round(s.prefill_tps, 2), "decode_tok_s": round(s.decode_tps, 3),
                      "generated": s.generated_tokens, "chat_s": round(time.perf_counter() - t, 1),
                      "peak_rss_gib": round(hwm_gib(), 2), "answer": text}))


if __name__ == "__main__":
    main()
