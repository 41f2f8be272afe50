"""Time to first token across a multi-turn chat: gemrun with prefix reuse, gemrun without it (--cache-ram 0), and
llama.cpp's server (`cache_prompt`, native build) on the same GGUF and threads. Each turn adds a user message of
about --new-tokens tokens to the conversation (and the previous reply); the TTFT of turn k is the time from the
request to its first streamed token. The "new tokens only" column is what prefilling just the turn's new tokens
takes at that depth (`gemrun bench --depth`), the goal for a warm turn. With --in-process the warm and cold
conversations go through the Python API (`Model.chat_events`, whose pool keeps the conversation's cache) instead of
`serve`: the same reuse without HTTP, the template worker's hop excepted. Each warm turn also reports the server's
own prefill time of it (`timings.prompt_ms`, llama.cpp's field, which gemrun reports too: over the reused cache) and the
rest of its TTFT ("fixed": the HTTP exchange, validation, template, tokenizer, cache lookup and first chunk, which
a request with nothing to prefill pays as well; on a small model, whose turn prefills in milliseconds, it is of the
same size as the prefill).

    python benchmarks/multiturn.py --model 12b-q4_0.gguf --turns 10 --new-tokens 150 --threads 2 \\
        [--llama-server /work/llamacpp/build/bin/llama-server] [--think] [--runs 3] [--in-process]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx

WORDS = ("the harbour light turned green as the fishing boats came back under a low grey sky while gulls "
         "circled the mast and the old keeper wrote the tide tables by hand for the morning crew").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server died while starting")


def user_turn(rng: random.Random, new_tokens: int) -> dict:
    return {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(new_tokens))}


def ask(client: httpx.Client, url: str, body: dict) -> tuple[float, str, dict, dict]:
    """One streamed chat request: (seconds to its first piece of text or reasoning, the reply's text, usage, the
    server's `timings`: llama.cpp's, which gemrun reports too)."""
    t0, first, text, usage, timings = time.perf_counter(), None, "", {}, {}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage, timings = chunk.get("usage") or usage, chunk.get("timings") or timings
            for c in chunk.get("choices", []):
                delta = c.get("delta", {})
                piece = delta.get("content") or delta.get("reasoning_content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += delta.get("content") or ""
    return first or time.perf_counter() - t0, text, usage, timings


def conversation_ttfts(url: str, name: str, turns: int, new_tokens: int, think: bool, seed: int = 0) -> list[dict]:
    """TTFT of each turn of the conversation, and the server's own prefill time of the turn (`timings.prompt_ms`):
    the rest of the TTFT is the request's fixed work (the HTTP exchange, validation, template and tokenizer, the
    cache lookup, the first chunk's delivery)."""
    rng, messages, out = random.Random(seed), [], []
    # One client for the conversation, as the OpenAI SDK keeps one: its connection is kept alive between turns
    # (httpx connects again, inside the timed request, where a server closed it). Made before any clock starts:
    # creating a client costs ~20 ms of TLS set-up.
    client = httpx.Client(timeout=3600)
    for _ in range(turns):
        messages.append(user_turn(rng, new_tokens))
        body = {"model": name, "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        if think:
            body["chat_template_kwargs"] = {"enable_thinking": True}
        ttft, text, usage, timings = ask(client, url, body)
        details = usage.get("prompt_tokens_details") or {}
        out.append({"ttft_s": round(ttft, 4), "prompt_tokens": usage.get("prompt_tokens"),
                    "cached_tokens": details.get("cached_tokens"), "prefill_s": timings.get("prompt_ms", 0) / 1000})
        messages.append({"role": "assistant", "content": text})
    client.close()
    return out


def run_gemrun(args, cache_ram: float) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemrun.cli", "--threads", str(args.threads), "serve", "--model",
                             args.model, "--port", str(port), "--cache-ram", str(cache_ram), "--log-level",
                             "warning"], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(url, proc)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        return conversation_ttfts(url, name, args.turns, args.new_tokens, args.think)
    finally:
        proc.terminate()
        proc.wait(120)


def api_ttfts(m, turns: int, new_tokens: int, think: bool, seed: int = 0) -> list[dict]:
    """The conversation of `conversation_ttfts` through the Python API: from the call to the first event."""
    from gemrun.sampling import SamplingParams

    rng, messages, out = random.Random(seed), [], []
    for _ in range(turns):
        messages.append(user_turn(rng, new_tokens))
        t0, first, text = time.perf_counter(), None, ""
        for kind, value in m.chat_events(messages, SamplingParams(temperature=0, max_tokens=32),
                                         think=True if think else None):
            first = first or time.perf_counter() - t0
            text += value if kind == "content" else ""
        out.append({"ttft_s": round(first or time.perf_counter() - t0, 4), "prompt_tokens": m.last_stats.prompt_tokens,
                    "cached_tokens": m.last_stats.cached_tokens, "prefill_s": m.last_stats.prefill_seconds})
        messages.append({"role": "assistant", "content": text})
    return out


def run_api(args, m, reuse: bool) -> list[dict]:
    from gemrun.prefix import PrefixPool

    kept, m.pool = m.pool, PrefixPool(4 << 30 if reuse else 0)  # as `serve --cache-ram 4` (or 0)
    try:
        return api_ttfts(m, args.turns, args.new_tokens, args.think)
    finally:
        m.pool = kept


def run_llama(args) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen([args.llama_server, "-m", args.model, "-t", str(args.threads), "--port", str(port),
                             "-c", "16384", "--jinja"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(url, proc)
        return conversation_ttfts(url, "model", args.turns, args.new_tokens, args.think)
    finally:
        proc.terminate()
        proc.wait(120)


class NewTokensOnly:
    """Seconds to prefill n tokens with `depth` already cached, for each (depth, n): `gemrun bench --depth`'s
    timed run, in this process (the model loaded once, one run to warm up), with the server's defaults: float32
    activations over packed weights, bf16 KV. A chain runs the turns in order as one growing sequence (each
    depth's untimed fill starts from the previous turn's prompt, as a conversation does)."""

    def __init__(self, args, wanted: list[tuple[int, int]], m=None):
        from gemrun.cli.measure import bench_tokens, timed_run

        self.m, self.wanted = m or load_model(args), wanted
        self.every = bench_tokens(self.m, max(d + n for d, n in wanted))
        timed_run(self.m, self.every[:wanted[0][0] + wanted[0][1]], wanted[0][0], 1)

    def chain(self) -> list[float]:
        from gemrun.cli.measure import timed_run
        from gemrun.prefix import PrefixPool

        pool = PrefixPool(1 << 62)
        return [n / timed_run(self.m, self.every[:d + n], d, 1, pool)[0] for d, n in self.wanted]


def load_model(args):
    import torch

    from gemrun.api import load

    torch.set_num_threads(args.threads)
    return load(args.model, kv_cache="bf16")  # the server's defaults


def median_turns(runs: list[list[dict]]) -> list[dict]:
    """Per turn, the run whose TTFT is the median of the runs' (the same conversation each time)."""
    return [sorted(turn, key=lambda t: t["ttft_s"])[len(turn) // 2] for turn in zip(*runs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-server")
    ap.add_argument("--think", action="store_true")
    ap.add_argument("--in-process", action="store_true", help="warm and cold turns through the Python API")
    ap.add_argument("--runs", type=int, default=1,
                    help="warm conversations and new-tokens-only chains, alternated (medians per turn)")
    args = ap.parse_args()
    # --runs warm conversations, each followed by one new-tokens-only chain: the two sides alternate, so both sample
    # the machine at the same times (a prefill's speed drifts 10-20% over minutes on a shared machine); medians
    warm_runs, chains, timer, reused = [], [], None, {}
    m = load_model(args) if args.in_process else None
    for _ in range(args.runs):
        warm_runs.append(run_api(args, m, True) if m else run_gemrun(args, 4.0))
        if timer is None:  # every run is the same conversation: the first says what each turn reused
            reused = {k: (w["cached_tokens"], w["prompt_tokens"] - w["cached_tokens"]) for k, w in
                      enumerate(warm_runs[0], 1) if k > 1 and w["prompt_tokens"] and w["cached_tokens"]}
            timer = NewTokensOnly(args, list(reused.values()), m) if reused else False
        if timer:
            chains.append(timer.chain())
            time.sleep(1)  # this process's OpenMP workers stop spinning before the next server samples the load
    del timer
    warm = median_turns(warm_runs)
    only = dict(zip(reused, map(statistics.median, zip(*chains)))) if chains else {}
    cold = run_api(args, m, False) if m else run_gemrun(args, 0.0)
    llama = run_llama(args) if args.llama_server else None
    rows = []
    for k, (w, c) in enumerate(zip(warm, cold), 1):
        row = {"turn": k, "warm_ttft_s": w["ttft_s"], "cold_ttft_s": c["ttft_s"], "prompt_tokens": w["prompt_tokens"],
               "cached_tokens": w["cached_tokens"]}
        if k in only:
            row |= {"new_tokens_only_s": round(only[k], 4), "warm_over_new_only": round(w["ttft_s"] / only[k], 2)}
            if w["prefill_s"]:  # the warm turn's own prefill (over the reused cache) against the new tokens' alone, and
                # the rest of its TTFT: the request's fixed work, which a request with nothing to prefill pays too
                row |= {"warm_prefill_s": round(w["prefill_s"], 4),
                        "warm_prefill_over_new_only": round(w["prefill_s"] / only[k], 2),
                        "fixed_s": round(w["ttft_s"] - w["prefill_s"], 4)}
        if llama:
            row["llama_server_ttft_s"] = llama[k - 1]["ttft_s"]
            row["llama_server_prefill_s"] = round(llama[k - 1]["prefill_s"], 4)
        rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
