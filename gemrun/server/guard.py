"""The ASGI middleware in front of every route: Host and API-key checks, body limits and read deadlines, request
ids and logs, and errors in the shape each API expects (OpenAI's error object, Ollama's {"error": ...})."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from ..engine import Overloaded, Unavailable
from .runner import NotFound, ServerError
from .settings import Settings, host_allowed

log = logging.getLogger("gemrun.server")

GENERATION_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/chat", "/api/generate"}


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
