"""A real gemrun server on 127.0.0.1 in a background thread, for tests that talk to it through real clients."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from gemrun.server.app import create_app
from gemrun.server.lifecycle import listen, server_config
from gemrun.server.settings import Settings

# How long a test waits for the server before calling it broken. It only detects failures: on a busy machine a
# reply may take minutes, and no test asserts a speed (speed lives in benchmarks/).
PATIENCE = 1800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, loader, **settings):
        # the socket `gemrun serve` listens on, made the same way (`listen`)
        self.listener = listen("127.0.0.1", 0)
        self.port = self.listener.getsockname()[1]
        self.settings = Settings(port=self.port, **settings)
        self.app = create_app(loader, self.settings)
        self.server = uvicorn.Server(server_config(self.app, self.settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.listener]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.listener.close()

    def metric(self, name: str, labels: str = "") -> float:
        """A value from /metrics (`labels` as written there, e.g. 'reason="cancelled"')."""
        text = httpx.get(self.url + "/metrics", headers=self.auth, timeout=PATIENCE).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    @property
    def auth(self) -> dict:
        key = self.settings.api_key
        return {"authorization": f"Bearer {key}"} if key else {}
