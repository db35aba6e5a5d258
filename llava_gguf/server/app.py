"""The ASGI app (Starlette): routes, authentication, body limits, server-sent events. The logic is in
``service.py``, the wire format in ``protocol.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llava_gguf.server import protocol
from llava_gguf.server.metrics import exposition, registry_for
from llava_gguf.server.protocol import RequestError
from llava_gguf.server.service import ChatService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppOptions:
    api_key: str | None = None  # required as a Bearer token on every route but /health
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 << 20


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(service: ChatService, options: AppOptions = AppOptions()) -> Starlette:
    created = int(time.time())

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def body_json(request: Request) -> Any:
        return protocol.decode_json(await read_body(request, options.max_body_bytes))

    async def chat_completions(request: Request) -> Response:
        try:
            authorize(request)
            parsed = protocol.parse_request(await body_json(request))
            job = await anyio.to_thread.run_sync(service.parse, parsed)  # decodes images: off the event loop
            cid, name = protocol.completion_id(), service.options.name
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                admission = service.admitted()
                admission.__enter__()
                released = threading.Event()

                def release() -> None:  # once, however the stream ends (even if it never starts)
                    if not released.is_set():
                        released.set()
                        admission.__exit__(None, None, None)

                events = stream_events(job, cid, name, include_usage, release)
                weakref.finalize(events, release)
                return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(release),
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            with service.admitted():
                stop = threading.Event()
                watcher = asyncio.create_task(watch_disconnect(request, stop))
                try:
                    result = await anyio.to_thread.run_sync(service.run, job, lambda piece: None, stop)
                finally:
                    watcher.cancel()
            return JSONResponse(protocol.completion(cid, name, result.text, result.finish_reason, result.usage,
                                                    result.timings))
        except RequestError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001  one request's surprise must not stop the server
            log.exception("request failed")
            return error_response(RequestError(500, f"unexpected {type(e).__name__}: {e}", kind="server_error"))

    async def watch_disconnect(request: Request, stop: threading.Event) -> None:
        """Stop a non-streamed generation when its client goes away."""
        while not stop.is_set():
            if await request.is_disconnected():
                stop.set()
                return
            await asyncio.sleep(0.1)

    async def stream_events(job: Any, cid: str, name: str, include_usage: bool,
                            release: Callable[[], None]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                put("done", service.run(job, lambda piece: put("piece", piece), stop))
            except RequestError as e:
                put("error", e)
            except Exception as e:  # noqa: BLE001
                log.exception("generation failed")
                put("error", RequestError(500, f"unexpected {type(e).__name__}: {e}", kind="server_error"))

        worker = threading.Thread(target=work, name=f"generate-{cid}", daemon=True)
        worker.start()
        try:
            yield _event(protocol.chunk(cid, name, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield _event(protocol.chunk(cid, name, {"content": value}))
                elif kind == "error":
                    yield _event(value.body())
                    break
                else:
                    yield _event(protocol.chunk(cid, name, {}, value.finish_reason, timings_=value.timings))
                    if include_usage:
                        yield _event(protocol.chunk(cid, name, None, usage_=value.usage))
                    break
            yield "data: [DONE]\n\n"
        finally:
            stop.set()  # a client that went away stops the generation at the next token
            await anyio.to_thread.run_sync(worker.join)
            release()

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except RequestError as e:
            return error_response(e)
        return JSONResponse(protocol.models_list(service.options.name, created))

    registry = registry_for(service)

    async def metrics(request: Request) -> Response:
        try:
            authorize(request)
        except RequestError as e:
            return error_response(e)
        body, content_type = exposition(registry)
        return Response(body, media_type=content_type)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": service.options.name})

    async def page(request: Request) -> Response:
        html = resources.files("llava_gguf.server").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", service.options.name))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(404, f"no route {request.method} {request.url.path}"))

    middleware = []
    if options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={404: not_found, 405: not_found})


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to pass ``limit`` bytes: from Content-Length before reading any
    of it, else (chunked) at the chunk that passes it.

    A refused body is read on and dropped, up to another ``limit`` bytes, before the answer: uvicorn closes the
    connection right after it when the client sent ``Connection: close`` (urllib does), and a socket closed with
    unread data is reset, so a client still sending would get a reset in place of the 413. A client that waits for
    ``100 Continue`` has sent nothing and is answered at once; one that declares more than twice the limit too.
    """
    too_large = RequestError(413, f"request body over the server's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        if int(declared) <= 2 * limit and "100-continue" not in request.headers.get("expect", "").lower():
            await _drop(request.stream(), 2 * limit)
        raise too_large
    stream = request.stream()
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drop(stream, 2 * limit - size)
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _drop(stream: AsyncIterator[bytes], budget: int) -> None:
    """Read and discard the rest of a refused body, at most ``budget`` more bytes."""
    try:
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except ClientDisconnect:
        return


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
