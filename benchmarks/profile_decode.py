"""Where a decode step's time goes (default: the embedded real Gemma 3 270M, gemrun's CPU default dtype).

    python benchmarks/profile_decode.py [--model FILE] [--prompt 512] [--decode 128] [--threads 2] [--ops]

Prints JSON: wall and CPU seconds per decoded token without instrumentation (CPU = all threads of the process,
the figure that does not depend on what else runs), then a breakdown per token from timing hooks: the layers'
packed matmuls, the output head, attention (mask + SDPA + cache writes), RMSNorms, sampling, and the rest of the
step (RoPE, residual adds, small ops, Python). `--ops` adds torch.profiler's top aten ops of the decode steps.
Waits for a quiet machine first (benchmarks/quiet.py) and reports what other processes used meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import gemrun
from gemrun import generate as G
from gemrun.model import layers
from gemrun.model.layers import RMSNorm
from gemrun.quant.packed import Int4Linear, Int8Linear
from gemrun.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from quiet import Monitor  # noqa: E402


def run(m, ids, params, decoding=contextlib.nullcontext) -> tuple[float, float, int]:
    """One generation: (decode wall s, decode CPU s, decode steps); the decode steps run inside `decoding()`."""
    seq = G.Sequence(m.model, ids, params, set(), m.max_context, m.tokenizer.vocab_size)
    while not seq.prefilled:
        seq.prefill_step()
    seq.choose(seq.logits)
    with decoding():
        w, c, steps = time.perf_counter(), time.process_time(), 0
        while not seq.finished:
            seq.choose(G.decode_step(m.model, [seq])[0])
            steps += 1
        return time.perf_counter() - w, time.process_time() - c, steps


class Timers:
    def __init__(self):
        self.total = defaultdict(float)
        self.stack: list[float] = []

    def __enter__(self):
        self.total.clear()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[name] += time.perf_counter() - t
        return timed

    def hook(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.stack.append(time.perf_counter()))

        def post(*_):
            self.total[name] += time.perf_counter() - self.stack.pop()
        module.register_forward_hook(post)


def instrument(m) -> Timers:
    tm = Timers()
    model = m.model
    for mod in model.modules():
        if isinstance(mod, (Int4Linear, Int8Linear, torch.nn.Linear)) and mod is not model.embed_tokens:
            tm.hook(mod, "layer matmuls")
        elif isinstance(mod, RMSNorm) or type(mod).__name__ == "RMSNorm":
            tm.hook(mod, "norms")
        if hasattr(mod, "attend") and hasattr(mod, "q_proj"):
            mod.attend = tm.wrap("attention (mask + SDPA)", mod.attend)
    layers.together = tm.wrap("layer matmuls", layers.together)  # q/k/v and gate/up in one call
    model.head = tm.wrap("head", model.head)
    G.sample = tm.wrap("sampling", G.sample)
    G.Sequence._filter = tm.wrap("logit filters", G.Sequence._filter)
    G.decode_step = tm.wrap("step", G.decode_step)
    return tm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = gemrun.load(args.model, device="cpu", dtype=args.dtype)
    text = " ".join(f"The {i}th sentence of the benchmark talks about the weather in city number {i}."
                    for i in range(args.prompt))
    ids = m.tokenizer.encode(text, bos=True)[:args.prompt]
    params = SamplingParams(temperature=0, max_tokens=args.decode, ignore_eos=True)
    mon = Monitor()
    mon.start()
    run(m, ids, params)  # warm-up
    plain = []
    for _ in range(args.runs):
        if not args.no_wait:
            mon.wait_quiet()
        t0 = time.monotonic()
        wall, cpu, steps = run(m, ids, params)
        plain.append((wall / steps, cpu / steps, mon.others(t0, time.monotonic())))
    plain.sort()
    wall, cpu, others = plain[len(plain) // 2]
    out = {"model": str(m.loaded.path), "dtype": str(m.model.dtype), "threads": args.threads,
           "prompt": len(ids), "decode": args.decode,
           "per_token_ms": {"wall": round(wall * 1e3, 3), "cpu": round(cpu * 1e3, 3)},
           "others_cores": round(others, 3), "tok_s": round(1 / wall, 2)}
    tm = instrument(m)
    if not args.no_wait:
        mon.wait_quiet()
    t0 = time.monotonic()
    _, _, steps = run(m, ids, params, lambda: tm)  # the timers count from the first step on
    out["hooked_others_cores"] = round(mon.others(t0, time.monotonic()), 3)
    per = {k: v / steps * 1e3 for k, v in tm.total.items()}
    step = per.pop("step")
    parts = {k: round(v, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    inside = sum(v for k, v in per.items() if k not in ("sampling", "logit filters"))
    parts["rest of the step (rope, adds, small ops, Python)"] = round(step - inside, 3)
    out["hooked_per_token_ms"] = {"step (forward)": round(step, 3), **parts}
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        run(m, ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), lambda: prof)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
