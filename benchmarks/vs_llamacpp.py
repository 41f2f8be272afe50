"""gemrun against llama.cpp (llama-cpp-python) on the same GGUF and thread count, interleaved runs, medians.

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
import statistics
import subprocess
import sys
import time


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
    ap.add_argument("--worker", choices=["gemrun", "llama"])
    args = ap.parse_args()
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
