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


def test_a_users_policy_wins():
    for policy in ("ACTIVE", "PASSIVE"):
        out = subprocess.run([sys.executable, "-c", POLICY], env={**os.environ, "OMP_WAIT_POLICY": policy},
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == policy
