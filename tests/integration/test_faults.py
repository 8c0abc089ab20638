"""Lifecycle faults with real processes: worker before controller, controller restart, worker death."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(request) -> Iterator[dict[str, procs.Service]]:
    cport = procs.free_port()
    c = procs.controller(cport)
    w = procs.worker(c.url).start()  # the worker comes first: the controller is not up yet
    g = procs.gateway(c.url)
    services = {"controller": c, "worker": w, "gateway": g}
    request.node.services = list(services.values())
    yield services
    for s in (g, w, c):
        s.stop()


def controller_workers(c: procs.Service) -> list[dict]:
    return httpx.get(c.url + "/status", timeout=2).json()["workers"]


def test_worker_started_before_controller_waits_and_registers(stack):
    w, c = stack["worker"], stack["controller"]
    w.wait(ok=lambda r: r.json().get("status") == "ready", timeout=300)
    assert w.proc.poll() is None  # still alive, retrying
    c.start()
    c.wait()
    w.wait(ok=procs.worker_registered, timeout=10)
    assert len(controller_workers(c)) == 1


def test_restarted_controller_gets_its_worker_back_within_a_heartbeat(stack):
    c, g = stack["controller"], stack["gateway"]
    g.start()
    g.wait(ok=procs.gateway_has_models)
    c.kill()
    c.start()
    c.wait()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not controller_workers(c):
        time.sleep(0.1)
    assert len(controller_workers(c)) == 1
    client = openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None


def test_controller_restart_under_load_loses_and_repeats_nothing(stack):
    c, g = stack["controller"], stack["gateway"]
    url = g.url + "/v1/chat/completions"

    def stream(i: int) -> tuple[int, list[str]]:
        body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 24, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Count to ten. ({i})"}]}
        with httpx.stream("POST", url, json=body, timeout=120) as resp:
            return resp.status_code, [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = [pool.submit(stream, i) for i in range(6)]
        time.sleep(0.5)
        c.kill()
        during = [pool.submit(stream, 100 + i) for i in range(2)]  # served from the gateway's worker cache
        time.sleep(0.5)
        c.start()
        c.wait()
        results = [f.result() for f in running + during]
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"][0].get("finish_reason")]
        assert finishes == ["length"]  # finished exactly once
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        assert text
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not controller_workers(c):
        time.sleep(0.1)
    assert len(controller_workers(c)) == 1


def test_killed_worker_is_expired_and_the_gateway_answers_503(stack):
    c, w, g = stack["controller"], stack["worker"], stack["gateway"]
    w.kill()
    t0 = time.monotonic()
    while controller_workers(c) and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert not controller_workers(c)
    assert time.monotonic() - t0 < 3 + 2  # expiry setting (3 s) plus the sweep interval and slack
    r = httpx.post(g.url + "/v1/chat/completions",
                   json={"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "ServiceUnavailableError"
