"""The gateway's view of the internal plane: which worker (controller), and the worker's stream.

Worker addresses seen in dispatches are cached for a short time, so the gateway keeps serving while the
controller restarts. Dispatches that arrive together go to the controller in one call (`/dispatch_batch`).

Connections: httpx's pool scans every connection it holds (and, for each idle one, every connection again)
each time a request starts or ends. One client holding a connection per concurrent stream makes a burst
of U new requests cost O(U^3): 64 chats starting at once spent ~1.4 s there before their first token on
an H100 host. So the calls (the controller's dispatches and the workers' streams) spread round-robin over
`SHARDS` small clients.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from chatserve.http import secret_headers
from chatserve.protocol.errors import (
    ChatServeError,
    NotFoundError,
    ServiceUnavailableError,
    error_from_envelope,
)
from chatserve.protocol.internal import (
    DispatchBatch,
    DispatchBatchResponse,
    DispatchRequest,
    DispatchResponse,
    GenerateChunk,
    GenerateRequest,
    ModelsResponse,
)

log = logging.getLogger("chatserve.gateway")


class WorkerUnreachable(Exception):
    """The worker could not be reached or broke its stream (it may be dead)."""


SHARDS = 16


class ClientShards:
    """`n` httpx clients sharing one TLS context; `next()` hands them out in turn."""

    def __init__(self, n: int = SHARDS, max_connections: int = 1000, max_keepalive: int = 256):
        ctx = ssl.create_default_context()  # built once: ~10 ms each, and the same for every shard
        per = httpx.Limits(max_connections=max(1, max_connections // n),
                           max_keepalive_connections=max(1, max_keepalive // n))
        self.clients = [httpx.AsyncClient(limits=per, verify=ctx) for _ in range(n)]
        self._turn = itertools.cycle(self.clients)

    def next(self) -> httpx.AsyncClient:
        return next(self._turn)

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


@dataclass
class Upstream:
    clients: ClientShards
    controller_url: str
    secret: str = ""
    cache_ttl: float = 10.0
    stall_timeout: float = 10.0  # a worker silent this long (no tokens, no keepalives) is taken as cut off
    _cache: dict[str, tuple[float, list[DispatchResponse]]] = field(default_factory=dict)
    _dispatch_queue: list[tuple[DispatchRequest, asyncio.Future[DispatchResponse]]] = field(default_factory=list)
    _dispatcher: asyncio.Task[None] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return secret_headers(self.secret)

    async def _controller(self, method: str, path: str, **kw: object) -> httpx.Response:
        try:
            resp = await self.clients.next().request(method, self.controller_url + path, headers=self.headers,
                                                     timeout=5.0, **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError("the controller is unreachable") from exc
        if resp.status_code >= 400:
            raise _upstream_error(resp)
        return resp

    async def models(self) -> ModelsResponse:
        return ModelsResponse(**(await self._controller("GET", "/models")).json())

    async def status(self) -> dict:
        return (await self._controller("GET", "/status")).json()

    async def dispatch(self, model: str, prefix_key: str | None, exclude: list[str]) -> DispatchResponse:
        req = DispatchRequest(model=model, prefix_key=prefix_key, exclude=exclude)
        try:
            choice = await self._dispatch_coalesced(req)
        except ServiceUnavailableError as exc:
            cached = [w for w in self._cached(model) if w.worker_id not in exclude]
            if cached and "controller" in exc.message:
                log.warning("controller unreachable: using cached worker %s for %s", cached[0].worker_id, model)
                return cached[0]
            raise
        now = time.monotonic()
        _, known = self._cache.get(model, (now, []))
        self._cache[model] = (now, [choice, *[w for w in known if w.worker_id != choice.worker_id]][:8])
        return choice

    async def _dispatch_coalesced(self, req: DispatchRequest) -> DispatchResponse:
        """The controller decides every dispatch, but not in one call each: a request goes out at once if no
        dispatch call is in flight, and those arriving meanwhile go together in the next call. A burst of U
        chats then costs a few controller round trips, not U (each ~0.5 ms of this event loop: ~28% of the
        gateway's time per streamed request in a 64-chat burst, py-spy on the 2-core CI machine)."""
        future: asyncio.Future[DispatchResponse] = asyncio.get_running_loop().create_future()
        self._dispatch_queue.append((req, future))
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._send_dispatches())
        return await future

    async def _send_dispatches(self) -> None:
        batch: list[tuple[DispatchRequest, asyncio.Future[DispatchResponse]]] = []
        try:
            while self._dispatch_queue:
                batch, self._dispatch_queue = self._dispatch_queue, []
                try:
                    outcomes = await self._dispatch_batch([r for r, _ in batch])
                except ChatServeError as exc:  # each waiter its own exception object (tracebacks stay apart)
                    outcomes = [error_from_envelope(exc.status_code, exc.to_dict()) for _ in batch]
                for (_, future), outcome in zip(batch, outcomes):
                    if future.done():  # its request was cancelled (client gone) meanwhile
                        continue
                    if isinstance(outcome, DispatchResponse):
                        future.set_result(outcome)
                    else:
                        future.set_exception(outcome)
                batch = []
        finally:
            self._dispatcher = None
            for _, future in batch:  # cancelled mid-call (shutdown): no waiter is left hanging
                if not future.done():
                    future.set_exception(ServiceUnavailableError("the dispatch was interrupted"))

    async def _dispatch_batch(self, reqs: list[DispatchRequest]) -> list[DispatchResponse | ChatServeError]:
        resp = await self._controller("POST", "/dispatch_batch", json=DispatchBatch(requests=reqs).model_dump())
        try:
            results = DispatchBatchResponse(**resp.json()).results
        except ValueError:  # not JSON, or not the batch's shape
            raise ServiceUnavailableError("the controller's dispatch answer is unreadable") from None
        if len(results) != len(reqs):
            raise ServiceUnavailableError("the controller answered a dispatch batch out of step")
        return [r.worker if r.worker is not None else error_from_envelope(r.status, {"error": r.error})
                for r in results]

    def _cached(self, model: str) -> list[DispatchResponse]:
        entry = self._cache.get(model)
        if entry is None or time.monotonic() - entry[0] > self.cache_ttl:
            return []
        return entry[1]

    def forget(self, worker_id: str) -> None:
        for model, (t, workers) in list(self._cache.items()):
            self._cache[model] = (t, [w for w in workers if w.worker_id != worker_id])

    async def report_failure(self, worker_id: str) -> None:
        self.forget(worker_id)
        try:
            await self._controller("POST", "/report_failure", json={"worker_id": worker_id})
        except ChatServeError:
            pass

    async def worker_call(self, worker: DispatchResponse, path: str, body: dict, timeout: float = 30.0) -> dict:
        try:
            resp = await self.clients.next().post(worker.address + path, json=body, headers=self.headers,
                                                  timeout=timeout)
        except httpx.HTTPError as exc:
            raise WorkerUnreachable(str(exc)) from exc
        if resp.status_code >= 400:
            raise _upstream_error(resp)
        return resp.json()

    async def generate(self, worker: DispatchResponse, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Open the worker's stream. Errors before the stream starts raise ChatServeError (a refusal, with
        the worker's status) or WorkerUnreachable; a stream cut later raises WorkerUnreachable."""
        try:
            async with self.clients.next().stream("POST", worker.address + "/generate", json=req.model_dump(),
                                                  headers=self.headers,
                                                  timeout=httpx.Timeout(10.0, read=self.stall_timeout)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    if resp.status_code == 503:
                        raise WorkerUnreachable(f"worker answered 503: {resp.text[:200]}")
                    raise _upstream_error(resp)
                async for line in ndjson_lines(resp):
                    data = json.loads(line)
                    if data.get("kind") == "ping":
                        continue
                    # trusted internal peer: validate only the rare chunks with nested logprobs. token_ids given
                    # (a start event has none): model_construct's default_factory path calls inspect.signature
                    data.setdefault("token_ids", [])
                    yield GenerateChunk(**data) if data.get("logprobs") or "prompt_logprobs" in data else GenerateChunk.model_construct(**data)
        except httpx.HTTPError as exc:
            raise WorkerUnreachable(f"{type(exc).__name__}: {exc}") from exc


async def ndjson_lines(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The non-empty lines of an NDJSON body, split on b"\\n" only. (`aiter_lines` also splits on U+0085,
    U+2028 and other Unicode line breaks, which JSON strings may hold unescaped: echoed prompt text does.)"""
    buf = b""
    async for data in resp.aiter_bytes():
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line:
                yield line
    if buf.strip():
        yield buf


def _upstream_error(resp: httpx.Response) -> ChatServeError:
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = error_from_envelope(resp.status_code, body)
    if resp.status_code == 404 and not isinstance(err, NotFoundError):
        return NotFoundError(err.message)
    return err
