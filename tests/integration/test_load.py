"""Load: 200 concurrent streaming requests against one worker whose queue holds 60. Every request either
completes its stream (ending in [DONE]) or is refused with 429 and Retry-After; nothing else happens, and
the worker's and the gateway's memory stay bounded."""

from __future__ import annotations

import asyncio
import json
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
    c = procs.controller().start()
    c.wait()
    w = procs.worker(c.url, "--max-queue-length", "60").start()
    g = procs.gateway(c.url).start()
    services = {"controller": c, "worker": w, "gateway": g}
    request.node.services = list(services.values())
    w.wait(ok=procs.worker_registered, timeout=300)
    g.wait(ok=procs.gateway_has_models)
    yield services
    for s in (g, w, c):
        s.stop()


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
    status = httpx.get(g.url + "/status").json()["workers"][0]["load"]
    assert status["num_running"] == 0 and status["num_waiting"] == 0  # nothing left behind
