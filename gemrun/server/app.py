"""The FastAPI application: operations (auth, body limit, errors, health, metrics, tokenize, logging) and the
OpenAI and Ollama routers. `create_app` takes a loader, so the port answers `/health` (503) while the model
loads; the model and its engine live in `app.state.service` once loaded."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..engine import Engine, Overloaded, Unavailable
from ..errors import GemrunError, InputError
from ..formats import validate_tools
from ..runtime import Runtime
from ..speculative import Speculator
from .ollama import router as ollama_router
from .openai import router as openai_router
from .protocol import DetokenizeRequest, TokenizeRequest
from .responses import router as responses_router
from .runner import NotFound, ServerError, Service, ready, version

log = logging.getLogger("gemrun.server")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # CORS is off unless origins are named
    max_body: int = 32 << 20  # bytes of a request body (images arrive base64 in JSON)
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 64  # requests waiting beyond the batch; past it, 429
    request_timeout: float = 600.0  # seconds a request may run
    max_tokens_default: int | None = None  # when a request sets none: the rest of the context
    shutdown_deadline: float = 10.0  # seconds in-flight requests get on shutdown
    cache_ram: float = 4.0  # GiB of finished sequences' KV caches kept for prefix reuse (0: none)
    served_name: str | None = None
    draft: object = None  # speculative decoding (Gemma 4): a drafter checkpoint path, or a speculative.Speculator
    draft_tokens: int = 4  # tokens drafted per round (with a path)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served besides loopback ones ("*": any)
    header_timeout: float = 20.0  # seconds a client has to send a request's line and headers
    body_timeout: float = 60.0  # seconds a client has to send a request's body


LOOPBACK_NAMES = ("localhost", "localhost.")
GENERATION_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/chat", "/api/generate"}


def is_loopback(host: str) -> bool:
    """Whether a host name or address (no port) names this machine's loopback interface."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1", "localhost:8000" -> "localhost")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.split(":", 1)[0] if header.count(":") == 1 else header  # a bare IPv6 address has several


def host_allowed(header: str, settings: Settings) -> bool:
    """DNS rebinding defence, as Ollama's: a server bound to loopback answers only requests addressed to a
    loopback name or address (or a name in --allowed-hosts); a web page that rebinds its own name to 127.0.0.1
    gets 403. A server bound elsewhere restricts Host only when --allowed-hosts names some."""
    allowed = [h.lower() for h in settings.allowed_hosts]
    name = host_name(header)
    if "*" in allowed or is_loopback(name) or name in allowed:
        return True
    return not allowed and not is_loopback(settings.host)


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(request: Request, status: int, message: str, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error object on /v1 and ops routes; Ollama's {"error": "..."} on /api."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return openai_error(status, message, kind, headers=headers)


STATUS_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "invalid_request_error",
                413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}


def status_of(e: Exception) -> int:
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, Overloaded):
        return 429
    if isinstance(e, Unavailable):
        return 503
    if isinstance(e, ServerError):
        return 500
    return 400


def _send_json(status: int, payload: dict, headers: dict | None = None):
    body = json.dumps(payload).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": head}, {"type": "http.response.body",
                                                                                  "body": body}


class Guard:
    """Pure ASGI middleware in front of everything: the Host header (403, `host_allowed`), the API key
    (constant-time compare, every route but /health), JSON content type on OpenAI bodies (415; Ollama's routes
    take JSON whatever the content type, as Ollama does), the body size limit (413; uvicorn has none), counted as
    the body streams in so a lying Content-Length cannot get past it, and a deadline for the body (408)."""

    def __init__(self, app, settings: Settings, metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        rid = uuid.uuid4().hex[:16]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self._guarded(scope, receive, logged_send)
        finally:
            self.metrics.http.labels(str(status[0])).inc()
            if scope["path"] in GENERATION_ROUTES and status[0] == 200:
                self.metrics.latency.observe(time.perf_counter() - t0)
            # json.dumps escapes control characters; headers (and so the API key) are never logged
            log.info(json.dumps({"event": "request", "id": rid, "method": scope["method"], "path": scope["path"],
                                 "status": status[0], "ms": round(1000 * (time.perf_counter() - t0), 1)}))

    async def _guarded(self, scope, receive, send):
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ollama = path.startswith("/api/")

        async def refuse(status: int, message: str, extra: dict | None = None):
            payload = ({"error": message} if ollama else
                       {"error": {"message": message, "type": STATUS_KINDS.get(status, "invalid_request_error"),
                                  "param": None, "code": None}})
            start, body = _send_json(status, payload, extra)
            await send(start)
            await send(body)

        if not host_allowed(headers.get("host", ""), self.settings):
            return await refuse(403, "this server answers requests to localhost only; start it with "
                                     "--allowed-hosts NAME to serve others")
        key = self.settings.api_key
        if key and path != "/health" and method != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await refuse(401, "missing or wrong API key (Authorization: Bearer ...)",
                                    {"www-authenticate": "Bearer"})
        if method in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json" and not ollama:
                return await refuse(415, f"content type must be application/json, got {ctype or 'none'!r}")
            if ctype != "application/json":  # Ollama's routes read the body as JSON whatever it is labelled
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")]}
            limit = self.settings.max_body
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                return await refuse(413, f"request body of {declared} bytes is over the {limit}-byte limit")
            chunks, seen = [], 0
            deadline = time.monotonic() + self.settings.body_timeout
            while True:  # the body is read here, within the limits, then handed on whole
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    return await refuse(408, f"the request body did not arrive within {self.settings.body_timeout:g} s")
                if message["type"] == "http.disconnect":
                    return
                seen += len(message.get("body", b""))
                if seen > limit:
                    return await refuse(413, f"request body is over the {limit}-byte limit")
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


class Metrics:
    """Prometheus metrics: HTTP counts by status and latency here; engine figures read at scrape time."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.http = Counter("gemrun_http_responses", "HTTP responses by status", ["status"], registry=self.registry)
        self.latency = Histogram("gemrun_request_seconds", "Time to the full response of generation requests",
                                 registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600))
        self.state = state
        self.registry.register(self)

    def collect(self):
        service = getattr(self.state, "service", None)
        engine = service.engine if service else None
        c = engine.counters if engine else None
        yield CounterMetricFamily("gemrun_requests", "Generation requests accepted", value=c.requests if c else 0)
        done = CounterMetricFamily("gemrun_requests_finished", "Requests finished, by reason", labels=["reason"])
        for reason, count in (c.finished.items() if c else ()):
            done.add_metric([reason], count)
        yield done
        yield CounterMetricFamily("gemrun_prompt_tokens", "Prompt tokens prefilled", value=c.prompt_tokens if c else 0)
        yield CounterMetricFamily("gemrun_generated_tokens", "Tokens generated",
                                  value=c.generated_tokens if c else 0)
        yield CounterMetricFamily("gemrun_draft_tokens", "Speculative decoding: tokens drafted",
                                  value=c.drafted_tokens if c else 0)
        yield CounterMetricFamily("gemrun_draft_accepted_tokens", "Speculative decoding: drafted tokens accepted",
                                  value=c.accepted_tokens if c else 0)
        rate = c.accepted_tokens / c.drafted_tokens if c and c.drafted_tokens else 0.0
        yield GaugeMetricFamily("gemrun_draft_acceptance_rate", "Accepted / drafted tokens since start", value=rate)
        yield GaugeMetricFamily("gemrun_requests_running", "Sequences in the batch",
                                value=engine.running if engine else 0)
        yield GaugeMetricFamily("gemrun_queue_depth", "Requests waiting for a batch slot",
                                value=engine.queue_depth if engine else 0)
        pool = engine.pool if engine else None
        yield CounterMetricFamily("gemrun_prefix_cache_hits", "Requests that reused cached KV of a prefix",
                                  value=pool.hits if pool else 0)
        yield CounterMetricFamily("gemrun_prefix_cache_misses", "Requests that found no reusable prefix",
                                  value=pool.misses if pool else 0)
        yield CounterMetricFamily("gemrun_prefix_cache_reused_tokens", "Prompt tokens not prefilled again",
                                  value=pool.reused_tokens if pool else 0)
        yield GaugeMetricFamily("gemrun_prefix_cache_bytes", "KV cache bytes kept for prefix reuse",
                                value=pool.nbytes if pool else 0)
        yield GaugeMetricFamily("gemrun_kv_cache_bytes", "KV cache bytes held by sequences in flight",
                                value=engine.cache_bytes if engine else 0)
        tps = c.generated_tokens / c.busy_seconds if c and c.busy_seconds else 0.0
        yield GaugeMetricFamily("gemrun_tokens_per_second", "Generated tokens per second of engine work", value=tps)
        yield from self.vllm_gauges(service)

    @staticmethod
    def vllm_gauges(service):
        """The gauges under vLLM's names, which routers and the Gateway API Inference Extension (llm-d) scrape to
        choose a replica. gemrun allocates KV per sequence, so the cache usage is the in-flight KV over the most
        the batch can hold: max_batch sequences at the full context."""
        engine, label = (service.engine, [service.name]) if service else (None, [""])
        usage = 0.0
        if engine is not None:
            model, context = service.runtime.model, service.runtime.max_context
            most = engine.max_batch * model.config.kv_cache_bytes(context, model.dtype.itemsize)
            usage = min(1.0, engine.cache_bytes / most) if most else 0.0
        for name, doc, value in (("vllm:num_requests_running", "Requests in the batch (vLLM's name)",
                                  engine.running if engine else 0),
                                 ("vllm:num_requests_waiting", "Requests waiting for a batch slot (vLLM's name)",
                                  engine.queue_depth if engine else 0),
                                 ("vllm:kv_cache_usage_perc", "KV cache in flight over the batch's full-context "
                                  "KV, 1 = 100% (vLLM's name)", usage)):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(label, value)
            yield gauge

    def describe(self):
        return []


def create_app(loader: Callable[[], Runtime], settings: Settings | None = None) -> FastAPI:
    """`loader()` returns a `runtime.Runtime` (e.g. a gemrun.api.Model); it runs in a thread at startup while
    /health answers 503."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.status = "loading"

        def load():
            try:
                runtime = loader()
                if isinstance(settings.draft, Speculator):
                    runtime.draft = settings.draft
                elif settings.draft is not None:
                    runtime.use_drafter(settings.draft, settings.draft_tokens)
                runtime.pool.max_bytes, runtime.pool.max_entries = int(settings.cache_ram * (1 << 30)), None
                engine = Engine(runtime, settings.max_batch, settings.max_queue).start()
                name = settings.served_name or model_name(runtime)
                app.state.service = Service(runtime, engine, name, settings.max_tokens_default,
                                            settings.request_timeout)
                app.state.status = "ok"
                log.info(json.dumps({"event": "loaded", "model": name}))
            except Exception as e:
                log.error(json.dumps({"event": "load_failed", "error": f"{type(e).__name__}: {e}"}))
                app.state.status = "dead"

        thread = threading.Thread(target=load, name="gemrun-load", daemon=True)
        thread.start()
        yield
        begin_shutdown(app)
        service = getattr(app.state, "service", None)
        if service is not None:
            await asyncio.to_thread(service.engine.stop, settings.shutdown_deadline)

    app = FastAPI(title="gemrun", version=version(), lifespan=lifespan)
    app.state.service = None
    app.state.status = "loading"
    app.state.settings = settings
    metrics = Metrics(app.state)
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(request, 400, "request body is not valid JSON")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(request, 400, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(GemrunError)
    async def gemrun_error(request: Request, exc: GemrunError):
        status = status_of(exc)
        headers = {"retry-after": "1"} if status in (429, 503) else None
        return error_response(request, status, str(exc), STATUS_KINDS.get(status, "invalid_request_error"), headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(request, 500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        status = app.state.status
        service = app.state.service
        if status == "ok" and (service is None or not service.engine.alive):
            status = "dead"
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        service = ready(app)
        if body.model is not None:
            service.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InputError("give exactly one of prompt or messages")
        if body.messages is not None:
            tools = validate_tools(body.tools) if body.tools else None
            think = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None
            ids = (await service.chat_prompt(body.messages, tools, think=think)).ids
        else:
            ids = (await service.text_prompt(body.prompt, bos=body.add_special_tokens)).ids
        payload = json.dumps({"tokens": ids, "count": len(ids), "max_model_len": service.runtime.max_context})
        return Response(payload, media_type="application/json")  # json's C encoder: a long list is no stall

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        service = ready(app)
        if body.model is not None:
            service.check_model(body.model)
        vocab = service.tokenizer.vocab_size
        if not all(0 <= t < vocab for t in body.tokens):
            raise InputError(f"token ids must be in 0..{vocab - 1}")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    for router in (openai_router, responses_router, ollama_router):
        app.include_router(router)
    if settings.cors_origins:  # never "*" together with credentials
        wildcard = "*" in settings.cors_origins
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=not wildcard,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["authorization", "content-type"])
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    return app


def model_name(runtime: Runtime) -> str:
    path = runtime.loaded.path
    return path.stem if path.suffix == ".gguf" else path.name


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
