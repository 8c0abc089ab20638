"""The bridge between asyncio handlers and the engine loop, which runs in one thread of its own.

Handlers call `generate()` (an async iterator of `SeqOutput`); commands reach the engine thread through
a queue and outputs come back through each request's asyncio queue (`call_soon_threadsafe`). Leaving the
iterator early (client disconnect, cancellation) aborts the request in the engine, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from chatserve.protocol.sampling import SamplingParams
from worker.engine.engine import LLMEngine, SeqOutput

log = logging.getLogger("chatserve.worker.engine")
SLOW_STEP_S = 0.25  # steps slower than this are logged (a stall users feel as latency)


class EngineDeadError(RuntimeError):
    pass


KEEPALIVE = object()  # yielded by generate(keepalive=...) while a request has nothing new


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue_, item in items:
        queue_.put_nowait(item)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the caller went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def settle_soon(future: asyncio.Future[Any], result: Any) -> None:
    """From any thread: resolve future on its own loop with result (an exception: raised there)."""
    future.get_loop().call_soon_threadsafe(_settle, future, result)


def merge_outputs(items: list[Any]) -> list[Any]:
    """Coalesce consecutive deltas of the same choice (text, tokens and logprobs concatenated), so under
    load the HTTP path carries one chunk per choice per read instead of one per token. Order is kept."""
    out: list[Any] = []
    for item in items:
        prev = out[-1] if out else None
        if (isinstance(item, SeqOutput) and isinstance(prev, SeqOutput) and prev.index == item.index
                and not prev.finished):
            logprobs = None
            if prev.logprobs is not None or item.logprobs is not None:
                logprobs = (prev.logprobs or []) + (item.logprobs or [])
            out[-1] = replace(item, text=prev.text + item.text, token_ids=prev.token_ids + item.token_ids,
                              logprobs=logprobs)
        else:
            out.append(item)
    return out


class QueueSlot:
    """A place in the worker's queue (`EngineClient.pending`), taken when a handler admits a request and
    given back once (idempotent `release`) when its stream ends or is dropped unread."""

    __slots__ = ("client", "held")

    def __init__(self, client: EngineClient):
        self.client = client
        self.held = True
        client.pending += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.client.pending -= 1


class EngineClient:
    """The handler side, whichever way the engine runs: per-request output streams, the pending count, the
    last load report, and `dead` once the engine failed. Subclasses carry commands to the engine."""

    def __init__(self, load: dict[str, float | int]):
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self.load = load
        self.pending = 0  # requests accepted by handlers but not yet finished
        self.dead: str | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _command(self, cmd: str, arg: Any) -> None:
        """Hand one command (add, abort, embed) to the engine."""
        raise NotImplementedError

    # --- handler side -------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       n: int = 1, keepalive: float | None = None,
                       slot: QueueSlot | None = None) -> AsyncIterator[SeqOutput | object]:
        """Outputs of one request as they come. With `keepalive`, also `KEEPALIVE` whenever that many
        seconds passed without output (queued, or a long prefill), so a silent link can be told apart
        from a busy worker. `slot`: the queue place its handler took (else one is taken here); released
        when the request ends."""
        slot = slot or QueueSlot(self)
        if self.dead:
            slot.release()
            raise EngineDeadError(self.dead)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._streams[request_id] = stream
        self._command("add", (request_id, prompt_ids, params, n))
        finished = 0
        quiet = [True]  # nothing arrived since the last keepalive tick
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:  # one timer per stream, not one per token
            nonlocal timer
            if quiet[0] and stream.queue.empty():
                stream.queue.put_nowait(KEEPALIVE)
            quiet[0] = True
            timer = stream.loop.call_later(keepalive, tick)  # type: ignore[arg-type]

        if keepalive:
            timer = stream.loop.call_later(keepalive, tick)
        try:
            while finished < n:
                items = [await stream.queue.get()]
                while not stream.queue.empty():  # a slow reader gets what piled up as one delta per choice
                    items.append(stream.queue.get_nowait())
                real = [i for i in items if i is not KEEPALIVE]
                if not real:
                    yield KEEPALIVE
                    continue
                quiet[0] = False
                for item in merge_outputs(real):
                    if isinstance(item, BaseException):
                        raise item
                    if item.finished:
                        finished += 1
                    yield item
        finally:
            if timer is not None:
                timer.cancel()
            slot.release()
            with self._lock:
                self._streams.pop(request_id, None)
            if finished < n:
                self._command("abort", request_id)

    async def embed(self, inputs: list[list[int]]) -> list[Any]:
        """Embeddings of token-id inputs, computed by the engine between two steps."""
        if self.dead:
            raise EngineDeadError(self.dead)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._command("embed", (inputs, future))
        return await future

    # --- engine side ----------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _deliver_many(self, outputs: list[SeqOutput]) -> None:
        """One cross-thread wake-up per event loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], SeqOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, reason: str) -> None:
        """The engine is gone: every open stream ends with EngineDeadError."""
        self.dead = reason
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(rid, EngineDeadError(reason))


class AsyncEngine(EngineClient):
    """The engine loop on a thread of this process (CPU workers: the forward pass leaves the GIL anyway)."""

    def __init__(self, engine: LLMEngine):
        super().__init__(engine.load())
        self.engine = engine
        self._cmds: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _command(self, cmd: str, arg: Any) -> None:
        self._cmds.put((cmd, arg))
        self._wake.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                request_id, prompt_ids, params, n = arg
                try:
                    self.engine.add_request(request_id, prompt_ids, params, n)
                except ValueError as exc:
                    self._deliver(request_id, exc)
            elif cmd == "abort":
                self.engine.abort(arg)
            elif cmd == "embed":  # run a chunk at a time between steps (_embed_some), not all at once
                inputs, future = arg
                self.engine.add_embedding(future, inputs)

    def _embed_some(self) -> None:
        job = self.engine.embed_jobs[0]
        try:
            done = self.engine.embed_step()
        except Exception as exc:  # noqa: BLE001 - the caller gets it; the engine keeps serving
            log.exception("embedding failed")
            self._embedded(job.key, exc)
            return
        if done is not None:
            self._embedded(*done)

    def _embedded(self, future: Any, result: Any) -> None:
        settle_soon(future, result)

    def _report_load(self) -> None:
        self.load = self.engine.load()

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._report_load()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                t0 = time.perf_counter()
                outputs = self.engine.step()
                took = time.perf_counter() - t0
                if took > SLOW_STEP_S:
                    log.warning("slow engine step: %.0f ms (running %d, waiting %d, decode-only %s)", took * 1000,
                                len(self.engine.scheduler.running), len(self.engine.scheduler.waiting),
                                self.engine.last_step_decode_only)
            except Exception as exc:  # noqa: BLE001 - fail every stream, keep nothing half-done
                log.exception("engine step failed")
                with self._lock:
                    ids = list(self._streams)
                for rid in ids:
                    self.engine.abort(rid)
                self._fail_all(f"engine failure: {type(exc).__name__}")
                return
            self._after_step(outputs)
            if self.engine.embed_jobs:
                self._embed_some()

    def _after_step(self, outputs: list[SeqOutput]) -> None:
        self._deliver_many(outputs)
        self.load = self.engine.load()
