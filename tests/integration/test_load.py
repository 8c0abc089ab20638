"""Load: 200 concurrent streaming requests against one worker whose queue holds 60. Every request either
completes its stream (ending in [DONE]) or is refused with 429 and Retry-After; nothing else happens, and
the worker's and the gateway's memory stay bounded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import procs

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CONCURRENCY = 200


@pytest.fixture(scope="module")
def small_queue_stack(request) -> Iterator[dict[str, procs.Service]]:
    yield from procs.own_stack(request, "--max-queue-length", "60")


def rss_mib(service: procs.Service) -> float:
    assert service.proc is not None
    for line in Path(f"/proc/{service.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, dict]:
    body = {"model": MODEL, "stream": True, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": f"Say a number. Request {i}."}]}
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, {"body": resp.json(), "retry_after": resp.headers.get("retry-after")}
        events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
    finishes = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1]]
    return 200, {"done": events[-1] == "[DONE]", "finishes": [f for f in finishes if f],
                 "errors": [e for e in events if '"error"' in e]}


def test_200_concurrent_streams_complete_or_get_429(small_queue_stack):
    w, g = small_queue_stack["worker"], small_queue_stack["gateway"]
    before = {"worker": rss_mib(w), "gateway": rss_mib(g)}

    async def main() -> list[tuple[int, dict]]:
        limits = httpx.Limits(max_connections=CONCURRENCY + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
            return await asyncio.gather(*(one_stream(client, g.url + "/v1/chat/completions", i)
                                          for i in range(CONCURRENCY)))

    results = asyncio.run(main())
    ok = [r for status, r in results if status == 200]
    limited = [r for status, r in results if status == 429]
    print(f"{len(ok)} completed, {len(limited)} refused with 429")
    assert len(ok) + len(limited) == CONCURRENCY, sorted({status for status, _ in results})
    assert len(ok) >= 60 and limited  # the queue held 60 at a time; the burst overflowed it
    for r in ok:
        assert r["done"] and r["finishes"] in (["stop"], ["length"]) and not r["errors"]
    for r in limited:
        assert r["body"]["error"]["type"] == "RateLimitError" and int(r["retry_after"]) >= 1
    after = {"worker": rss_mib(w), "gateway": rss_mib(g)}
    assert after["worker"] - before["worker"] < 1024, (before, after)
    assert after["gateway"] - before["gateway"] < 256, (before, after)
    # nothing left behind: the controller learns the worker's load from heartbeats (every 0.5 s here), so the
    # last stream's [DONE] can arrive before the heartbeat that reports it finished
    deadline = time.monotonic() + 5
    while True:
        status = httpx.get(g.url + "/status").json()["workers"][0]["load"]
        if (status["num_running"], status["num_waiting"]) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert status["num_running"] == 0 and status["num_waiting"] == 0
    assert queue_length(w) == 0


def queue_length(w: procs.Service, settle: float = 5.0) -> int:
    """The worker's own count of admitted, unfinished requests, once it stops falling (at most `settle` s)."""
    deadline = time.monotonic() + settle
    while True:
        n = httpx.get(w.url + "/status").json()["load"]["queue_length"]
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def test_burst_of_clients_leaving_at_once_gives_every_queue_place_back(small_queue_stack):
    """Clients that hang up while their request is being admitted, as its stream starts or mid-stream: each
    place in the worker's queue (taken when its handler admits the request) comes back, and a full burst
    is then admitted again as before."""
    w, g = small_queue_stack["worker"], small_queue_stack["gateway"]

    async def leave_early(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": 200, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Count to a hundred. Request {i}."}]}
        try:
            async with asyncio.timeout(0.02 + (i % 10) * 0.05):
                async with client.stream("POST", g.url + "/v1/chat/completions", json=body) as resp:
                    async for _ in resp.aiter_lines():
                        pass
        except TimeoutError:
            pass

    async def main() -> None:
        limits = httpx.Limits(max_connections=CONCURRENCY + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
            await asyncio.gather(*(leave_early(client, i) for i in range(100)))

    asyncio.run(main())
    assert queue_length(w, settle=15.0) == 0

    async def again() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
            return await asyncio.gather(*(one_stream(client, g.url + "/v1/chat/completions", i) for i in range(8)))

    assert [status for status, _ in asyncio.run(again())] == [200] * 8
