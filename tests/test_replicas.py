"""Replicas behind an off-the-shelf router: two `gemrun serve` processes and a LiteLLM proxy (least-busy, the
shipped deploy/litellm.yaml as it is) on localhost; 40 requests through the proxy are all answered, none lost or
doubled, and spread over both replicas (each server's own /metrics count them).

Needs LiteLLM's proxy (`pip install 'litellm[proxy]'`, best in a venv of its own: it pins older rich and
huggingface_hub); the `litellm` command is found next to this Python, on PATH, or at $GEMRUN_LITELLM. Skipped
without it. About a minute here: `pytest tests/test_replicas.py`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from server_util import PATIENCE, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY, PROXY_KEY = "replica-key", "sk-" + "5eed" * 8


def _litellm() -> str | None:
    beside = Path(sys.executable).with_name("litellm")
    return os.environ.get("GEMRUN_LITELLM") or (str(beside) if beside.exists() else shutil.which("litellm"))


def _healthy(url: str, proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[:4]} exited with {proc.returncode}"
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def _requests(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=PATIENCE).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gemrun_requests_total "))


@pytest.mark.skipif(_litellm() is None, reason="LiteLLM's proxy is not installed (pip install 'litellm[proxy]')")
def test_forty_requests_through_litellm_spread_over_two_replicas(tmp_path):
    env = {**os.environ, "GEMRUN_API_KEY": KEY}
    procs, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            procs.append(subprocess.Popen([sys.executable, "-m", "gemrun.cli", "--threads", "1", "serve", "--port",
                                           str(port), "--served-model-name", "gemma", "--max-context", "1024",
                                           "--log-level", "warning"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL))
        port = free_port()
        proxy = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [_litellm(), "--config", str(ROOT / "deploy" / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port)],
            env={**env, "GEMRUN_REPLICA_1": urls[0] + "/v1", "GEMRUN_REPLICA_2": urls[1] + "/v1",
                 "LITELLM_MASTER_KEY": PROXY_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for url, proc in zip(urls, procs):
            _healthy(url, proc, "/health")
        _healthy(proxy, procs[2], "/health/liveliness")

        client = openai.OpenAI(base_url=proxy + "/v1", api_key=PROXY_KEY, max_retries=0, timeout=PATIENCE)

        def ask(i: int) -> str:
            r = client.chat.completions.create(model="gemma", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": f"Count to {i}."}])
            return r.choices[0].finish_reason

        with ThreadPoolExecutor(8) as pool:
            finished = list(pool.map(ask, range(40)))
        assert len(finished) == 40 and set(finished) <= {"stop", "length"}
        served = [_requests(url) for url in urls]
        print(f"requests per replica: {served}")
        assert sum(served) == 40 and min(served) > 0, served
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
