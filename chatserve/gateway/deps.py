"""Route dependencies and helpers every endpoint family uses: API-key auth and per-key limits (state on
`app.state`, set by `build_app`), the stream-or-aggregate answer, unary worker calls with one retry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import StreamingResponse

from chatserve.gateway.streams import Charge
from chatserve.gateway.upstream import Upstream, WorkerUnreachable
from chatserve.protocol.errors import ServiceUnavailableError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# dependencies are coroutines: FastAPI runs a plain `def` one in a worker thread, two thread hops per
# request for what takes microseconds
async def auth(request: Request) -> str:
    """The caller's identity for limits: its API key, or its address when no keys are set."""
    ring = request.app.state.ring
    if ring.enabled:
        return ring.identify(request.headers.get("authorization", ""))
    return "client:" + (request.client.host if request.client else "?")


Admit = Callable[[int], Charge]


async def limited(request: Request, key: str = Depends(auth)) -> Admit:
    """How to admit a request under the caller's limits: called with the tokens to reserve (its
    max_tokens), it counts the request (429 when over a limit) and returns how to settle its tokens."""
    ring = request.app.state.ring
    return lambda reserve: ring.admit(key, reserve)


def reserve_of(body: Any, cap: int) -> int:
    """The completion tokens a generation request may use: what it asks for (or the cap), times n."""
    asked = body.requested_max_tokens() if hasattr(body, "requested_max_tokens") else body.max_tokens
    return min(asked or cap, cap) * body.n


def isolate_cache(request: Request, body: Any, caller: str) -> None:
    """--isolate-prefix-cache-per-key: the caller's identity salts its prompts' cache (with the request's
    own salt), so no key's requests reuse, or can time, another key's cached prompts."""
    if request.app.state.settings.isolate_prefix_cache_per_key:
        tenant = hashlib.sha256(caller.encode()).hexdigest()[:32]
        body.cache_salt = tenant + "/" + (body.cache_salt or "")


async def generation(request: Request, service: Any, body: Any, admit: Admit, caller: str) -> Any:
    """A chat or text completion: the caller's cache salt, its tokens reserved, then the answer."""
    isolate_cache(request, body, caller)
    return await respond(service, body, admit(reserve_of(body, request.app.state.settings.max_tokens_cap)))


async def respond(service: Any, body: Any, charge: Charge) -> Any:
    """A streaming request gets SSE (the worker stream is opened first, so refusals keep their status);
    the others get the aggregated response. A request refused before it ran gives its token reservation
    back (`charge(0)`; a stream that ran has settled it already)."""
    try:
        if body.stream:
            events = await service.stream(body, charge)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        return await service.complete(body, charge)
    except BaseException:
        charge(0)
        raise


def streaming(model: type) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a route answering JSON, or server-sent events when the request asks for a stream."""
    return {200: {"model": model, "content": {"text/event-stream": {}}}}


async def worker_call(request: Request, model: str, path: str, body: dict, timeout: float = 30.0) -> Any:
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
