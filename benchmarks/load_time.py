"""Load time of a GGUF in gemrun against llama.cpp, fresh processes, interleaved, medians (issue 16).

    python benchmarks/load_time.py --model FILE.gguf [--mmproj F] [--draft F] --threads 2 --runs 3 \
        [--llama-simple /work/llamacpp/build/bin/llama-simple]

gemrun: `gemrun.load(FILE, mmproj=, draft=)` in a fresh Python process; reported: the load call's wall time, the
process's wall time (imports included) and peak RSS. llama.cpp: `llama-simple -m FILE -n 1` (the text model
only: llama-simple takes no mmproj or drafter), its process wall time and its own "load time" line. Each process
starts on a quiet machine (`quiet.py`: others < 0.15 cores for 2 s) and runs disturbed by others (> 0.2 cores)
are discarded and counted. The files are read before every run, so each run finds them in the page cache (a cold
read is the disk's speed, the same for both).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quiet import DISTURBED, Monitor  # noqa: E402

GEMRUN = """
import json, sys, time
t = time.perf_counter()
import gemrun
m = gemrun.load(sys.argv[1], mmproj=sys.argv[2] or None, draft=sys.argv[3] or None)
print(json.dumps({"load_s": time.perf_counter() - t}))
"""


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mmproj", default="")
    ap.add_argument("--draft", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tries", type=int, default=8)
    ap.add_argument("--llama-simple", default=None)
    a = ap.parse_args()
    mon = Monitor()
    mon.start()
    env_threads = ["env", f"OMP_NUM_THREADS={a.threads}"]
    engines = {"gemrun": env_threads + [sys.executable, "-c", GEMRUN, a.model, a.mmproj, a.draft]}
    if a.llama_simple:
        engines["llama.cpp"] = [a.llama_simple, "-m", a.model, "-n", "1", "Hello"]
    got: dict[str, list[dict]] = {e: [] for e in engines}
    discarded = {e: 0 for e in engines}
    for _ in range(a.max_tries):
        for name, cmd in engines.items():
            if len(got[name]) >= a.runs:
                continue
            for f in (a.model, a.mmproj, a.draft):  # back into the page cache (the other engine's run may have
                if f:  # pushed it out: llama.cpp's repacked copy and the file do not both fit in 24 GB)
                    warm(f)
            mon.wait_quiet()
            child = mon.run_child(cmd)
            if child.returncode != 0:
                sys.exit(f"{name} failed ({child.returncode}): {child.text('stderr')[-2000:]}")
            if mon.others(child.start, child.end) > DISTURBED:
                discarded[name] += 1
                continue
            run = {"wall_s": child.end - child.start, "peak_rss_gib": child.maxrss_gib}
            if name == "gemrun":
                run["load_s"] = json.loads(child.text().strip().splitlines()[-1])["load_s"]
            else:
                m = re.search(r"load time\s*=\s*([\d.]+) ms", child.text("stderr"))
                run["load_s"] = float(m.group(1)) / 1000 if m else None
            got[name].append(run)
            print(json.dumps({"engine": name, **{k: round(v, 3) if v else v for k, v in run.items()}}), flush=True)
        if all(len(v) >= a.runs for v in got.values()):
            break
    summary = {"model": a.model, "mmproj": a.mmproj or None, "draft": a.draft or None, "threads": a.threads,
               "discarded": discarded}
    for name, runs in got.items():
        for key in ("load_s", "wall_s", "peak_rss_gib"):
            values = [r[key] for r in runs if r[key] is not None]
            if values:
                summary[f"{name}_{key}"] = round(statistics.median(values), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
