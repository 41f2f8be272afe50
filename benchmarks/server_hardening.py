"""Server hardening checks that are too long for the unit tests (hardening.md, server part).

1. An OpenAPI fuzz run with schemathesis against every route: no response may be a 5xx.
2. N abandoned long streaming requests (the client reads a few chunks and hangs up): every one is cancelled,
   the KV cache in use returns to 0, and a fresh request is still answered promptly.

    pip install schemathesis
    python benchmarks/server_hardening.py [--model M] [--examples 40] [--abandon 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_util import LiveServer  # noqa: E402

import gemrun  # noqa: E402


def fuzz(s: LiveServer, examples: int, seed: int) -> int:
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        sys.exit("schemathesis is not installed: pip install schemathesis")
    cmd = [exe, "run", s.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(examples),
           "--seed", str(seed), "--workers", "2", "--request-timeout", "120", "--continue-on-failure"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "GEMRUN_FUZZ_MODEL": name,
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    rc = subprocess.run(cmd, env=env).returncode
    print(f"fuzz: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


def abandon(s: LiveServer, n: int) -> bool:
    name = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
    before = s.metric("gemrun_requests_finished_total", 'reason="cancelled"')
    t0 = time.perf_counter()
    for i in range(n):
        body = {"model": name, "messages": [{"role": "user", "content": f"Tell a long story number {i}."}],
                "max_tokens": 100_000, "stream": True, "seed": i, "temperature": 1.0}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for j, _ in enumerate(r.iter_lines()):
                if j >= 3:
                    break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and s.metric("gemrun_requests_running") > 0:
        time.sleep(0.05)
    cancelled = s.metric("gemrun_requests_finished_total", 'reason="cancelled"') - before
    running, cache = s.metric("gemrun_requests_running"), s.metric("gemrun_kv_cache_bytes")
    t1 = time.perf_counter()
    r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0})
    answer = time.perf_counter() - t1
    print(f"abandoned {n} streams in {t1 - t0:.1f} s: {cancelled:.0f} cancelled, running {running:.0f}, "
          f"KV cache {cache:.0f} bytes; next request {r.status_code} in {answer:.2f} s", flush=True)
    return cancelled == n and running == 0 and cache == 0 and r.status_code == 200 and answer < 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--examples", type=int, default=40, help="schemathesis examples per route")
    ap.add_argument("--abandon", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-context", type=int, default=1024, help="keeps fuzzed max_tokens short")
    args = ap.parse_args()
    model = gemrun.load(args.model, dtype="bfloat16", max_context=args.max_context)
    with LiveServer(lambda: model, max_batch=8, max_queue=64, request_timeout=120) as s:
        ok_fuzz = fuzz(s, args.examples, args.seed) == 0 if args.examples else True
        ok_abandon = abandon(s, args.abandon) if args.abandon else True
    print("PASS" if ok_fuzz and ok_abandon else "FAIL")
    sys.exit(0 if ok_fuzz and ok_abandon else 1)


if __name__ == "__main__":
    main()
