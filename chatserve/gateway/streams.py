"""What chat and text completions share: pick a worker, open its stream, aggregate or relay it.

A request is retried on another worker if its worker fails before the first token (nothing was sent to
the client yet, so nothing is answered twice). After the first token a failure becomes an SSE error
event and the worker is reported to the controller. The stream's first event from the worker ("start")
is read before the client's response begins, so refusals (context too long, queue full) keep their
HTTP status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chatserve.gateway.metrics import GatewayMetrics
from chatserve.gateway.sse import sse_done, sse_error
from chatserve.gateway.upstream import Upstream, WorkerUnreachable
from chatserve.protocol.errors import BadRequestError, ChatServeError, InternalError, ServiceUnavailableError
from chatserve.protocol.internal import GenerateChunk, GenerateRequest, Message
from chatserve.protocol.openai import ResponseFormat, Usage
from chatserve.tools.grammar import check_schema

log = logging.getLogger("chatserve.gateway")

MAX_ATTEMPTS = 3
Charge = Callable[[int], None]
SYSTEM_FINGERPRINT = "fp_chatserve"


def conversation_key(model: str, messages: list[Message]) -> str | None:
    """Identity of a conversation for worker affinity: model + system prompt + first user message."""
    head = [m for m in messages if m.role == "system"] + [m for m in messages if m.role == "user"][:1]
    if not head:
        return None
    text = json.dumps([model, [(m.role, m.content) for m in head]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


Reopen = Callable[[list[str]], Awaitable[tuple[AsyncIterator[GenerateChunk], str]]]


@dataclass
class StartedStream:
    """A worker stream whose first ("start") event has arrived.

    Until the first token arrives the request can move: if its worker fails or falls silent (cut off)
    while the request still waits in its queue, `reopen` sends it to another worker, and the client,
    which has seen no text yet, gets the whole answer from there, once."""

    start: GenerateChunk
    chunks: AsyncIterator[GenerateChunk]
    worker_id: str
    upstream: Upstream
    model: str = ""
    metrics: GatewayMetrics | None = None
    started_at: float = field(default_factory=time.perf_counter)
    charge: Charge | None = None  # told the tokens used when the stream ends (rate limits)
    reopen: Reopen | None = None
    tried: list[str] = field(default_factory=list)
    completion_tokens: int = 0  # summed over the choices' final chunks as they arrive
    cached_tokens: int = 0

    def usage(self) -> Usage:
        return Usage.of(self.start.prompt_tokens, self.completion_tokens, self.cached_tokens)

    async def rest(self) -> AsyncIterator[GenerateChunk]:
        stamps: list[float] = []
        produced = False
        try:
            while True:
                try:
                    async for chunk in self.chunks:
                        if chunk.kind == "error":
                            raise InternalError((chunk.error or {}).get("message", "worker error"))
                        if chunk.text:
                            stamps.append(time.perf_counter())
                        if chunk.text or chunk.token_ids or chunk.finish_reason:
                            produced = True
                        if chunk.finish_reason:
                            self.completion_tokens += chunk.completion_tokens
                            self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)
                        yield chunk
                    break
                except WorkerUnreachable as exc:
                    await self.upstream.report_failure(self.worker_id)
                    if produced or self.reopen is None:
                        raise ServiceUnavailableError("the worker serving this request failed mid-stream") from None
                    log.warning("worker %s failed before the first token (%s): moving the request", self.worker_id,
                                exc)
                    await self.chunks.aclose()  # type: ignore[attr-defined]
                    self.tried.append(self.worker_id)
                    self.chunks, self.worker_id = await self.reopen(self.tried)
        finally:
            # a client that went away closes this generator: close the worker stream at once, so the
            # worker sees the disconnect and aborts the request in its engine
            await self.chunks.aclose()  # type: ignore[attr-defined]
            if self.charge is not None:
                self.charge(self.start.prompt_tokens + self.completion_tokens)
        if self.metrics is not None:
            self.metrics.observe_request(self.model, stamps[0] - self.started_at if stamps else None,
                                         [b - a for a, b in zip(stamps, stamps[1:])],
                                         time.perf_counter() - self.started_at, self.start.prompt_tokens,
                                         self.completion_tokens, self.cached_tokens)


async def _first_worker(upstream: Upstream, model: str, req: GenerateRequest, prefix_key: str | None,
                        tried: list[str]) -> tuple[GenerateChunk, AsyncIterator[GenerateChunk], str]:
    """Dispatch and open a worker stream up to its "start" event, skipping workers that fail first."""
    last: Exception | None = None
    for _ in range(MAX_ATTEMPTS):
        worker = await upstream.dispatch(model, prefix_key, tried)
        chunks = upstream.generate(worker, req)
        try:
            start = await chunks.__anext__()
        except WorkerUnreachable as exc:
            log.warning("worker %s failed before the first token (%s): retrying elsewhere", worker.worker_id, exc)
            tried.append(worker.worker_id)
            await upstream.report_failure(worker.worker_id)
            last = exc
            continue
        except StopAsyncIteration:
            tried.append(worker.worker_id)
            continue
        return start, chunks, worker.worker_id
    raise ServiceUnavailableError(f"no worker could serve model '{model}'") from last


async def open_stream(upstream: Upstream, model: str, req: GenerateRequest, prefix_key: str | None,
                      metrics: GatewayMetrics | None = None, charge: Charge | None = None) -> StartedStream:
    started_at = time.perf_counter()
    tried: list[str] = []
    start, chunks, worker_id = await _first_worker(upstream, model, req, prefix_key, tried)

    async def reopen(exclude: list[str]) -> tuple[AsyncIterator[GenerateChunk], str]:
        _, more, wid = await _first_worker(upstream, model, req, prefix_key, exclude)
        return more, wid

    return StartedStream(start, chunks, worker_id, upstream, model, metrics, started_at, charge, reopen, tried)


def check_response_format(fmt: ResponseFormat | None) -> None:
    """A json_schema response format must hold a schema the engine enforces in full (400 otherwise)."""
    if fmt is not None and fmt.type == "json_schema":
        check_schema(fmt.schema_or_none(), "response_format.json_schema.schema")


def resolve_max_tokens(requested: int | None, cap: int) -> tuple[int, bool]:
    if requested is None:
        return cap, True
    if requested > cap:
        raise BadRequestError(f"max_tokens must be at most {cap}", param="max_tokens")
    return requested, False


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None


async def collect(started: StartedStream, n: int) -> list[_Choice]:
    """Aggregate a worker stream of n choices (non-streaming responses); totals are on `started`."""
    choices = [_Choice() for _ in range(n)]
    async for chunk in started.rest():
        c = choices[chunk.index]
        c.text.append(chunk.text)
        if chunk.logprobs:
            c.logprobs.extend(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            c.prompt_logprobs = chunk.prompt_logprobs
        if chunk.finish_reason:
            c.finish = chunk.finish_reason
    return choices


async def relay(started: StartedStream, render: Callable[[GenerateChunk], str | None],
                render_usage: Callable[[Usage], str], include_usage: bool) -> AsyncIterator[str]:
    """Relay a worker stream as SSE events: deltas, an error event if the worker fails mid-stream, the
    usage event if asked for, then [DONE]."""
    try:
        async for chunk in started.rest():
            event = render(chunk)
            if event is not None:
                yield event
    except ChatServeError as exc:
        yield sse_error(exc)
        return
    if include_usage:
        yield render_usage(started.usage())
    yield sse_done()


class Service:
    """An endpoint family's serving logic: the upstream, the max_tokens cap, metrics."""

    def __init__(self, upstream: Upstream, max_tokens_cap: int, metrics: GatewayMetrics | None = None):
        self.upstream = upstream
        self.cap = max_tokens_cap
        self.metrics = metrics
