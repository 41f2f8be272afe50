"""Read-bandwidth probe: N threads stream through a buffer much larger than the last-level cache, as decode
streams its weights, and report GB/s (10^9 bytes per second). The reference for "decode at the bandwidth limit":
decode GB/s = bytes read per token x tokens/s.

    python benchmarks/bandwidth.py --threads 2 --gib 2 --passes 5      # JSON: best and median GB/s

The loop is C (AVX-512 loads, four independent accumulators, OpenMP, one contiguous slice per thread), compiled
with the system gcc into a temporary directory; NumPy would measure its own arithmetic, not the memory.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

// Sum of 64-byte lines of buf (n bytes, a multiple of 256), split into one contiguous slice per thread.
uint64_t probe_read(const uint8_t *buf, int64_t n, int nthreads) {
    uint64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lines = n / 256, per = (lines + nt - 1) / nt;
        int64_t a = t * per, b = a + per < lines ? a + per : lines;
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t i = a; i < b; i++) {
            const uint8_t *p = buf + i * 256;
            s0 = _mm512_add_epi64(s0, _mm512_load_si512((const void *)p));
            s1 = _mm512_add_epi64(s1, _mm512_load_si512((const void *)(p + 64)));
            s2 = _mm512_add_epi64(s2, _mm512_load_si512((const void *)(p + 128)));
            s3 = _mm512_add_epi64(s3, _mm512_load_si512((const void *)(p + 192)));
        }
        total += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    }
    return total;
}

// Touch every page (first-touch by the reading threads, so the pages are resident before timing).
void probe_fill(uint8_t *buf, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n / 4096; i++) memset(buf + i * 4096, (int)(i & 255), 4096);
}
"""


def build(tmp: Path) -> ctypes.CDLL:
    src, lib = tmp / "probe.c", tmp / "probe.so"
    src.write_text("#include <omp.h>\n" + SOURCE)
    subprocess.run(["gcc", "-O2", "-mavx512f", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    so = ctypes.CDLL(str(lib))
    so.probe_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    so.probe_read.restype = ctypes.c_uint64
    so.probe_fill.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return so


def measure(threads: int = 2, gib: float = 2.0, passes: int = 5) -> dict:
    """Streams `gib` GiB `passes` times with `threads` threads -> {"best_gb_s", "median_gb_s", "samples"}."""
    n = int(gib * 2**30) // 4096 * 4096
    with tempfile.TemporaryDirectory() as tmp:
        so = build(Path(tmp))
        raw = ctypes.create_string_buffer(n + 64)  # zeroed by ctypes; aligned to 64 below
        base = (ctypes.addressof(raw) + 63) // 64 * 64
        so.probe_fill(base, n, threads)
        so.probe_read(base, n, threads)  # warm the page tables
        speeds = []
        for _ in range(passes):
            t = time.perf_counter()
            so.probe_read(base, n, threads)
            speeds.append(n / (time.perf_counter() - t) / 1e9)
    return {"threads": threads, "bytes": n, "best_gb_s": round(max(speeds), 2),
            "median_gb_s": round(statistics.median(speeds), 2), "samples": [round(s, 2) for s in speeds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gib", type=float, default=2.0, help="buffer size (keep it several times the LLC)")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(measure(args.threads, args.gib, args.passes)))


if __name__ == "__main__":
    main()
