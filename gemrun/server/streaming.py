"""Streamed responses: Server-Sent Events (OpenAI) and NDJSON (Ollama). Once the status line is sent, an error
can only travel inside the stream, so each helper ends a stream the same way whatever happens: the error as the
stream's own last event, the engine's requests released, and the terminator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from ..errors import GemrunError


def sse(payload: dict | str, event: str | None = None) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def public_message(e: Exception) -> str:
    """What a client may read of an error: our own messages, never an internal exception's."""
    return str(e) if isinstance(e, GemrunError) else "internal error"


def openai_error_event(e: Exception) -> str:
    return sse({"error": {"message": public_message(e), "type": "server_error", "param": None, "code": None}})


def event_stream(lines: AsyncIterator[str], close: Callable[[], Awaitable], error: Callable[[Exception], str],
                 done: str = "") -> StreamingResponse:
    """An SSE response of the already-formatted `lines`; an exception becomes `error(e)`, `close()` always runs,
    and `done` (OpenAI's `data: [DONE]`) ends the stream."""

    async def gen():
        try:
            async for line in lines:
                yield line
        except Exception as e:  # headers are sent: the error travels as an event
            yield error(e)
        finally:
            await close()
        if done:
            yield done

    return StreamingResponse(gen(), media_type="text/event-stream")


def ndjson_stream(lines: AsyncIterator[dict], close: Callable[[], Awaitable]) -> StreamingResponse:
    """An NDJSON response (one JSON object a line); an exception becomes a last `{"error": ...}` line."""

    async def gen():
        try:
            async for line in lines:
                yield json.dumps(line, ensure_ascii=False) + "\n"
        except Exception as e:
            yield json.dumps({"error": public_message(e)}) + "\n"
        finally:
            await close()

    return StreamingResponse(gen(), media_type="application/x-ndjson")
