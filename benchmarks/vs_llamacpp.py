"""gemrun against llama.cpp on the same GGUF and thread count, interleaved runs in fresh processes, medians.

Native mode (the anchor: the program llama.cpp users run, built by `benchmarks/llamacpp_native.sh`):

    python benchmarks/vs_llamacpp.py --model FILE.gguf --threads 2 --prompt 512 --decode 128 --runs 3 \
        --llama-bench /work/llamacpp/build/bin/llama-bench [--depth 512] [--bandwidth]

Each run is one `llama-bench -m FILE -t N -p P -n D -r REPS [-d DEPTH] -o jsonl --progress` process and one
`gemrun bench --model FILE --threads N --prompt-tokens P --gen-tokens D --repeat REPS` process (its first run
warms up, as llama-bench's warm-up does), alternating. Before each process starts the machine must be quiet
(other processes < 0.15 cores for 2 s, from /proc; `quiet.py`); every timed sample (one prompt or one generation
run, located in time by llama-bench's progress lines and gemrun bench's windows) during which other processes
used > 0.2 cores is discarded and counted; runs repeat until each engine has RUNS clean samples of each kind
(at most --max-tries processes each). Peak RSS is each process's ru_maxrss. `--bandwidth` also runs the read
bandwidth probe (`bandwidth.py`, same threads) and reports decode GB/s = bytes per token (all weights: the tied
head reads the whole embedding; KV reads are left out) x tokens/s against it.

With --depth D both engines first hold D tokens in the cache (llama-bench -d, gemrun bench --depth). llama-bench's
generation test then starts right after them, gemrun's decode after its prompt too (D + P): decode at equal
depth is gemrun at --depth 0 against llama-bench at --depth P (`--llama-depth` sets llama-bench's alone).

Binding mode (end-to-end through llama-cpp-python, the Python loop included), without --llama-bench:

    python benchmarks/vs_llamacpp.py --model FILE.gguf --threads 2 --runs 3 \
        --llama-site /opt/llamacpp-venv/lib/python3.11/site-packages

llama-cpp-python compiles llama.cpp on install (~15 min here): install it once into its own virtual environment
outside the repository and point --llama-site at its site-packages. Never part of CI. On this machine the
default native build crashes in ggml's AMX matmul (the CPU reports AMX); build without it:

    python -m venv /opt/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF" /opt/llamacpp-venv/bin/pip install --no-cache-dir llama-cpp-python

Each run is a fresh child process (so peak RSS is per engine): prefill of a PROMPT-token prompt, then DECODE
greedy tokens. Prints one JSON line per run and a summary with gemrun / llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    text = " ".join(f"The {i}th sentence of the benchmark talks about the weather in city number {i}."
                    for i in range(n))
    return tokenizer_encode(text)[:n]


def hwm() -> float:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def worker_gemrun(args) -> dict:
    import torch

    import gemrun
    from gemrun.generate import Stats, generate_ids
    from gemrun.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    m = gemrun.load(args.model, device="cpu", dtype=args.dtype)
    ids = prompt_ids(lambda t: m.tokenizer.encode(t, bos=True), args.prompt)
    params = SamplingParams(temperature=0, max_tokens=args.decode, ignore_eos=True)
    for _ in range(2):  # warm-up, then the measured run
        stats = Stats()
        for _tok in generate_ids(m.model, ids, params, set(), m.max_context, m.tokenizer.vocab_size, stats):
            pass
    return {"prefill_tok_s": stats.prefill_tps, "decode_tok_s": stats.decode_tps, "peak_rss_gib": hwm()}


def worker_llama(args) -> dict:
    sys.path.insert(0, args.llama_site)
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.prompt + args.decode + 16, n_batch=args.prompt + args.decode + 16, verbose=False)
    ids = prompt_ids(lambda t: [llm.token_bos()] + llm.tokenize(t.encode(), add_bos=False), args.prompt)
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        for _ in range(args.decode - 1):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode = time.perf_counter() - t1
    return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": (args.decode - 1) / decode, "peak_rss_gib": hwm()}


PROGRESS = re.compile(r"benchmark (\d+)/\d+: (prompt|generation) run (\d+)/")


def llama_bench_samples(child, args) -> tuple[list[dict], dict]:
    """(samples, info) of one llama-bench process: a sample per timed repetition, its window from the progress
    line that starts it to the next line the process printed."""
    tests = [json.loads(line) for _, line in child.stdout if line.startswith("{")]
    events = sorted(child.stdout + child.stderr)
    samples = []
    for i, (t, line) in enumerate(events):
        m = PROGRESS.search(line)
        if m is None:
            continue
        test, rep = tests[int(m.group(1)) - 1], int(m.group(3)) - 1
        end = events[i + 1][0] if i + 1 < len(events) else child.end
        kind = "prefill" if m.group(2) == "prompt" else "decode"
        samples.append({"kind": kind, "tok_s": test["samples_ts"][rep], "window": (t, end)})
    return samples, {"bytes_per_token": tests[0]["model_size"] if tests else 0}


def gemrun_bench_samples(child, args) -> tuple[list[dict], dict]:
    res = json.loads(child.stdout[-1][1])
    samples = []
    for r in res["runs"]:
        samples.append({"kind": "prefill", "tok_s": r["prefill_tok_s"], "window": tuple(r["prefill_window"])})
        samples.append({"kind": "decode", "tok_s": r["decode_tok_s"], "window": tuple(r["decode_window"])})
    return samples, {"bytes_per_token": res["weights_bytes"]}


def native_commands(args) -> dict[str, list[str]]:
    llama = [args.llama_bench, "-m", args.model, "-t", str(args.threads), "-p", str(args.prompt), "-n",
             str(args.decode), "-r", str(args.reps), "-o", "jsonl", "--progress"]
    depth = args.depth if args.llama_depth is None else args.llama_depth
    if depth:
        llama += ["-d", str(depth)]
    if args.llama_kv:
        llama += ["-ctk", args.llama_kv, "-ctv", args.llama_kv]
    gem = [sys.executable, "-m", "gemrun.cli", "bench", "--model", args.model, "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt), "--gen-tokens", str(args.decode), "--repeat", str(args.reps),
           "--dtype", args.dtype, "--depth", str(args.depth), "--kv-cache", args.kv_cache]
    return {"llama.cpp": llama, "gemrun": gem}


def native(args) -> None:
    """Interleaved llama-bench / gemrun bench processes on a quiet machine; clean samples only."""
    sys.path.insert(0, str(Path(__file__).parent))
    from quiet import Monitor

    mon = Monitor()
    mon.start()
    cmds, parse = native_commands(args), {"llama.cpp": llama_bench_samples, "gemrun": gemrun_bench_samples}
    clean = {e: {"prefill": [], "decode": []} for e in cmds}
    rss, info = {e: [] for e in cmds}, {e: {} for e in cmds}
    discarded, tries = dict.fromkeys(cmds, 0), dict.fromkeys(cmds, 0)

    def wanting(e: str) -> bool:
        return min(len(v) for v in clean[e].values()) < args.runs and tries[e] < args.max_tries

    while any(wanting(e) for e in cmds):
        for engine, cmd in cmds.items():
            if not wanting(engine):
                continue
            tries[engine] += 1
            waited = mon.wait_quiet(below=args.quiet)
            child = mon.run_child(cmd)
            if child.returncode != 0:
                raise SystemExit(f"{engine} failed ({child.returncode}): {' '.join(cmd)}\n"
                                 f"{child.text('stderr')[-3000:]}")
            samples, info[engine] = parse[engine](child, args)
            rss[engine].append(child.maxrss_gib)
            for smp in samples:
                smp["others_cores"] = round(mon.others(*smp["window"]), 3)
                smp["kept"] = smp["others_cores"] <= args.disturbed
                if smp["kept"]:
                    clean[engine][smp["kind"]].append(smp["tok_s"])
                else:
                    discarded[engine] += 1
            print(json.dumps({"engine": engine, "try": tries[engine], "waited_s": round(waited, 1),
                              "peak_rss_gib": round(child.maxrss_gib, 3),
                              "samples": [{k: smp[k] for k in ("kind", "tok_s", "others_cores", "kept")}
                                          for smp in samples]}), flush=True)
    probe = bandwidth(mon, args) if args.bandwidth else None
    summary = {"model": args.model, "threads": args.threads, "prompt": args.prompt, "decode": args.decode,
               "depth": args.depth, "llama_depth": args.depth if args.llama_depth is None else args.llama_depth,
               "kv_cache": {"gemrun": args.kv_cache, "llama.cpp": args.llama_kv or "f16"},
               "reps": args.reps, "discarded": discarded,
               "clean": {e: {k: len(v) for k, v in clean[e].items()} for e in cmds}}
    med = {e: {k: statistics.median(v) if v else float("nan") for k, v in clean[e].items()} for e in cmds}
    for kind in ("prefill", "decode"):
        g, ll = med["gemrun"][kind], med["llama.cpp"][kind]
        summary[f"{kind}_tok_s"] = {"gemrun": round(g, 2), "llama.cpp": round(ll, 2), "ratio": round(g / ll, 3)}
    g, ll = statistics.median(rss["gemrun"]), statistics.median(rss["llama.cpp"])
    summary["peak_rss_gib"] = {"gemrun": round(g, 3), "llama.cpp": round(ll, 3), "ratio": round(g / ll, 3)}
    gbs = {e: info[e]["bytes_per_token"] * med[e]["decode"] / 1e9 for e in cmds}
    summary["decode_gb_s"] = {e: round(v, 2) for e, v in gbs.items()}
    summary["bytes_per_token_gb"] = {e: round(info[e]["bytes_per_token"] / 1e9, 3) for e in cmds}
    if probe is not None:
        summary["read_bandwidth_gb_s"] = probe
        summary["decode_gb_s_of_probe"] = {e: round(v / probe, 3) for e, v in gbs.items()}
    print(json.dumps(summary))
    print(f"# discarded samples (others > {args.disturbed} cores): {discarded}", file=sys.stderr)


def bandwidth(mon, args) -> float:
    """Median of the probe's best GB/s over clean probe processes (same threads as the engines)."""
    cmd = [sys.executable, str(Path(__file__).with_name("bandwidth.py")), "--threads", str(args.threads)]
    speeds, tries = [], 0
    while len(speeds) < args.runs and tries < args.max_tries:
        tries += 1
        mon.wait_quiet(below=args.quiet)
        child = mon.run_child(cmd)
        load = mon.others(child.start, child.end)
        res = json.loads(child.text())
        print(json.dumps({"engine": "read-bandwidth probe", "try": tries, "others_cores": round(load, 3), **res}),
              flush=True)
        if load <= args.disturbed:
            speeds.append(res["best_gb_s"])
    return round(statistics.median(speeds), 2) if speeds else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="gemrun activations: auto (float32) or bfloat16, over packed "
                    "low-bit weights")
    ap.add_argument("--llama-site", default="/opt/llamacpp-venv/lib/python3.11/site-packages")
    ap.add_argument("--llama-bench", help="native mode: path of llama-bench (benchmarks/llamacpp_native.sh)")
    ap.add_argument("--reps", type=int, default=1, help="native mode: timed repetitions per process (-r)")
    ap.add_argument("--depth", type=int, default=0, help="native mode: llama-bench -d (context before the test)")
    ap.add_argument("--llama-depth", type=int, help="native mode: llama-bench -d alone (default: --depth)")
    ap.add_argument("--kv-cache", default="auto", help="native mode: gemrun's --kv-cache (auto: the activations' "
                    "float32; bf16 takes the bytes of llama.cpp's default f16)")
    ap.add_argument("--llama-kv", help="native mode: llama-bench -ctk/-ctv (default: its own, f16)")
    ap.add_argument("--max-tries", type=int, default=10, help="native mode: processes per engine at most")
    ap.add_argument("--bandwidth", action="store_true", help="native mode: also run the read-bandwidth probe")
    ap.add_argument("--quiet", type=float, default=0.15, help="native mode: start a process only when other "
                    "processes used fewer cores than this for 2 s")
    ap.add_argument("--disturbed", type=float, default=0.2, help="native mode: discard samples during which other "
                    "processes used more cores than this")
    ap.add_argument("--worker", choices=["gemrun", "llama"])
    args = ap.parse_args()
    if args.llama_bench:
        native(args)
        return
    if args.worker:
        out = worker_gemrun(args) if args.worker == "gemrun" else worker_llama(args)
        print(json.dumps(out))
        return
    results: dict[str, list[dict]] = {"gemrun": [], "llama": []}
    for run in range(args.runs):
        for engine in ("gemrun", "llama"):  # interleaved
            cmd = [sys.executable, __file__, "--worker", engine, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[engine].append(res)
            print(json.dumps({"run": run, "engine": engine, **{k: round(v, 3) for k, v in res.items()}}), flush=True)
    summary = {"model": args.model, "threads": args.threads, "prompt": args.prompt, "decode": args.decode}
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_gib"):
        g = statistics.median(r[key] for r in results["gemrun"])
        ll = statistics.median(r[key] for r in results["llama"])
        summary[key] = {"gemrun": round(g, 3), "llama.cpp": round(ll, 3), "ratio": round(g / ll, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
