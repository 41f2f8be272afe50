"""Mutation fuzz of the GGUF loader, run in a child process with a memory cap and a per-mutant alarm.

    python tests/gguf_fuzz.py FILE COUNT SEED  ->  one JSON line of counts

Mutations hit the header, metadata and tensor table (counts, lengths, offsets, types, random bytes,
truncation). Every mutant must either load or fail with WeightsError/ConfigError: anything else is a crash.
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


def run(path: str, count: int, seed: int, load_all: bool) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    data = open(path, "rb").read()
    g = GGUFFile(data=bytearray(data))
    header_end = min(t.offset for t in g.tensors.values())
    small = sorted(g.tensors, key=lambda n: g.tensors[n].nbytes)[:3]

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(seed)
    stats = {"mutants": count, "rejected": 0, "accepted": 0, "crashes": 0, "hangs": 0, "oom": 0, "examples": []}
    for _ in range(count):
        m = mutate(data, header_end, rng)
        signal.alarm(10)
        try:
            f = GGUFFile(data=m)
            if "tokenizer.ggml.tokens" in f.metadata:
                check_tokenizer_metadata(f.metadata)
            for name in (f.tensors if load_all else [n for n in small if n in f.tensors]):
                f.load(name)
            ends = sorted((t.offset, t.offset + t.nbytes) for t in f.tensors.values())
            if any(e > len(m) for _, e in ends) or any(b < a_end for (_, a_end), (b, _) in zip(ends, ends[1:])):
                stats["crashes"] += 1  # accepted a file that breaks the invariants
                stats["examples"].append("invariant broken")
            stats["accepted"] += 1
        except (WeightsError, ConfigError):
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
    print(json.dumps(run(path, count, seed, load_all=len(sys.argv) > 4 and sys.argv[4] == "all")))
