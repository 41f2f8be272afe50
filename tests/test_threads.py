"""OpenMP's wait policy, chosen when gemrun is imported: sleeping threads when other processes keep the cores busy
(a spinning pool then starves the thread doing the work), spinning otherwise; a user's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import gemrun

POLICY = "import os, gemrun; print(os.environ['OMP_WAIT_POLICY'])"


def test_busy_cores_make_openmp_threads_sleep():
    hog = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    try:
        time.sleep(0.3)
        assert gemrun._others_busy(0.2) >= 0.5
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        out = subprocess.run([sys.executable, "-c", POLICY], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "PASSIVE"
    finally:
        hog.kill()


BURSTS = """
import time
while True:
    end = time.monotonic() + 0.03
    while time.monotonic() < end:
        pass
    time.sleep(0.07)
"""


def test_a_burst_of_load_is_not_a_busy_machine():
    """A neighbour's short bursts (a shell prompt, a health check creating its HTTP client) must not cost a whole
    server its spinning threads (35% slower prefill): the load is sampled twice and the lower sample counts."""
    bursts = subprocess.Popen([sys.executable, "-c", BURSTS])
    try:
        time.sleep(0.3)
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        chosen = [subprocess.run([sys.executable, "-c", POLICY], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip() for _ in range(8)]
        assert chosen.count("ACTIVE") >= 7, chosen
    finally:
        bursts.kill()


def test_a_users_policy_wins():
    for policy in ("ACTIVE", "PASSIVE"):
        out = subprocess.run([sys.executable, "-c", POLICY], env={**os.environ, "OMP_WAIT_POLICY": policy},
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == policy


IDLE = """
import os, time, torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
for _ in range(20):
    a @ a  # a parallel region: OpenMP's worker threads exist from here on
time.sleep(1.0)
t0 = os.times()
time.sleep(1.0)
t1 = os.times()
print((t1.user - t0.user) + (t1.system - t0.system))
"""


def test_spinning_threads_go_to_sleep_when_work_stops():
    """On an idle machine gemrun lets OpenMP's threads spin (fast decode), but only for a moment: an idle server
    or chat must not keep a core busy for minutes after a reply (ACTIVE alone spins ~5 minutes)."""
    assert gemrun.openmp_settings({}, busy=1.0) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert gemrun.openmp_settings({"OMP_WAIT_POLICY": "ACTIVE"}, busy=0.0) == {}
    chosen = gemrun.openmp_settings({}, busy=0.0)
    assert chosen["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | chosen
    out = subprocess.run([sys.executable, "-c", IDLE], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.3, f"{out.stdout.strip()} s of CPU in 1 s of idling"
