"""Serving logic for /v1/chat/completions and /v1/completions: pick a worker, stream, aggregate.

A request is retried on another worker if its worker fails before the first token (nothing was sent to
the client yet, so nothing is answered twice). After the first token a failure becomes an SSE error
event and the worker is reported to the controller. The stream's first event from the worker ("start")
is read before the client's response begins, so refusals (context too long, queue full) keep their
HTTP status.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chatserve.gateway.metrics import GatewayMetrics
from chatserve.gateway.sse import sse_data, sse_done, sse_error, sse_json
from chatserve.gateway.upstream import Upstream, WorkerUnreachable
from chatserve.protocol.errors import BadRequestError, ChatServeError, InternalError, ServiceUnavailableError
from chatserve.protocol.internal import GenerateChunk, GenerateRequest, Message
from chatserve.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
    now,
)

log = logging.getLogger("chatserve.gateway")

MAX_ATTEMPTS = 3
Charge = Callable[[int], None] | None
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
    charge: Charge = None  # told the tokens used when the stream ends (rate limits)
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
                      metrics: GatewayMetrics | None = None, charge: Charge = None) -> StartedStream:
    started_at = time.perf_counter()
    tried: list[str] = []
    start, chunks, worker_id = await _first_worker(upstream, model, req, prefix_key, tried)

    async def reopen(exclude: list[str]) -> tuple[AsyncIterator[GenerateChunk], str]:
        _, more, wid = await _first_worker(upstream, model, req, prefix_key, exclude)
        return more, wid

    return StartedStream(start, chunks, worker_id, upstream, model, metrics, started_at, charge, reopen, tried)


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


async def collect(started: StartedStream, n: int) -> list[_Choice]:
    """Aggregate a worker stream of n choices (non-streaming responses); totals are on `started`."""
    choices = [_Choice() for _ in range(n)]
    async for chunk in started.rest():
        c = choices[chunk.index]
        c.text.append(chunk.text)
        if chunk.logprobs:
            c.logprobs.extend(chunk.logprobs)
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


def _chat_logprobs(chunk: GenerateChunk) -> ChoiceLogprobs | None:
    if chunk.logprobs is None:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                     top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top])
        for lp in chunk.logprobs])


class _Service:
    def __init__(self, upstream: Upstream, max_tokens_cap: int, metrics: GatewayMetrics | None = None):
        self.upstream = upstream
        self.cap = max_tokens_cap
        self.metrics = metrics


class ChatService(_Service):
    def to_generate(self, body: ChatCompletionRequest) -> tuple[GenerateRequest, str | None]:
        messages = [Message(**m.plain()) for m in body.messages]
        max_tokens, unset = resolve_max_tokens(body.requested_max_tokens(), self.cap)
        params = body.to_sampling_params(max_tokens, body.requested_logprobs())
        if body.response_format is not None:
            params.response_format = body.response_format.type
        req = GenerateRequest(request_id=new_id("chatcmpl"), messages=messages, chat_template=body.chat_template,
                              params=params, n=body.n, max_tokens_unset=unset)
        return req, conversation_key(body.model, messages)

    async def complete(self, body: ChatCompletionRequest, charge: Charge = None) -> ChatCompletionResponse:
        req, key = self.to_generate(body)
        started = await open_stream(self.upstream, body.model, req, key, self.metrics, charge)
        choices = await collect(started, body.n)
        out = []
        for i, c in enumerate(choices):
            lp = None
            if body.logprobs:
                lp = _chat_logprobs(GenerateChunk(kind="delta", logprobs=c.logprobs))
            out.append(ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)),
                                  finish_reason=c.finish or "stop", logprobs=lp))  # type: ignore[arg-type]
        usage = started.usage()
        return ChatCompletionResponse(id=req.request_id, created=now(), model=body.model,
                                      system_fingerprint=SYSTEM_FINGERPRINT, choices=out, usage=usage)

    async def stream(self, body: ChatCompletionRequest, charge: Charge = None) -> AsyncIterator[str]:
        """Opens the worker stream first (errors raise before any byte is sent), then yields SSE events."""
        req, key = self.to_generate(body)
        started = await open_stream(self.upstream, body.model, req, key, self.metrics, charge)
        return self._events(body, req.request_id, started)

    async def _events(self, body: ChatCompletionRequest, rid: str, started: StartedStream) -> AsyncIterator[str]:
        created = now()

        def chunk_of(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse_data(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices,
                                                system_fingerprint=SYSTEM_FINGERPRINT, usage=usage))

        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

        def delta(chunk: GenerateChunk) -> str | None:
            if not (chunk.text or chunk.finish_reason or chunk.logprobs):
                return None
            if chunk.logprobs:
                return chunk_of([ChatChunkChoice(index=chunk.index, delta=DeltaMessage(content=chunk.text or None),
                                                 finish_reason=chunk.finish_reason, logprobs=_chat_logprobs(chunk))])
            # hot path: the same wire format as ChatCompletionChunk, built without pydantic
            choice: dict = {"index": chunk.index, "delta": {"content": chunk.text} if chunk.text else {}}
            if chunk.finish_reason:
                choice["finish_reason"] = chunk.finish_reason
            return sse_json({**head, "choices": [choice]})

        for i in range(body.n):
            yield chunk_of([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for event in relay(started, delta, lambda u: chunk_of([], u), body.include_usage()):
            yield event


class CompletionService(_Service):
    def to_generate(self, body: CompletionRequest, prompt: str | list[int]) -> GenerateRequest:
        # OpenAI's legacy default for completions is 16 tokens
        requested = body.max_tokens if body.max_tokens is not None else min(16, self.cap)
        max_tokens, _ = resolve_max_tokens(requested, self.cap)
        return GenerateRequest(
            request_id=new_id("cmpl"), prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=prompt if isinstance(prompt, list) else None, echo=body.echo,
            params=body.to_sampling_params(max_tokens, body.logprobs), n=body.n)

    def _prompts(self, body: CompletionRequest) -> list[str | list[int]]:
        prompts = body.prompts()
        if not prompts:
            raise BadRequestError("prompt must not be empty", param="prompt")
        if len(prompts) * body.n > 64:
            raise BadRequestError("at most 64 prompts x n per request", param="prompt")
        return prompts

    async def complete(self, body: CompletionRequest, charge: Charge = None) -> CompletionResponse:
        prompts = self._prompts(body)

        async def one(prompt: str | list[int]) -> tuple[StartedStream, list[_Choice]]:
            started = await open_stream(self.upstream, body.model, self.to_generate(body, prompt), None,
                                        self.metrics, charge)
            return started, await collect(started, body.n)

        rid, choices, usage = new_id("cmpl"), [], Usage()
        # all prompts are in the engine's batch at once; the first failure cancels the others
        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        for p_index, (started, parts) in enumerate(results):
            echo = (started.start.prompt_text or "") if body.echo else ""
            for i, c in enumerate(parts):
                choices.append(CompletionChoice(index=p_index * body.n + i, text=echo + "".join(c.text),
                                                finish_reason=c.finish or "stop",  # type: ignore[arg-type]
                                                logprobs=_completion_logprobs(c.logprobs) if body.logprobs is not None else None))
            u = started.usage()
            usage = Usage.of(usage.prompt_tokens + u.prompt_tokens, usage.completion_tokens + u.completion_tokens,
                             usage.prompt_tokens_details.cached_tokens + u.prompt_tokens_details.cached_tokens)
        return CompletionResponse(id=rid, created=now(), model=body.model, system_fingerprint=SYSTEM_FINGERPRINT,
                                  choices=choices, usage=usage)

    async def stream(self, body: CompletionRequest, charge: Charge = None) -> AsyncIterator[str]:
        prompts = self._prompts(body)
        if len(prompts) != 1:
            raise BadRequestError("streaming supports one prompt per request", param="prompt")
        req = self.to_generate(body, prompts[0])
        started = await open_stream(self.upstream, body.model, req, None, self.metrics, charge)
        return self._events(body, req.request_id, started)

    async def _events(self, body: CompletionRequest, rid: str, started: StartedStream) -> AsyncIterator[str]:
        created = now()

        def chunk_of(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse_data(CompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                               system_fingerprint=SYSTEM_FINGERPRINT, usage=usage))

        if body.echo and started.start.prompt_text:
            for i in range(body.n):
                yield chunk_of([CompletionChoice(index=i, text=started.start.prompt_text)])
        def delta(chunk: GenerateChunk) -> str | None:
            if not (chunk.text or chunk.finish_reason):
                return None
            lp = _completion_logprobs(chunk.logprobs or []) if body.logprobs is not None else None
            return chunk_of([CompletionChoice(index=chunk.index, text=chunk.text, finish_reason=chunk.finish_reason,
                                              logprobs=lp)])

        async for event in relay(started, delta, lambda u: chunk_of([], u), body.include_usage()):
            yield event


def _completion_logprobs(items: list[Any]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t: v for t, v in lp.top} if lp.top else None)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out

