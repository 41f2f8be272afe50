"""What `--tp` costs per decoded token on this machine: CPU seconds (the kernel's accounting of each rank's
process, /proc/PID/stat and process_time, not wall time) and the collectives rank 0 runs (calls and payload
bytes), for --tp 1 and --tp 2 with the tied embedding/head vocab-parallel or replicated; plus each rank's weight
bytes. Greedy decoding of one sequence after a short prompt, the embedded 270M unless --model says otherwise.

    python benchmarks/tp_cost.py [--tokens 64] [--dtype auto] [--model PATH]

The all-reduce arithmetic for larger models is in `allreduce_bytes` (printed for the 12B presets)."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import gemrun
from gemrun.api import Model
from gemrun.config import preset
from gemrun.distributed import open_parallel
from gemrun.generate import Sequence, decode_step
from gemrun.sampling import SamplingParams


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Collectives:
    """Counts the all-reduces and all-gathers this process runs, and their payload (the tensor's bytes)."""

    def __init__(self):
        self.calls = self.bytes = 0
        self.saved = dist.all_reduce, dist.all_gather

    def __enter__(self):
        def all_reduce(t, *a, **k):
            self.calls, self.bytes = self.calls + 1, self.bytes + t.numel() * t.element_size()
            return self.saved[0](t, *a, **k)

        def all_gather(out, t, *a, **k):
            self.calls, self.bytes = self.calls + 1, self.bytes + len(out) * t.numel() * t.element_size()
            return self.saved[1](out, t, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self.saved


def measure(tp: int, vocab: str, tokens: int, model: str | None, dtype: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    if tp == 1:
        m = gemrun.load(model, device="cpu", dtype=dtype)
    else:
        loaded = open_parallel(tp, model, "cpu", dtype, vocab=vocab)
        m = Model(loaded, loaded.tokenizer)
    followers = [p.pid for p in getattr(m.model, "procs", [])]
    ids = m.tokenizer.encode("The history of the city begins with a small settlement by the river, where", bos=True)
    seq = Sequence(m.model, ids, SamplingParams(temperature=0, max_tokens=tokens + 2, ignore_eos=True), set(),
                   m.max_context, m.tokenizer.vocab_size)
    while not seq.prefilled:
        seq.prefill_step()
    seq.choose(seq.logits)
    seq.choose(decode_step(m.model, [seq])[0])  # warm
    with Collectives() as coll:
        c0, f0 = time.process_time(), [cpu_seconds(p) for p in followers]
        for _ in range(tokens):
            seq.choose(decode_step(m.model, [seq])[0])
        c1, f1 = time.process_time(), [cpu_seconds(p) for p in followers]
    part = m.model.model if tp > 1 else m.model
    out = {"tp": tp, "vocab": vocab if tp > 1 else "-", "threads_per_rank": torch.get_num_threads(),
           "rank0_cpu_ms_per_token": round(1000 * (c1 - c0) / tokens, 2),
           "followers_cpu_ms_per_token": [round(1000 * (b - a) / tokens, 2) for a, b in zip(f0, f1)],
           "collectives_per_token": coll.calls / tokens, "collective_bytes_per_token": coll.bytes // tokens,
           "rank0_weight_bytes": sum(t.nbytes for t in [*part.parameters(), *part.buffers()]),
           "text": m.tokenizer.decode([t.id for t in seq.tokens[:12]])}
    out["all_ranks_cpu_ms_per_token"] = round(out["rank0_cpu_ms_per_token"] + sum(out["followers_cpu_ms_per_token"]),
                                              2)
    if tp > 1:
        m.model.close()
    return out


def allreduce_bytes(name: str, world: int, dtype_bytes: int = 2, batch: int = 1) -> dict:
    """Per decoded token (batch rows): two all-reduces a layer of (batch, hidden) activations; a ring all-reduce
    sends 2 (W - 1) / W of the payload from each rank. Vocab-parallel adds the logits' all-gather ((W - 1) / W of
    vocab x 4 bytes received per rank) and an embedding all-reduce of one row."""
    cfg = preset(name)
    payload = 2 * cfg.num_layers * batch * cfg.hidden_size * dtype_bytes
    ring = 2 * (world - 1) / world
    logits = batch * cfg.vocab_size * 4 * (world - 1) / world
    return {"model": name, "tp": world, "allreduces_per_token": 2 * cfg.num_layers,
            "allreduce_payload_bytes": payload, "ring_bytes_sent_per_rank": round(payload * ring),
            "vocab_parallel_extra_bytes_per_rank": round(logits + batch * cfg.hidden_size * dtype_bytes * ring)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    runs = [(1, "-", cores), (1, "-", max(1, cores // 2)), (2, "parallel", cores), (2, "replicated", cores)]
    for tp, vocab, threads in runs:  # open_parallel shares the threads out: cores // tp per rank
        print(json.dumps(measure(tp, vocab, args.tokens, args.model, args.dtype, threads)), flush=True)
    for name in ("gemma-3-12b", "gemma-4-12b"):
        for world in (2, 4):
            print(json.dumps(allreduce_bytes(name, world)))


if __name__ == "__main__":
    main()
