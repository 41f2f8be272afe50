"""The FastAPI application: operations (auth, body limit, errors, health, metrics, tokenize, logging) and the
OpenAI and Ollama routers. `create_app` takes a loader, so the port answers `/health` (503) while the model
loads; the model and its engine live in `app.state.service` once loaded."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from starlette.middleware.cors import CORSMiddleware

from ..engine import Engine
from ..errors import GemrunError, InputError
from ..formats import validate_tools
from ..runtime import Runtime
from ..speculative import Speculator
from .guard import STATUS_KINDS, Guard, error_response, status_of
from .lifecycle import begin_shutdown
from .metrics import Metrics
from .ollama import router as ollama_router
from .openai import router as openai_router
from .protocol import DetokenizeRequest, TokenizeRequest
from .responses import router as responses_router
from .runner import Service, ready, version
from .settings import Settings

log = logging.getLogger("gemrun.server")


def create_app(loader: Callable[[], Runtime], settings: Settings | None = None) -> FastAPI:
    """`loader()` returns a `runtime.Runtime` (e.g. a gemrun.api.Model); it runs in a thread at startup while
    /health answers 503."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.status = "loading"

        def load():
            nonlocal loader
            try:
                runtime, loader = loader(), None  # used once: the app keeps no path to the weights but its service
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
        # A stopped app lets its weights go (FastAPI keeps its routes' functions, and so this app, in a cache)
        app.state.service = None

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
