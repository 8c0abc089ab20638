"""Dispatches that reach the gateway together are decided by the controller in one call: each as /dispatch
would decide it alone (load counted before the next), refusals per item with their status and envelope."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from chatserve.gateway.upstream import ClientShards, Upstream
from chatserve.protocol.errors import NotFoundError, ServiceUnavailableError
from tests import procs

pytestmark = pytest.mark.integration


def worker_reg(wid: str, model: str = "m") -> dict:
    return {"worker_id": wid, "address": f"http://127.0.0.1:9/{wid}", "models": [model], "context_length": 2048}


@pytest.fixture()
def controller(request) -> Iterator[procs.Service]:
    c = procs.controller().start()
    request.node.services = [c]
    c.wait()
    for wid in ("a", "b"):
        assert httpx.post(c.url + "/register", json=worker_reg(wid)).status_code == 200
    yield c
    c.stop()


def test_batch_decides_in_order_with_per_item_refusals(controller):
    r = httpx.post(controller.url + "/dispatch_batch", json={"requests": [
        {"model": "m"}, {"model": "m"}, {"model": "nope"}, {"model": "m", "exclude": ["a", "b"]}, {"model": "m"}]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 5
    first, second = results[0]["worker"]["worker_id"], results[1]["worker"]["worker_id"]
    assert {first, second} == {"a", "b"}  # the first dispatch's load counted before the second
    assert results[2]["worker"] is None and results[2]["status"] == 404
    assert results[2]["error"]["code"] == "model_not_found" and results[2]["error"]["type"] == "NotFoundError"
    assert results[3]["status"] == 503 and "no healthy worker" in results[3]["error"]["message"]
    assert results[4]["worker"]["worker_id"] in ("a", "b")


def test_bad_batches_get_the_envelope(controller):
    for body in ({}, {"requests": "m"}, {"requests": [{"prefix_key": "x"}]}):
        r = httpx.post(controller.url + "/dispatch_batch", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = httpx.post(controller.url + "/dispatch_batch", json={"requests": []})
    assert r.status_code == 200 and r.json() == {"results": []}


def test_gateway_burst_shares_controller_calls_and_keeps_balance(controller):
    async def burst() -> tuple[list, int]:
        clients = ClientShards()
        upstream = Upstream(clients, controller.url)
        calls = 0
        real = upstream._controller

        async def counted(method, path, **kw):
            nonlocal calls
            calls += 1
            return await real(method, path, **kw)

        upstream._controller = counted  # type: ignore[method-assign]
        try:
            jobs = [upstream.dispatch("m", None, []) for _ in range(64)]
            jobs += [upstream.dispatch("nope", None, []), upstream.dispatch("m", None, ["a", "b"])]
            out = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            await clients.aclose()
        return out, calls

    out, calls = asyncio.run(burst())
    chosen = [w.worker_id for w in out[:64]]
    assert chosen.count("a") == chosen.count("b") == 32  # least loaded, every dispatch counted
    assert isinstance(out[64], NotFoundError) and out[64].code == "model_not_found"
    assert isinstance(out[65], ServiceUnavailableError) and "no healthy worker" in out[65].message
    assert calls <= 3  # 66 dispatches: the first alone, the rest together (not 66 round trips)


def test_gateway_without_controller_fails_every_waiter_cleanly():
    async def burst() -> list:
        clients = ClientShards()
        upstream = Upstream(clients, f"http://127.0.0.1:{procs.free_port()}")
        try:
            return await asyncio.gather(*(upstream.dispatch("m", None, []) for _ in range(8)),
                                        return_exceptions=True)
        finally:
            await clients.aclose()

    out = asyncio.run(burst())
    assert all(isinstance(e, ServiceUnavailableError) and "controller is unreachable" in e.message for e in out)
    assert len({id(e) for e in out}) == 8  # each waiter its own exception
