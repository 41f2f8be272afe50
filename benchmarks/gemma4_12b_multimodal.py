"""A full-shape Gemma 4 12B Unified checkpoint of random weights answers a text + image + audio prompt on the CPU:
load time, prompt tokens, prefill and decode speed, peak memory. Speed and memory do not depend on the values.

    gemrun make-random /root/g4-12b --preset gemma-4-12b --format hf --quant bf16
    python benchmarks/gemma4_12b_multimodal.py /root/g4-12b [--quantize q4]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time

import numpy as np
import soundfile as sf
from PIL import Image

import gemrun
from gemrun.formats.gemma4 import parse_gemma4_output
from gemrun.generate import Stats, stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--quantize", default="q4", help="q4 | q8 | none (bf16 weights need ~24 GB)")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, default=280)
    args = ap.parse_args()
    t0 = time.perf_counter()
    m = gemrun.load(args.model, dtype="bfloat16", quantize=args.quantize)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(png, "PNG")
    wav = io.BytesIO()
    sf.write(wav, np.sin(np.arange(3 * 16000) * 0.05).astype(np.float32) * 0.3, 16000, format="WAV")
    messages = [{"role": "user", "content": [{"type": "image", "image": png.getvalue()},
                                             {"type": "text", "text": "What is in the picture, and what is the sound?"},
                                             {"type": "audio", "audio": wav.getvalue()}]}]
    t1 = time.perf_counter()
    prompt = m.chat_prompt(messages, image_tokens=args.image_tokens)
    embed_s = time.perf_counter() - t1
    stats = Stats()
    params = gemrun.SamplingParams(max_tokens=args.max_tokens, temperature=0)
    chunks = list(stream(m.model, m.tokenizer, prompt, params, m.max_context, stats, keep_special=True))
    reasoning, content, calls = parse_gemma4_output("".join(c.text for c in chunks))
    s = stats
    print(json.dumps({"model": args.model, "quantize": args.quantize, "load_s": round(load_s, 1),
                      "prompt_tokens": len(prompt.ids), "media_embed_s": round(embed_s, 2),
                      "prefill_tok_s": round(s.prefill_tps, 2), "prefill_s": round(s.prefill_seconds, 1),
                      "decode_tok_s": round(s.decode_tps, 3), "generated": s.generated_tokens,
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "kv_cache_256k_gib": m.config.kv_cache_bytes(262_144) / 2**30,
                      "reply_ids": [t for c in chunks for t in c.token_ids], "content": content,
                      "reasoning": reasoning, "finish": s.finish_reason}, indent=1))


if __name__ == "__main__":
    main()
