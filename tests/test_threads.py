"""OpenMP's wait policy, chosen when gemrun is imported: sleeping threads when other processes keep the cores busy
(a spinning pool then starves the thread doing the work), spinning otherwise; a user's own setting wins."""

from __future__ import annotations

import json
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


POOLS = """
import asyncio, json, os, torch
from concurrent.futures import ThreadPoolExecutor
import gemrun
from gemrun.engine import Engine
from gemrun.generate import stop_ids_for
from gemrun.quant.native import release_openmp_workers
from gemrun.sampling import SamplingParams
from gemrun.server.runner import Service

torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
parallel = lambda: torch.ones(1 << 22).exp_()  # a parallel region: the calling thread's pool gets a worker
out = {}
base = threads()
parallel()
out["main_pool"] = threads() - base
release_openmp_workers()
out["released"] = threads() - base

m = gemrun.load()
out["after_load"] = threads() - base
parallel()  # a user computed here before handing the model to an engine
engine = Engine(m).start()
params = SamplingParams(temperature=0, max_tokens=2)
list(engine.submit(m.prompts().text("Hello"), params, stop_ids_for(m.model, params)))
out["engine"] = threads() - base  # the engine's thread and its worker; the caller's worker is gone

service = Service(m, engine, "m")


async def prompt_work():
    # one executor thread: with more, the second call could start another thread (the first one's idle mark comes
    # after its result) and be counted as a pool's worker
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    await service._off_loop(lambda: None)  # the loop's worker thread exists from here on
    idle = threads()
    await service._off_loop(parallel)  # a prompt worker's parallel work (an image's encoder)
    return threads() - idle


out["prompt_worker"] = asyncio.run(prompt_work())
engine.stop()
print(json.dumps(out))
"""


def test_only_the_computing_thread_keeps_openmp_workers():
    """libgomp throttles every barrier's spinning once more threads hold worker pools than there are cores: the
    engine's prefill ran 1.3-2x slower after the loader or a prompt worker had run parallel work. A thread done
    with the compute lets its workers go: the loader, a thread handing its model to an engine, a prompt worker."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run([sys.executable, "-c", POOLS], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["main_pool"] == 1 and out["released"] == 0, out
    assert out["after_load"] == 0, out
    assert out["engine"] == 2, out
    assert out["prompt_worker"] == 0, out
