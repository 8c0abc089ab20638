"""Gateway routes (thin): /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, /tokenize,
/detokenize, /health, /metrics. Auth (Bearer API keys, constant-time) and per-key limits, body-size limit,
CORS, and the error envelope.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers

from chatserve.gateway.limits import KeyPolicy, KeyRing, parse_key_file
from chatserve.gateway.metrics import GatewayMetrics
from chatserve.gateway.serving import ChatService, CompletionService
from chatserve.gateway.upstream import ClientShards, Upstream, WorkerUnreachable
from chatserve.http import error_response, install_error_handlers, serve, setup_logging
from chatserve.protocol.errors import (
    BadRequestError,
    ErrorResponse,
    NotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from chatserve.protocol.internal import DetokenizeRequest, EmbedResponse, TokenizeRequest
from chatserve.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
)
from chatserve.settings import GatewaySettings

log = logging.getLogger("chatserve.gateway")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_EMBEDDING_INPUTS = 2048

KNOWN_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize",
                "/detokenize", "/health", "/metrics", "/status"}


class BodyLimitAndCount:
    """Refuses a body over the limit (by its Content-Length) and counts requests by route and status, as a
    plain ASGI middleware: Starlette's BaseHTTPMiddleware (what `@app.middleware` builds) passes every chunk
    of a streamed response through a memory stream and a task of its own."""

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

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


async def respond(service: ChatService | CompletionService, body: Any, charge: Callable[[int], None]) -> Any:
    """A streaming request gets SSE (the worker stream is opened first, so refusals keep their status);
    the others get the aggregated response."""
    if body.stream:
        events = await service.stream(body, charge)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    return await service.complete(body, charge)


def encode_embedding(b64: str, dimensions: int | None, encoding_format: str) -> list[float] | str:
    """A worker's base64 float32 vector, shortened to `dimensions` (and normalised again) if asked."""
    if dimensions is None and encoding_format == "base64":
        return b64
    vec = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    if dimensions is not None:
        vec = vec[:dimensions]
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
    if encoding_format == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode()
    return vec.tolist()


def streaming(model: type) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a route answering JSON, or server-sent events when the request asks for a stream."""
    return {200: {"model": model, "content": {"text/event-stream": {}}}}


def build_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = ClientShards()
        try:
            upstream = Upstream(clients, settings.controller_url.rstrip("/"), settings.internal_secret,
                                settings.worker_cache_ttl, settings.worker_stall_timeout)
            app.state.upstream = upstream
            app.state.chat = ChatService(upstream, settings.max_tokens_cap, metrics)
            app.state.completions = CompletionService(upstream, settings.max_tokens_cap, metrics)
            yield
        finally:
            await clients.aclose()

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

    # dependencies are coroutines: FastAPI runs a plain `def` one in a worker thread, two thread hops per
    # request for what takes microseconds
    async def auth(request: Request) -> str:
        """The caller's identity for limits: its API key, or its address when no keys are set."""
        if ring.enabled:
            return ring.identify(request.headers.get("authorization", ""))
        return "client:" + (request.client.host if request.client else "?")

    async def limited(key: str = Depends(auth)) -> Callable[[int], None]:
        """Admit a generation request under the caller's limits; returns how to charge its tokens."""
        ring.admit(key)
        return lambda tokens: ring.charge(key, tokens)

    async def metrics_auth(request: Request) -> None:
        if not settings.metrics_open:
            await auth(request)

    @app.get("/metrics", dependencies=[Depends(metrics_auth)], response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        try:
            metrics.set_workers(await request.app.state.upstream.status())
        except ServiceUnavailableError:
            pass  # controller down: worker gauges stay empty, gateway counters still served
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health(request: Request) -> Any:
        try:
            models = await request.app.state.upstream.models()
        except ServiceUnavailableError:
            return JSONResponse({"status": "degraded", "controller": "unreachable"}, status_code=503)
        return {"status": "ok", "models": [m.name for m in models.models]}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models(request: Request) -> ModelList:
        models = await request.app.state.upstream.models()
        return ModelList(data=[ModelCard(id=m.name, max_model_len=m.context_length) for m in models.models])

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def get_model(model_id: str, request: Request) -> ModelCard:
        models = await request.app.state.upstream.models()
        for m in models.models:
            if m.name == model_id:
                return ModelCard(id=m.name, max_model_len=m.context_length)
        raise NotFoundError(f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", response_model=None, responses=streaming(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               charge: Callable[[int], None] = Depends(limited)) -> Any:
        return await respond(request.app.state.chat, body, charge)

    @app.post("/v1/completions", response_model=None, responses=streaming(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request,
                          charge: Callable[[int], None] = Depends(limited)) -> Any:
        return await respond(request.app.state.completions, body, charge)

    async def _worker_call(request: Request, model: str, path: str, body: dict, timeout: float = 30.0) -> Any:
        """A unary call to a worker of `model`, retried on another worker if the first is unreachable."""
        upstream: Upstream = request.app.state.upstream
        tried: list[str] = []
        for _ in range(2):
            worker = await upstream.dispatch(model, None, tried)
            try:
                return await upstream.worker_call(worker, path, body, timeout)
            except WorkerUnreachable:
                tried.append(worker.worker_id)
                await upstream.report_failure(worker.worker_id)
        raise ServiceUnavailableError(f"no reachable worker for model '{model}'")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request,
                         charge: Callable[[int], None] = Depends(limited)) -> EmbeddingResponse:
        inputs = body.inputs()
        if not inputs or any(len(x) == 0 for x in inputs):
            raise BadRequestError("input must be a non-empty string, or a non-empty list of non-empty strings "
                                  "or token-id lists", param="input")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise BadRequestError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
        reply = await _worker_call(request, body.model, "/embed", {"inputs": inputs}, timeout=600.0)
        out = EmbedResponse(**reply)
        if body.dimensions is not None and body.dimensions > out.dim:
            raise BadRequestError(f"dimensions must be at most {out.dim} for this model", param="dimensions")
        metrics.prompt_tokens.labels(body.model).inc(out.prompt_tokens)
        charge(out.prompt_tokens)
        data = [EmbeddingData(index=i, embedding=encode_embedding(e, body.dimensions, body.encoding_format))
                for i, e in enumerate(out.embeddings)]
        usage = EmbeddingUsage(prompt_tokens=out.prompt_tokens, total_tokens=out.prompt_tokens)
        return EmbeddingResponse(data=data, model=body.model, usage=usage)

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(body: TokenizeRequest, request: Request) -> Any:
        return await _worker_call(request, body.model, "/tokenize", body.model_dump(exclude_none=True))

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
        return await _worker_call(request, body.model, "/detokenize", body.model_dump())

    @app.get("/status", dependencies=[Depends(auth)])
    async def status(request: Request) -> Any:
        return await request.app.state.upstream.status()

    return app


def main(argv: Sequence[str] | None = None) -> None:
    settings = GatewaySettings.from_args(argv, prog="chatserve gateway")
    setup_logging(settings.log_level)
    serve(build_app(settings), settings.host, settings.port, settings.log_level)
