"""The Gemma 4 12B GGUF set as people download it (Q4_0 text model, mmproj, MTP drafter), full shape, random weights:
gemrun's load time, peak RSS, prefill and decode tok/s with an image and an audio clip in the prompt; the text
model side by side with llama.cpp's llama-bench (same file, same threads); the drafter's acceptance and tok/s.
Speed and memory do not depend on the values. Not CI. Each measurement runs in a fresh child process, so peak RSS
is that engine's alone; run it on a quiet machine.

    gemrun make-random /root/g4/gemma-4-12b-q4_0.gguf --preset gemma-4-12b --format gguf --quant q4_0
    python benchmarks/gemma4_12b_gguf.py /root/g4/gemma-4-12b-q4_0.gguf --threads 2 \\
        --mmproj /root/g4/mmproj-gemma-4-12b-q4_0.gguf --draft /root/g4/gemma-4-12b-q4_0-assistant.gguf \\
        --llama-bin /work/llamacpp/build/bin

    python benchmarks/gemma4_12b_gguf.py --small /tmp/g4small --threads 2   # the same on a small random set

Prints one JSON object: gemrun (multimodal, text, drafter), llama.cpp (text), and the gemrun / llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hwm_gib() -> float:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def text_ids(tokenizer, n: int) -> list[int]:
    text = " ".join(f"The {i}th sentence of the benchmark talks about the weather in city number {i}."
                    for i in range(n))
    return tokenizer.encode(text, bos=True)[:n]


def media_message(seconds: float = 3.0) -> list[dict]:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(png, "PNG")
    wav = io.BytesIO()
    sf.write(wav, np.sin(np.arange(int(seconds * 16000)) * 0.05).astype(np.float32) * 0.3, 16000, format="WAV")
    return [{"role": "user", "content": [{"type": "image", "image": png.getvalue()},
                                         {"type": "text", "text": "What is in the picture, and what is the sound?"},
                                         {"type": "audio", "audio": wav.getvalue()}]}]


def worker(args) -> dict:
    """One gemrun measurement (args.worker: multimodal | text | draft) in this process."""
    import torch

    import gemrun
    from gemrun.generate import Stats, generate_ids

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    m = gemrun.load(args.model, device="cpu", dtype=args.dtype, mmproj=args.mmproj if args.worker == "multimodal"
                    else None, draft=args.draft if args.worker == "draft" else None, draft_tokens=args.draft_tokens)
    load_s = time.perf_counter() - t0
    params = gemrun.SamplingParams(temperature=0, max_tokens=args.decode, ignore_eos=True)
    out = {"load_s": round(load_s, 2)}
    if args.worker == "multimodal":
        t1 = time.perf_counter()
        prompt = m.chat_prompt(media_message(), image_tokens=args.image_tokens)
        out["media_embed_s"] = round(time.perf_counter() - t1, 2)
        out["prompt_tokens"] = len(prompt.ids)
    else:
        prompt = text_ids(m.tokenizer, args.prompt)
        out["prompt_tokens"] = len(prompt)
    runs = []
    for _ in range(args.runs + 1):  # the first run warms up and is dropped
        stats = Stats()
        for _tok in generate_ids(m.model, prompt, params, set(), m.max_context, m.tokenizer.vocab_size, stats,
                                 draft=m.draft):
            pass
        runs.append(stats)
    runs = runs[1:]
    out |= {"prefill_tok_s": round(statistics.median(s.prefill_tps for s in runs), 2),
            "decode_tok_s": round(statistics.median(s.decode_tps for s in runs), 3),
            "peak_rss_gib": round(hwm_gib(), 3)}
    if args.worker == "draft":
        s = runs[-1]
        rounds = max(1, -(-s.drafted_tokens // args.draft_tokens))
        out |= {"draft_tokens": args.draft_tokens, "drafted": s.drafted_tokens, "accepted": s.accepted_tokens,
                "acceptance_rate": round(s.acceptance_rate, 3),
                "seconds_per_round": round(s.decode_seconds / rounds, 3)}
    return out


def child(args, kind: str) -> dict:
    cmd = [sys.executable, __file__, str(args.model), "--worker", kind, "--threads", str(args.threads),
           "--prompt", str(args.prompt), "--decode", str(args.decode), "--runs", str(args.runs),
           "--dtype", args.dtype, "--image-tokens", str(args.image_tokens), "--draft-tokens", str(args.draft_tokens)]
    cmd += ["--mmproj", str(args.mmproj)] if args.mmproj else []
    cmd += ["--draft", str(args.draft)] if args.draft else []
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_bench(args) -> dict:
    """llama-bench on the text GGUF: pp{prompt} and tg{decode}, same threads; its peak RSS from GNU time."""
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", str(args.llama_bin / "llama-bench"), "-m", str(args.model),
           "-t", str(args.threads), "-p", str(args.prompt), "-n", str(args.decode), "-r", str(args.runs), "-o", "json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    rows = json.loads(out.stdout)
    speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    rss = next((int(x.split("=")[1]) / 2**20 for x in out.stderr.splitlines() if x.startswith("MAXRSS_KB=")), None)
    return {"prefill_tok_s": round(speed.get("prefill", 0), 2), "decode_tok_s": round(speed.get("decode", 0), 3),
            "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(rss, 3) if rss else None}


def make_small(out: Path) -> tuple[Path, Path, Path]:
    """A small random set in the same layout (for a quick check of this script)."""
    from gemrun.weights.random import small_gemma4, write_random_gemma4_gguf

    out.mkdir(parents=True, exist_ok=True)
    cfg, assistant = small_gemma4()
    paths = write_random_gemma4_gguf(cfg, out / "small-q4_0.gguf", "q4_0", mmproj=out / "mmproj-small.gguf",
                                     draft=out / "small-assistant.gguf", assistant=assistant)
    return tuple(paths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--llama-bin", type=Path, default=Path("/work/llamacpp/build/bin"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="text prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens decoded")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--image-tokens", type=int, default=280)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--small", type=Path, help="write a small random set here and measure it")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.small:
        args.model, args.mmproj, args.draft = make_small(args.small)
    result = {"model": str(args.model), "threads": args.threads, "prompt": args.prompt, "decode": args.decode}
    if args.mmproj:
        result["gemrun_multimodal"] = child(args, "multimodal")
    result["gemrun_text"] = child(args, "text")
    if args.draft:
        result["gemrun_draft"] = child(args, "draft")
    if (args.llama_bin / "llama-bench").is_file():
        lc = result["llama_cpp_text"] = llama_bench(args)
        ours = result["gemrun_text"]
        if "error" not in lc and "error" not in ours:
            result["ratio_gemrun_over_llama_cpp"] = {
                k: round(ours[k] / lc[k], 3) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_gib")
                if lc.get(k) and ours.get(k)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
