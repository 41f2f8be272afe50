"""Mutation fuzz of the GGUF loader, run in a child process with a memory cap and a per-mutant alarm.

    python tests/gguf_fuzz.py FILE COUNT SEED [all|header]  ->  one JSON line of counts
    python tests/gguf_fuzz.py FILE COUNT SEED gemma4-text|gemma4-mmproj|gemma4-draft [TEXT_GGUF]

Mutations hit the header, metadata and tensor table (counts, lengths, offsets, types, random bytes,
truncation). Every mutant must either load or fail with WeightsError/ConfigError: anything else is a crash.
The gemma4-* modes run each mutant through gemrun's whole loader (a Gemma 4 text model with its tokenizer, an
mmproj for the model TEXT_GGUF, a drafter for it), where any GemrunError is a clean refusal.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import sys

from gemrun.errors import ConfigError, WeightsError
from gemrun.weights.gguf import GGUFFile, check_tokenizer_metadata

EXTREMES = [0, 1, 2, 3, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]


class Hang(Exception):
    pass


def mutate(data: bytes, header_end: int, rng: random.Random) -> bytearray:
    m = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flip random bytes in the header region
        for _ in range(rng.randint(1, 8)):
            m[rng.randrange(header_end)] = rng.randrange(256)
    elif kind in (1, 2):  # overwrite a 64- or 32-bit field with an extreme value
        width = 8 if kind == 1 else 4
        at = rng.randrange(max(1, header_end - width))
        struct.pack_into("<Q" if width == 8 else "<I", m, at, rng.choice(EXTREMES) % (1 << (8 * width)))
    elif kind == 3:  # truncate
        m = m[:rng.randrange(len(m))]
    elif kind == 4:  # delete or insert bytes inside the header
        at = rng.randrange(header_end)
        if rng.random() < 0.5:
            del m[at:at + rng.randint(1, 16)]
        else:
            m[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # the count fields themselves
        struct.pack_into("<Q", m, rng.choice([8, 16]), rng.choice(EXTREMES))
    return m


def gemma4_loader(mode: str, text: str | None):
    """A function loading one mutant file the way gemrun loads that kind of Gemma 4 GGUF."""
    import torch

    from gemrun.weights import gemma4_gguf
    from gemrun.weights.load import load_drafter, load_gemma4_mmproj, load_gguf

    cpu, f32 = torch.device("cpu"), torch.float32
    base = gemma4_gguf.text_layout(GGUFFile(text))[0] if text else None

    def load(path):
        if mode == "gemma4-text":
            loaded = load_gguf(path, f32, cpu)
            gemma4_gguf.tokenizer(loaded.gguf.metadata)
        elif mode == "gemma4-mmproj":
            load_gemma4_mmproj(path, base, f32, cpu)
        else:
            load_drafter(path, f32, cpu, base)
    return load


def run(path: str, count: int, seed: int, load_all: bool, mode: str = "", text: str | None = None) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    data = open(path, "rb").read()
    if mode.startswith("gemma4"):
        return run_loader(data, count, seed, gemma4_loader(mode, text))
    g = GGUFFile(data=bytearray(data))
    small = sorted(g.tensors, key=lambda n: g.tensors[n].nbytes)[:3]

    def check(m: bytearray) -> str | None:
        f = GGUFFile(data=m)
        if "tokenizer.ggml.tokens" in f.metadata:
            check_tokenizer_metadata(f.metadata)
        for name in (f.tensors if load_all else [n for n in small if n in f.tensors]):
            f.load(name)
        ends = sorted((t.offset, t.offset + t.nbytes) for t in f.tensors.values())
        if any(e > len(m) for _, e in ends) or any(b < a_end for (_, a_end), (b, _) in zip(ends, ends[1:])):
            return "invariant broken"  # accepted a file that breaks the invariants
        return None

    return fuzz(data, count, seed, check, (WeightsError, ConfigError), 10)


def run_loader(data: bytes, count: int, seed: int, load) -> dict:
    """Each mutant written to a file and given to `load`; GemrunError is a clean refusal."""
    import os
    import tempfile

    from gemrun.errors import GemrunError

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GEMRUN_CACHE"] = tmp  # mutated vocabularies are not cached with the real ones
        file = os.path.join(tmp, "m.gguf")

        def check(m: bytearray) -> None:
            with open(file, "wb") as f:
                f.write(m)
            load(file)

        return fuzz(data, count, seed, check, GemrunError, 20)


def fuzz(data: bytes, count: int, seed: int, check, clean, seconds: int) -> dict:
    """`count` mutants of `data` through `check` (a problem string, or None when the mutant is fine), each under
    an alarm of `seconds`: exceptions of type `clean` are rejections, anything else a finding."""
    header_end = min(t.offset for t in GGUFFile(data=bytearray(data)).tensors.values())

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(seed)
    stats = {"mutants": count, "rejected": 0, "accepted": 0, "crashes": 0, "hangs": 0, "oom": 0, "examples": []}
    for _ in range(count):
        m = mutate(data, header_end, rng)
        signal.alarm(seconds)
        try:
            problem = check(m)
            if problem:
                stats["crashes"] += 1
                stats["examples"].append(problem)
            stats["accepted"] += 1
        except clean:
            stats["rejected"] += 1
        except Hang:
            stats["hangs"] += 1
        except MemoryError:
            stats["oom"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is a finding
            stats["crashes"] += 1
            if len(stats["examples"]) < 5:
                stats["examples"].append(f"{type(e).__name__}: {e}"[:200])
        finally:
            signal.alarm(0)
    return stats


if __name__ == "__main__":
    path, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    print(json.dumps(run(path, count, seed, load_all=mode == "all", mode=mode,
                         text=sys.argv[5] if len(sys.argv) > 5 else None)))
