"""Decode speed when other processes want the cores: `gemrun bench` on the embedded 270M with 1 and 2 threads,
beside 0, 1 and 2 busy background processes (pure-Python spin loops), with OpenMP's wait policy as gemrun chooses it
(auto: spinning on an idle machine, sleeping when others keep the cores busy), forced passive and forced active,
each in a fresh process. Run it on an otherwise quiet machine.

    python benchmarks/threads_under_load.py [--gen 64] [--model M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

BUSY = "while True:\n    pass\n"


def bench(threads: int, gen: int, model: str | None, policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "auto":  # auto: what gemrun chooses at import (gemrun.openmp_settings)
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-m", "gemrun.cli", "--threads", str(threads), "bench", "--prompt-tokens", "32",
           "--gen-tokens", str(gen), "--repeat", "1"] + (["--model", model] if model else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["decode_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--model")
    args = ap.parse_args()
    rows = []
    for busy in (0, 1, 2):
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            for threads in (1, 2):
                row = {"busy_processes": busy, "threads": threads}
                for policy in ("auto", "PASSIVE", "ACTIVE"):
                    row[f"decode_tok_s_{policy.lower()}"] = bench(threads, args.gen, args.model, policy)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            for h in hogs:
                h.kill()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
