"""The gateway's app: one router per endpoint family (chat, completions, embeddings, models and the
tokenizer routes, operators' routes), each in its own module with its serving logic; here the shared state
(upstream, key ring, metrics), auth's key file, the body-size limit, CORS and the error envelope.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers

from chatserve.gateway import chat, completions, embeddings, models, ops, responses
from chatserve.gateway.response_store import ResponseStore
from chatserve.gateway.limits import KeyPolicy, KeyRing, parse_key_file
from chatserve.gateway.metrics import GatewayMetrics
from chatserve.gateway.upstream import ClientShards, Upstream
from chatserve.http import error_response, guard_internal_plane, install_error_handlers, serve, setup_logging
from chatserve.protocol.errors import ErrorResponse, RequestTooLargeError
from chatserve.settings import GatewaySettings

log = logging.getLogger("chatserve.gateway")

KNOWN_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models", "/tokenize",
                "/detokenize", "/health", "/metrics", "/status"}


class BodyLimitAndCount:
    """Refuses a body over the limit and counts requests by route and status, as a plain ASGI middleware:
    Starlette's BaseHTTPMiddleware (what `@app.middleware` builds) passes every chunk of a streamed response
    through a memory stream and a task of its own. A body with a Content-Length is judged by it; one sent
    without (chunked) is counted as it arrives and refused the moment it passes the limit, nothing read
    past it (then handed on whole: every route reads its JSON body whole anyway)."""

    def __init__(self, app: Any, limit: int, metrics: GatewayMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = error_response(RequestTooLargeError(
                f"request body of {length} bytes exceeds the limit of {self.limit} bytes"))
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            await response(scope, receive, send)
            return

        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > self.limit:
                    response = error_response(RequestTooLargeError(
                        f"request body exceeds the limit of {self.limit} bytes"))
                    self.metrics.requests.labels(route, str(response.status_code)).inc()
                    await response(scope, receive, send)
                    return
                if not message.get("more_body"):
                    break
            receive = _replay(b"".join(chunks), receive)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that hands over a body already read, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def build_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = ClientShards()
        store = ResponseStore(settings.responses_db) if settings.responses_db else None
        try:
            upstream = Upstream(clients, settings.controller_url.rstrip("/"), settings.internal_secret,
                                settings.worker_cache_ttl, settings.worker_stall_timeout)
            app.state.upstream = upstream
            app.state.chat = chat.ChatService(upstream, settings.max_tokens_cap, metrics)
            app.state.completions = completions.CompletionService(upstream, settings.max_tokens_cap, metrics)
            app.state.responses = responses.ResponsesService(upstream, settings.max_tokens_cap, metrics, store=store)
            yield
        finally:
            await clients.aclose()
            if store is not None:
                store.close()

    metrics = GatewayMetrics()
    errors = {status: {"model": ErrorResponse, "description": "An error in the OpenAI envelope"}
              for status in (400, 401, 404, 413, 429, 500, 503)}
    app = FastAPI(title="chatserve API", version="0.1.0", lifespan=lifespan,
                  responses=errors)  # type: ignore[arg-type]
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    keys = {k: KeyPolicy() for k in settings.api_keys}
    if settings.api_keys_file:
        try:
            keys.update(parse_key_file(settings.api_keys_file))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"chatserve gateway: cannot use the API key file: {exc}") from None
    ring = KeyRing(keys, KeyPolicy(settings.rate_limit_rpm, settings.rate_limit_tpm))

    app.add_middleware(BodyLimitAndCount, limit=settings.max_body_bytes, metrics=metrics)

    app.state.settings, app.state.ring, app.state.metrics = settings, ring, metrics
    for module in (chat, completions, embeddings, models, ops, responses):
        app.include_router(module.router)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    settings = GatewaySettings.from_args(argv, prog="chatserve gateway")
    setup_logging(settings.log_level)
    guard_internal_plane(settings, "gateway")
    serve(build_app(settings), settings.host, settings.port, settings.log_level)
