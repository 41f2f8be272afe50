"""Does a large request stall the server? Starts `gemrun serve` (from the checkout on PYTHONPATH, or --checkout),
sends one large body at a time (an 8 MB /tokenize prompt, /v1/completions prompt, Ollama raw /api/generate) while
another thread polls /health every 0.1 s, and prints the longest /health wait and the large request's status and
time. Before the fix, prompts were tokenized on the event loop and /health waited for them.

    python benchmarks/server_stall.py [--checkout DIR] [--mb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkout", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--mb", type=float, default=8)
    args = ap.parse_args()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": args.checkout}
    proc = subprocess.Popen([sys.executable, "-m", "gemrun.cli", "serve", "--port", str(port), "--max-body-mb", "64",
                             "--log-level", "warning"], env=env, cwd=args.checkout,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        rng = random.Random(0)
        words = ["sea", "wave", "boat", "harbour", "light", "storm", "gull", "tide"]
        text = " ".join(rng.choice(words) for _ in range(int(args.mb * (1 << 20) / 5)))
        cases = {"/tokenize": {"prompt": text},
                 "/v1/completions": {"model": name, "prompt": text, "max_tokens": 1},
                 "/api/generate": {"model": name, "prompt": text, "raw": True, "stream": False}}
        results = {}
        for path, body in cases.items():
            waits, stop = [], threading.Event()

            def poll(stop=stop, waits=waits):
                while not stop.is_set():
                    t = time.perf_counter()
                    httpx.get(url + "/health", timeout=600)
                    waits.append(time.perf_counter() - t)
                    time.sleep(0.1)

            poller = threading.Thread(target=poll)
            poller.start()
            t0 = time.perf_counter()
            r = httpx.post(url + path, json=body, timeout=1800)
            took = time.perf_counter() - t0
            stop.set()
            poller.join()
            results[path] = {"status": r.status_code, "request_s": round(took, 2),
                             "health_max_wait_s": round(max(waits), 3), "health_probes": len(waits)}
        print(json.dumps({"checkout": args.checkout, "mb": args.mb, "results": results}, indent=1))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
