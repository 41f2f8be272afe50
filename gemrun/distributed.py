"""Tensor parallelism across processes (`--tp N`): rank 0 leads, the other ranks follow its steps.

Rank 0 owns everything above the model (the HTTP server, the engine's scheduler, sampling, prompt assembly) and
runs its part of the model through a `Leader`: each model call (a prefill chunk, a batched decode step, an
embedding lookup) is first broadcast to the followers as one small message (the op, its token ids or embeddings,
which KV caches it uses with their lengths and checkpoints), then run. Every rank runs the same sharded forward
(`shard.py`), whose all-reduces and all-gathers meet. A follower keeps a twin of each of rank 0's cache lists,
made, rewound, checkpointed and dropped as rank 0's are, so the prefix pool, chunked prefill and continuous
batching work unchanged above the model.

Ranks come from torchrun (`torchrun --nproc-per-node N -m gemrun.cli serve --tp N`: every rank runs the command;
the followers stop in `open_parallel`, follow, and exit) or are spawned here (`gemrun serve --tp N`: rank 0 starts
N - 1 `python -m gemrun.distributed` processes and meets them through a TCPStore on 127.0.0.1). Collectives run on
NCCL for CUDA devices (rank r on cuda:LOCAL_RANK) and gloo on the CPU; step messages always go over a gloo group.

When a rank dies, the next collective fails (gloo: at once, its socket closes) and the leader marks the model
lost: `ModelLost` stops the engine, requests in flight and new ones get 503, and `Leader.on_lost` is called (the
server exits non-zero). A watchdog notices a spawned follower's exit even while the server idles.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import GemrunError, ModelLost
from .runtime import open_checkpoint, resolve_device
from .shard import HeadSkipped, Shard, VocabParallel
from .weights.load import Loaded, Progress

log = logging.getLogger("gemrun.distributed")
IDLE = datetime.timedelta(days=3650)  # followers wait for rank 0's next step as long as a server idles
STEP = datetime.timedelta(seconds=300)  # a collective inside one step waits this long for a rank (NCCL: a dead
# peer shows only as a stalled collective; past this, the process group gives up and the model is lost)
STARTUP = 3600.0  # seconds rank 0 waits for spawned ranks to load their parts


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int  # the device index on this machine


def launched() -> Rank | None:
    """This process's place when a launcher (torchrun) set RANK and WORLD_SIZE, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    rank = int(os.environ["RANK"])
    return Rank(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)))


def wanted(tp: int | None) -> bool:
    """Whether a load runs tensor-parallel: `tp` > 1, or a launcher started several ranks."""
    return (tp or 1) > 1 or launched() is not None


def is_follower() -> bool:
    """A launcher's rank other than 0: it serves nothing, it follows rank 0."""
    r = launched()
    return r is not None and r.rank > 0


def _device(device: str, local: int) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise GemrunError(f"rank needs cuda:{local} but {torch.cuda.device_count()} CUDA devices are visible")
        return f"cuda:{local}"
    if dev.type != "cpu":
        raise GemrunError(f"tensor parallelism runs on CUDA devices or the CPU, not {dev.type}")
    return "cpu"


def _join(device: str, rank: int, world: int, store=None) -> object:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return the gloo group of the step messages."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if store is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=STEP)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=STEP)
    return dist.new_group(backend="gloo", timeout=IDLE)


def open_parallel(tp: int | None, path=None, device: str = "auto", dtype: str = "auto",
                  progress: Progress | None = None, mmproj=None, pan_and_scan: bool = False,
                  packed: bool | None = None, quantize: str | None = None, vocab: str = "parallel") -> Loaded:
    """Rank 0's part of a checkpoint over `tp` ranks, its model a `Leader` (ranks spawned here unless a launcher
    started them). On a launcher's other ranks: load that rank's part, follow rank 0 until it stops, and exit.
    CPU threads (`torch.get_num_threads()`) are shared out among the ranks. `vocab`: see `shard.Shard`."""
    env = launched()
    if env is not None and tp not in (None, 1, env.world):
        raise GemrunError(f"--tp {tp} differs from the {env.world} ranks the launcher started")
    me = env or Rank(0, tp or 1, 0)
    dev = _device(device, me.local)
    if dev == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // me.world))
    store, procs = None, []
    if env is None:  # spawn the followers; they load beside us and say when they are ready
        store = dist.TCPStore("127.0.0.1", 0, me.world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=STARTUP))
        spec = {"path": None if path is None else str(path), "device": device, "dtype": dtype, "packed": packed,
                "quantize": quantize, "vocab": vocab, "threads": torch.get_num_threads(), "port": store.port,
                "world": me.world}
        procs = [subprocess.Popen([sys.executable, "-m", "gemrun.distributed", json.dumps({**spec, "rank": r})])
                 for r in range(1, me.world)]
    try:
        loaded = open_checkpoint(path, dev, dtype, progress, mmproj, pan_and_scan, packed, quantize,
                                 shard=Shard(me.rank, me.world, vocab))
        if procs:
            _wait_ready(store, procs)
        group = _join(dev, me.rank, me.world, store)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    if me.rank > 0:
        code = follow(loaded.model, group, dev)
        dist.destroy_process_group()
        raise SystemExit(code)
    loaded.model = Leader(loaded.model, group, procs)
    atexit.register(loaded.model.close)
    return loaded


def _wait_ready(store, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STARTUP
    for rank, proc in enumerate(procs, 1):
        while not store.check([f"ready/{rank}"]):
            if proc.poll() is not None:
                raise GemrunError(f"tensor-parallel rank {rank} exited with status {proc.returncode} while loading")
            if time.monotonic() > deadline:
                raise GemrunError(f"tensor-parallel rank {rank} did not load within {STARTUP:g} s")
            time.sleep(0.05)


# --- rank 0 ---------------------------------------------------------------------------------------------------


class CacheList(list):
    """Rank 0's per-layer caches of one sequence, numbered so the followers can keep twins."""

    tp_id: int


def _state(caches: list) -> tuple:
    """(length, per-layer checkpoints or None): what a follower's twin must match before the next op."""
    holds = tuple(getattr(c, "hold", None) for c in caches)
    return caches[0].length, holds if any(h is not None for h in holds) else None


def _drain(q: deque) -> list:
    out = []
    while q:
        out.append(q.popleft())
    return out


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def _atomic():
    """Hold Ctrl-C back while collectives are under way (in the main thread): an op cut in the middle would
    leave the ranks out of step. The interrupt is raised when the op is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])
        elif caught and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


class Leader:
    """Rank 0's model: its part of the sharded decoder, each of whose calls is first broadcast to the follower
    ranks. Anything else (parameters, layers, dtype, ...) is the part's own. `on_lost(reason)` is called once
    when a rank is gone; every later call raises `ModelLost`."""

    def __init__(self, model, group, procs: list[subprocess.Popen] | None = None):
        self.model, self.group, self.procs = model, group, list(procs or [])
        self.world = dist.get_world_size()
        self.config, self.specs = model.config, model.specs
        self.vocab_parallel = isinstance(model.embed_tokens, VocabParallel)
        self.lost: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._ids = itertools.count()
        self._made: deque = deque()  # (id, batch, capacity, spare) of cache lists the followers must make
        self._dropped: deque = deque()  # ids of cache lists garbage-collected here
        self._lock, self._lost_lock = threading.Lock(), threading.Lock()
        self._closed = False
        for rank, proc in enumerate(self.procs, 1):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"gemrun-rank{rank}", daemon=True).start()

    def __getattr__(self, name: str):
        if name.startswith("_") or "model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.model, name)

    def make_caches(self, batch: int = 1, capacity: int = 256, spare: int = 0) -> CacheList:
        caches = CacheList(self.model.make_caches(batch, capacity, spare))
        caches.tp_id = next(self._ids)
        self._made.append((caches.tp_id, batch, capacity, spare))
        weakref.finalize(caches, self._dropped.append, caches.tp_id)
        return caches

    def __call__(self, tokens, caches, embeds=None, last_only: bool = False, blocks=None) -> torch.Tensor:
        return self._run("forward", [caches], (tokens, embeds, last_only, blocks),
                         lambda: self.model(tokens, caches, embeds=embeds, last_only=last_only, blocks=blocks))

    def decode(self, tokens: torch.Tensor, sequences: list) -> torch.Tensor:
        return self._run("decode", sequences, (tokens,), lambda: self.model.decode(tokens, sequences))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.vocab_parallel:
            return self.model.embed(tokens)
        return self._run("embed", [], (tokens,), lambda: self.model.embed(tokens))

    def hidden(self, *args, **kw):
        raise GemrunError("speculative decoding does not run with tensor parallelism (--tp)")

    project = hidden

    def _run(self, op: str, lists: list, args: tuple, local: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock, _atomic():
            if self.lost is not None or self._closed:
                raise ModelLost(f"the tensor-parallel model is gone: {self.lost or 'closed'}")
            if not all(isinstance(c, CacheList) for c in lists):
                raise GemrunError("a tensor-parallel model runs on caches from its own make_caches")
            used = [(c.tp_id, _state(c)) for c in lists]
            message = (op, _drain(self._made), _drain(self._dropped), used, tuple(_cpu(a) for a in args))
            try:
                dist.broadcast_object_list([message], src=0, group=self.group)
                return local()
            except Exception as e:  # a collective left half done: the ranks are out of step for good
                self._lose(f"{type(e).__name__}: {str(e)[:300]}")
                raise ModelLost(f"the tensor-parallel model is gone: {self.lost}") from e

    def _lose(self, reason: str) -> None:
        with self._lost_lock:
            if self.lost is not None or self._closed:
                return
            self.lost = reason
        log.error(json.dumps({"event": "tensor_parallel_lost", "reason": reason}))
        if self.on_lost is not None:
            self.on_lost(reason)

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closed:
            self._lose(f"rank {rank} exited with status {code}")

    def close(self) -> None:
        """Stop the followers (they exit 0) and leave the process group."""
        held = self._lock.acquire(timeout=30)
        try:
            if self._closed:
                return
            self._closed = True
            if not held:  # an op stuck in a collective: leave without telling the followers
                self.lost = self.lost or "closed while a step was under way"
            if self.lost is None:
                with contextlib.suppress(Exception):
                    dist.broadcast_object_list([("stop", [], [], [], ())], src=0, group=self.group)
        finally:
            if held:
                self._lock.release()
        for proc in self.procs:
            try:
                proc.wait(timeout=30 if self.lost is None else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --- the other ranks ------------------------------------------------------------------------------------------


def _sync(caches: list, state: tuple) -> None:
    """Bring a twin to rank 0's cache state: rewound to its length, checkpointed as it is."""
    length, holds = state
    for j, c in enumerate(caches):
        if c.length > length:
            c.trim(c.length - length)
        hold = holds[j] if holds else None
        if getattr(c, "hold", None) != hold:
            if hold is None:
                c.release()
            elif hold == c.length:
                c.checkpoint()
        if c.length != length or getattr(c, "hold", None) != hold:
            raise RuntimeError(f"cache out of step with rank 0 (length {c.length} vs {length})")


def follow(model, group, device: str) -> int:
    """Run rank 0's steps on this rank's part of the model until it stops (returns 0) or is gone (1)."""
    if not isinstance(model.embed_tokens, VocabParallel):  # the head is replicated: only rank 0 needs logits
        model.embed_tokens = HeadSkipped(model.embed_tokens)
    caches: dict[int, list] = {}
    with torch.inference_mode():
        while True:
            box: list = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=group)
                op, made, dropped, used, args = box[0]
                if op == "stop":
                    return 0
                for i, batch, capacity, spare in made:
                    caches[i] = model.make_caches(batch, capacity, spare)
                for i in dropped:
                    caches.pop(i, None)
                lists = [caches[i] for i, _ in used]
                for c, (_, state) in zip(lists, used):
                    _sync(c, state)
                args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                if op == "forward":
                    tokens, embeds, last_only, blocks = args
                    model(tokens, lists[0], embeds=embeds, last_only=last_only, blocks=blocks)
                elif op == "decode":
                    model.decode(args[0], lists)
                elif op == "embed":
                    model.embed(args[0])
            except Exception as e:  # rank 0 is gone (its sockets closed), or this rank failed: leave
                print(f"gemrun rank {dist.get_rank()}: stopping: {type(e).__name__}: {str(e)[:300]}",
                      file=sys.stderr)
                return 1


def main(argv: list[str] | None = None) -> None:
    """A follower spawned by rank 0 (`open_parallel`): load this rank's part, say so, join, follow."""
    spec = json.loads((argv or sys.argv[1:])[0])
    rank, world = spec["rank"], spec["world"]
    torch.set_num_threads(spec["threads"])
    store = dist.TCPStore("127.0.0.1", spec["port"], world, is_master=False,
                          timeout=datetime.timedelta(seconds=STARTUP))
    try:
        dev = _device(spec["device"], rank)
        loaded = open_checkpoint(spec["path"], dev, spec["dtype"], packed=spec["packed"], quantize=spec["quantize"],
                                 shard=Shard(rank, world, spec["vocab"]))
    except GemrunError as e:
        print(f"gemrun rank {rank}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    store.set(f"ready/{rank}", "1")
    group = _join(dev, rank, world, store)
    code = follow(loaded.model, group, dev)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
