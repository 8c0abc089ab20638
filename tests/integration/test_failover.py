"""A worker that dies before the first token: the gateway retries the request on another worker, reports
the dead one, and the client never sees the failure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests import procs

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def two_workers(request) -> Iterator[dict[str, procs.Service]]:
    c = procs.controller()
    c.env["CHATSERVE_HEARTBEAT_EXPIRY"] = "120"  # expiry must not be what removes the dead worker here
    c.start()
    c.wait()
    a = procs.worker(c.url, "--dtype", "float32").start()
    b = procs.worker(c.url, "--dtype", "float32").start()
    g = procs.gateway(c.url).start()
    services = {"controller": c, "a": a, "b": b, "gateway": g}
    request.node.services = list(services.values())
    a.wait(ok=procs.worker_registered, timeout=300)
    b.wait(ok=procs.worker_registered, timeout=300)
    g.wait(ok=procs.gateway_has_models)
    yield services
    for s in (g, a, b, c):
        s.stop()


def test_request_is_retried_on_another_worker_when_its_worker_died(two_workers):
    c, a, b, g = (two_workers[k] for k in ("controller", "a", "b", "gateway"))
    # keep worker b busy so least-loaded dispatch prefers a
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                 "max_tokens": 400, "ignore_eos": True}
    busy = threading.Thread(target=lambda: httpx.post(b.url + "/generate", timeout=120, json={
        "request_id": "busy", "messages": long_body["messages"], "params": {"max_tokens": 400, "ignore_eos": True}}))
    busy.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loads = {w["address"]: w["load"]["queue_length"] for w in httpx.get(c.url + "/status").json()["workers"]}
        if loads.get(b.url, 0) >= 1:
            break
        time.sleep(0.1)
    a.kill()  # dead, but still registered (expiry is 120 s)
    r = httpx.post(g.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
    addresses = [w["address"] for w in httpx.get(c.url + "/status").json()["workers"]]
    assert addresses == [b.url]  # the gateway reported the dead worker; the controller dropped it
    assert "failed before the first token" in g.logs()  # the request did go to the dead worker first
    busy.join(timeout=120)


def test_worker_killed_mid_stream_ends_the_stream_with_an_error_event_and_is_dropped(two_workers):
    c, b, g = (two_workers[k] for k in ("controller", "b", "gateway"))
    body = {"model": MODEL, "stream": True, "max_tokens": 500, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell a long story."}]}
    events: list[str] = []
    t0 = time.monotonic()
    with httpx.stream("POST", g.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 4:
                    b.kill()
    assert time.monotonic() - t0 < 30  # the stream ended: no hang
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "ServiceUnavailableError" and set(error) == {"message", "type", "param", "code"}
    assert all("error" not in json.loads(e) for e in events[:-1])  # deltas, then one error event
    deadline = time.monotonic() + 3
    while httpx.get(c.url + "/status").json()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(c.url + "/status").json()["workers"] == []  # reported by the gateway, dropped at once
