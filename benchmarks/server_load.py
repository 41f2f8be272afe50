"""Load test of `gemrun serve`: N concurrent clients x M requests with fixed seeds against a live server.

Checks that every response equals the one the same request gets alone (no mixing between sequences) and that
none is lost, then prints aggregate tokens/s against one-at-a-time serving and latency percentiles.

    python benchmarks/server_load.py --clients 16 --requests 8 --max-tokens 32 [--model M] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_util import LiveServer  # noqa: E402

import gemrun  # noqa: E402

PROMPTS = ["Name a fruit and describe it.", "Count from one to ten in words.", "Say hello in three languages.",
           "Explain what a cloud is.", "Write a haiku about rain.", "List three colours.",
           "Why is the sky blue?", "Describe a cat."]


def _rss() -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--cache-ram", type=float, default=0.05, help="GiB kept for prefix reuse")
    args = ap.parse_args()
    model = gemrun.load(args.model, dtype="bfloat16")
    with LiveServer(lambda: model, max_batch=args.max_batch, max_queue=4 * args.clients * args.requests,
                    cache_ram=args.cache_ram) as s:
        name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
        specs = [(PROMPTS[(c * args.requests + r) % len(PROMPTS)], c * 1000 + r)
                 for c in range(args.clients) for r in range(args.requests)]

        def ask(spec):
            prompt, seed = spec
            t0 = time.perf_counter()
            r = httpx.post(s.url + "/v1/chat/completions", timeout=600, json={
                "model": name, "messages": [{"role": "user", "content": prompt}], "seed": seed,
                "max_tokens": args.max_tokens, "temperature": 1.0, "ignore_eos": True})
            r.raise_for_status()
            body = r.json()
            return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"], \
                time.perf_counter() - t0

        t0 = time.perf_counter()
        solo = [ask(spec) for spec in specs]
        t_solo = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            together = list(pool.map(ask, specs))
        t_batch = time.perf_counter() - t0
        mismatched = sum(a[0] != b[0] for a, b in zip(solo, together))
        tokens = sum(x[1] for x in together)
        lat = sorted(x[2] for x in together)
        result = {"requests": len(specs), "lost": len(specs) - len(together), "mismatched": mismatched,
                  "tokens": tokens, "one_at_a_time_tok_s": round(sum(x[1] for x in solo) / t_solo, 1),
                  "concurrent_tok_s": round(tokens / t_batch, 1),
                  "speedup": round((tokens / t_batch) / (sum(x[1] for x in solo) / t_solo), 2),
                  "p50_s": round(statistics.median(lat), 2), "p99_s": round(lat[int(0.99 * (len(lat) - 1))], 2),
                  "kv_cache_bytes_after": s.metric("gemrun_kv_cache_bytes"),
                  "running_after": s.metric("gemrun_requests_running"),
                  "prefix_cache_bytes_after": s.metric("gemrun_prefix_cache_bytes"),
                  "prefix_cache_bound": int(args.cache_ram * (1 << 30)),
                  "prefix_cache_hits": s.metric("gemrun_prefix_cache_hits_total"),
                  "rss_gib_after": round(_rss() / 2**30, 3)}
        print(json.dumps(result, indent=1))
        if mismatched or result["lost"] or result["prefix_cache_bytes_after"] > result["prefix_cache_bound"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
