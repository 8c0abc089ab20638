"""The gateway's coalesced dispatch against a controller that misbehaves (our controller never does: these
answers come from a stand-in transport). Every waiter gets an answer; none is left hanging."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest

from chatserve.gateway.upstream import ClientShards, Upstream
from chatserve.protocol.errors import ServiceUnavailableError

WORKER = {"worker_id": "w", "address": "http://127.0.0.1:9", "context_length": 2048}


def upstream_with(handler) -> Upstream:  # type: ignore[no-untyped-def]
    shards = ClientShards(n=1)
    shards.clients = [httpx.AsyncClient(transport=httpx.MockTransport(handler))]
    shards._turn = itertools.cycle(shards.clients)
    return Upstream(shards, "http://controller")


async def burst(upstream: Upstream, n: int) -> list:
    try:
        return await asyncio.gather(*(upstream.dispatch("m", None, []) for _ in range(n)), return_exceptions=True)
    finally:
        await upstream.clients.aclose()


@pytest.mark.parametrize("answer", [
    httpx.Response(200, text="not json"),
    httpx.Response(200, json={"results": "nope"}),
    httpx.Response(200, json={"results": [{"worker": WORKER}]}),  # one answer for a batch of several
])
def test_unreadable_answers_fail_each_waiter_with_503(answer):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(len(json.loads(request.content)["requests"]))
        return answer

    out = asyncio.run(burst(upstream_with(handler), 5))
    assert all(isinstance(e, ServiceUnavailableError) for e in out), out
    assert calls == [5]  # queued in one loop turn: one call


def test_sender_cancelled_mid_call_leaves_no_waiter_hanging():
    async def scenario() -> list:
        started = asyncio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            started.set()
            await asyncio.sleep(30)
            return httpx.Response(200, json={"results": []})

        up = upstream_with(slow)
        waiters = [asyncio.ensure_future(up.dispatch("m", None, [])) for _ in range(3)]
        await started.wait()
        assert up._dispatcher is not None
        up._dispatcher.cancel()
        try:
            return await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
        finally:
            await up.clients.aclose()

    out = asyncio.run(scenario())
    assert all(isinstance(e, ServiceUnavailableError) and "interrupted" in e.message for e in out), out


def test_waiters_that_leave_do_not_disturb_the_rest():
    async def scenario() -> list:
        def handler(request: httpx.Request) -> httpx.Response:
            reqs = json.loads(request.content)["requests"]
            return httpx.Response(200, json={"results": [{"worker": WORKER} for _ in reqs]})

        up = upstream_with(handler)
        waiters = [asyncio.ensure_future(up.dispatch("m", None, [])) for _ in range(4)]
        waiters[1].cancel()
        try:
            return await asyncio.gather(*waiters, return_exceptions=True)
        finally:
            await up.clients.aclose()

    out = asyncio.run(scenario())
    assert isinstance(out[1], asyncio.CancelledError)
    assert [w.worker_id for i, w in enumerate(out) if i != 1] == ["w", "w", "w"]
