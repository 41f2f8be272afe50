"""The uvicorn side: header/body deadlines per connection, the server config, and a SIGTERM that drains in-flight
requests before exiting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import threading

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import GemrunError
from .settings import Settings

log = logging.getLogger("gemrun.server")


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's head: a client that connects and then trickles its
    request line and headers (slowloris) is disconnected after `header_timeout` seconds. (uvicorn times out only
    idle keep-alive connections, and any byte resets that.)"""

    header_timeout = 20.0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request head has arrived since
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a head arrived: the body has its own deadline (Guard)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app: FastAPI, settings: Settings, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's configuration for the app: the settings' address, the head deadline, graceful shutdown."""
    protocol = type("GemrunHTTP", (HeadDeadline,), {"header_timeout": settings.header_timeout})
    # uvicorn's own grace outlasts the engine's deadline, so replies end well-formed before it cancels anything
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
                          http=protocol, timeout_graceful_shutdown=int(math.ceil(settings.shutdown_deadline)) + 5)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads so that an address in use is a clean error
    (exit 2). Made as a TCP socket by name (IPPROTO_TCP, not 0): asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on sockets that say so, and with it on, a kept-alive connection's replies waited for the
    client's delayed ACK, ~40 ms a request (and streamed chunks stalled behind one another)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GemrunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def begin_shutdown(app: FastAPI) -> None:
    """SIGTERM / SIGINT: /health turns 503, the engine refuses new work and gives the requests in flight the
    shutdown deadline, then ends the rest with finish reason "shutdown" (a well-formed end for every client), in
    a thread of its own, while uvicorn waits for the connections to close. One log line says what happened."""
    if app.state.status == "shutting_down":
        return
    app.state.status = "shutting_down"
    service, deadline = app.state.service, app.state.settings.shutdown_deadline
    if service is None:
        return
    running = service.engine.running + service.engine.queue_depth
    log.warning(json.dumps({"event": "shutdown", "in_flight": running, "deadline_s": deadline}))

    def drain() -> None:
        service.engine.stop(deadline)
        cut = service.engine.counters.finished.get("shutdown", 0)
        log.warning(json.dumps({"event": "shutdown_done", "finished": running - cut, "cut_at_deadline": cut}))

    threading.Thread(target=drain, name="gemrun-shutdown", daemon=True).start()


class Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM / SIGINT start the engine's drain at once (`begin_shutdown`: uvicorn
    would otherwise wait for connections, then cancel them, before the app hears of it) and end the process with
    exit status 0 once the graceful shutdown is done (uvicorn re-raises the signal, so it would die of it)."""

    def handle_exit(self, sig, frame) -> None:
        app = getattr(self.config, "app", None)
        if isinstance(app, FastAPI):
            begin_shutdown(app)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
