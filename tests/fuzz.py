"""The mutation-fuzz harness of tests/gguf_fuzz.py and tests/input_fuzz.py (hardening.md: parsers of untrusted files
run in a child process with a memory cap and an alarm).

Mutant i of a run is made from its own generator (`seed`, `i`), so any mutant can be replayed alone and a run can
resume after one (`--start`). `fuzz` checks mutants one by one under an alarm and counts the outcomes:

    rejected  a clean project error (the input is refused)
    accepted  a valid load or result
    silent    accepted although broken in a way the checklist says must be refused (the check names the problem)
    crashes   any other exception
    hangs     past the alarm
    oom       out of memory under the cap

With `progress`, a JSON line goes out before ({"i": i}) and after ({"i": i, "o": outcome}) each mutant: `supervise`
reads them, and restarts the child after the mutant that killed it (a segfault, an abort: counted as a crash) or
hung it where the alarm cannot reach (inside C code: killed after `stall` seconds, counted as a hang).
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time

OUTCOMES = ("rejected", "accepted", "silent", "crashes", "hangs", "oom")
EXTREMES = [0, 1, 2, 3, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]
MAX_EXAMPLES = 8


class Hang(Exception):
    pass


def limit_memory(nbytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def rng_for(seed: int, i: int) -> random.Random:
    return random.Random(f"{seed}/{i}")


def empty_stats() -> dict:
    return {"mutants": 0, **dict.fromkeys(OUTCOMES, 0), "examples": []}


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "not enough memory" in text


def fuzz(count: int, seed: int, make, check, clean, seconds: float, start: int = 0, progress: bool = False) -> dict:
    """Mutants `start`..`count`-1: `make(rng)` builds one, `check(mutant)` takes it (None: fine; a string: a broken
    input it accepted), each under an alarm of `seconds`. Exceptions of type `clean` are rejections."""

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    stats = empty_stats()
    for i in range(start, count):
        if progress:
            print(json.dumps({"i": i}), flush=True)
        mutant = make(rng_for(seed, i))
        example = None
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            problem = check(mutant)
            outcome, example = ("silent", problem) if problem else ("accepted", None)
        except clean:
            outcome = "rejected"
        except Hang:
            outcome, example = "hangs", f"past {seconds:g} s"
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - anything else is a finding (a Rust panic is a BaseException)
            outcome = "oom" if _out_of_memory(e) else "crashes"
            example = f"{type(e).__name__}: {e}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        stats["mutants"] += 1
        stats[outcome] += 1
        if example is not None:
            example = f"mutant {i}: {example}"[:300]
            if len(stats["examples"]) < MAX_EXAMPLES:
                stats["examples"].append(example)
        if progress:
            print(json.dumps({"i": i, "o": outcome, "e": example}), flush=True)
    return stats


def model_problems(m, image=None) -> str | None:
    """Why a loaded model is broken (None: it is not): token ids past the embedding, non-finite logits of a
    3-token forward; with `image`, non-finite soft tokens of it or logits of a prompt holding them."""
    import torch

    from gemrun.errors import GemrunError
    from gemrun.generate import Prompt, prefill

    tok, vocab = m.tokenizer, m.config.vocab_size
    if tok.vocab_size > vocab:
        return f"tokenizer of {tok.vocab_size} tokens over an embedding of {vocab} rows"
    for what, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if not 0 <= i < vocab:
            return f"{what} id {i} outside the embedding of {vocab} rows"
    with torch.inference_mode():
        if image is None:
            logits = m.logits((tok.encode("Hi there", bos=True) + [tok.eos_id] * 3)[:3])
        else:
            from gemrun.model.multimodal import media_blocks, prompt_embeddings
            from gemrun.processing.source import MediaRequest

            soft = m.inputs.embed([m.inputs.prepare("image", image, MediaRequest())])
            (token, vectors), = soft.items()
            if not torch.isfinite(vectors).all():
                return "non-finite image soft tokens"
            ids = [tok.bos_id] + [token] * len(vectors) + [tok.eos_id]
            ids_t = torch.tensor(ids)
            prompt = Prompt(ids, prompt_embeddings(m.model, ids_t, soft), media_blocks(ids_t, m.inputs.vision_ids))
            logits = prefill(m.model, prompt, m.model.make_caches(capacity=len(ids)))
    if not torch.isfinite(logits).all():
        return "non-finite logits on a 3-token forward" if image is None else "non-finite logits with an image"
    try:  # the checkpoint's chat template renders (or fails cleanly) in the sandbox
        m.chat_prompt([{"role": "user", "content": "Hi"}])
    except GemrunError:
        pass
    return None


def main_args(argv: list[str]) -> tuple[list[str], int, bool]:
    """(positional arguments, --start, --progress) of a fuzz child's command line."""
    args, start, progress = [], 0, False
    it = iter(argv)
    for a in it:
        if a == "--start":
            start = int(next(it))
        elif a == "--progress":
            progress = True
        else:
            args.append(a)
    return args, start, progress


def supervise(cmd: list[str], count: int, env: dict | None = None, stall: float = 120.0, setup: float = 900.0,
              cwd: str | None = None) -> dict:
    """Run a fuzz child (`cmd` + --start I --progress) over mutants 0..count-1, restarting it past a mutant that
    killed or hung it. `stall`: seconds a mutant may take before the child is killed; `setup`: seconds before its
    first mutant (imports, a baseline load)."""
    stats = empty_stats()
    i = 0
    with tempfile.TemporaryFile() as err:
        while i < count:
            err.seek(0)
            err.truncate()
            child = subprocess.Popen([*cmd, "--start", str(i), "--progress"], stdout=subprocess.PIPE, stderr=err,
                                     env=env, cwd=cwd, start_new_session=True)
            current, buf, deadline = None, b"", time.monotonic() + setup
            fd = child.stdout.fileno()
            while True:
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    msg = json.loads(line)
                    if "o" in msg:
                        stats["mutants"] += 1
                        stats[msg["o"]] += 1
                        if msg.get("e") and len(stats["examples"]) < MAX_EXAMPLES:
                            stats["examples"].append(msg["e"])
                        current, i = None, msg["i"] + 1
                    elif "i" in msg:
                        current, deadline = msg["i"], time.monotonic() + stall
                if i >= count:
                    child.wait()
                    break
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(fd, 1 << 16) if ready else None
                if chunk:
                    buf += chunk
                    continue
                if chunk is None:  # no word within the deadline: a hang the alarm could not break
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                    outcome, what = "hangs", f"no progress in {stall if current is not None else setup:g} s"
                else:  # the child exited in the middle of a mutant (or before the first)
                    child.wait()
                    err.seek(max(0, err.seek(0, 2) - 400))
                    outcome = "crashes"
                    what = f"child died ({child.returncode}): {err.read().decode(errors='replace').strip()}"
                if current is None:  # setup itself failed: nothing to skip past
                    raise RuntimeError(f"fuzz child {' '.join(cmd)} failed before its first mutant: {what}")
                stats["mutants"] += 1
                stats[outcome] += 1
                if len(stats["examples"]) < MAX_EXAMPLES:
                    stats["examples"].append(f"mutant {current}: {what}"[:300])
                i = current + 1
                break
            child.stdout.close()
    return stats


def run_supervised(script: str, args: list[str], count: int, stall: float = 120.0, setup: float = 900.0) -> dict:
    """`supervise` for a fuzz script of tests/ (gemrun importable from this checkout in the child)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, tests, os.environ.get("PYTHONPATH")]))}
    return supervise([sys.executable, os.path.join(tests, script), *args], count, env, stall, setup, cwd=root)
