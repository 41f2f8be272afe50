"""Timing on a shared machine: how many cores the other processes use, from /proc.

`Monitor` samples, every `period` seconds, the machine's busy CPU time (/proc/stat: user, nice, system, irq,
softirq) and that of the processes being measured (this one and the registered children, /proc/PID/stat utime +
stime, all threads). The difference is what everything else used: `others(t0, t1)` in cores over a window of
`time.monotonic()` (CLOCK_MONOTONIC, the clock of `time.perf_counter` too, shared by every process on Linux).

    mon = Monitor(); mon.start()
    mon.wait_quiet()                     # others < 0.15 cores for 2 s
    ... run, note (t0, t1) ...
    mon.others(t0, t1) > 0.2             # disturbed: discard the sample
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")
QUIET, DISTURBED = 0.15, 0.2  # cores used by other processes: wait below the first, discard above the second


def _machine_busy() -> int:
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in cpu[:7])
    return user + nice + system + irq + softirq


def _process_busy(pid: int, children: bool) -> int:
    """utime + stime of `pid` (all threads), with `children` also that of its children it has reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = [int(v) for v in f.read().rsplit(")", 1)[1].split()[11:15]]
    except OSError:
        return 0
    return sum(fields) if children else fields[0] + fields[1]


@dataclass
class Child:
    start: float
    end: float = 0.0
    returncode: int = 0
    maxrss_gib: float = 0.0  # the child's peak resident memory (wait4's ru_maxrss)
    stdout: list[tuple[float, str]] = field(default_factory=list)
    stderr: list[tuple[float, str]] = field(default_factory=list)

    def text(self, stream: str = "stdout") -> str:
        return "".join(line for _, line in getattr(self, stream))


def _read(pipe, into: list) -> None:
    for line in pipe:
        into.append((time.monotonic(), line))
    pipe.close()


class Monitor(threading.Thread):
    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period = period
        self.ours: set[int] = set()  # running children being measured
        self.done: dict[int, int] = {}  # busy ticks of measured processes that have exited
        self.times: list[float] = []
        self.others_ticks: list[int] = []
        self.lock = threading.Lock()

    def run_child(self, cmd: list[str]) -> Child:
        """Run `cmd` as a measured process (its CPU time is ours, not others'); every line of its stdout and
        stderr comes back with the monotonic time it arrived."""
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        with self.lock:
            self.ours.add(proc.pid)
        child = Child(start=time.monotonic())
        readers = [threading.Thread(target=_read, args=(proc.stdout, child.stdout)),
                   threading.Thread(target=_read, args=(proc.stderr, child.stderr))]
        for r in readers:
            r.start()
        while True:  # reaped under the lock: its ticks move from /proc to `done` between two samples
            with self.lock:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    self.ours.discard(pid)
                    self.done[pid] = round((usage.ru_utime + usage.ru_stime) * TICK)
                    break
            time.sleep(0.05)
        child.end = time.monotonic()
        for r in readers:
            r.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        child.maxrss_gib = usage.ru_maxrss / 2**20
        proc.returncode = child.returncode  # reaped here, not by Popen
        return child

    def sample(self) -> None:
        with self.lock:
            ours = (_process_busy(os.getpid(), False) + sum(_process_busy(p, True) for p in self.ours)
                    + sum(self.done.values()))
            busy = _machine_busy()
            self.times.append(time.monotonic())
            self.others_ticks.append(busy - ours)

    def run(self) -> None:
        while True:
            self.sample()
            time.sleep(self.period)

    def others(self, t0: float, t1: float) -> float:
        """Cores used by other processes over [t0, t1] (widened to the samples around it)."""
        self.sample()
        with self.lock:
            i = max(0, bisect.bisect_right(self.times, t0) - 1)
            j = min(len(self.times) - 1, bisect.bisect_left(self.times, t1))
            if j <= i:
                return 0.0
            dt = self.times[j] - self.times[i]
            return max(0.0, (self.others_ticks[j] - self.others_ticks[i]) / TICK / dt)

    def wait_quiet(self, window: float = 2.0, below: float = QUIET, max_wait: float = 3600.0) -> float:
        """Block until others used < `below` cores over the last `window` seconds; the seconds waited."""
        start = last_note = time.monotonic()
        while True:
            time.sleep(window)
            now = time.monotonic()
            load = self.others(now - window, now)
            if load < below:
                return now - start
            if now - start > max_wait:
                print(f"# machine not quiet after {max_wait:.0f} s (others {load:.2f} cores): going on",
                      file=sys.stderr)
                return now - start
            if now - last_note > 30:
                print(f"# waiting for a quiet machine: others use {load:.2f} cores", file=sys.stderr, flush=True)
                last_note = now
