"""A rolling restart under load: one of two workers is told to stop (SIGTERM, as `docker stop` and a
Kubernetes rolling update do) while 16 clients stream; it deregisters, takes no new request, finishes its
running streams and exits 0; a new one takes its place. No request is lost and no stream is cut short."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration
TOKENS = 24


@pytest.fixture(scope="module")
def two_workers(request) -> Iterator[dict]:
    c = procs.controller().start()
    c.wait()
    workers = [procs.worker(c.url).start(), procs.worker(c.url).start()]
    g = procs.gateway(c.url).start()
    request.node.services = [c, *workers, g]  # logs in failure reports; a restarted worker joins `workers`
    try:
        for w in workers:
            w.wait(ok=procs.worker_registered, timeout=300)
        g.wait(ok=procs.gateway_has_models)
        yield {"controller": c, "workers": workers, "gateway": g}
    finally:
        for s in (g, *workers, c):
            s.stop()


def test_a_rolling_restart_loses_no_request_and_cuts_no_stream(two_workers):
    client = openai.OpenAI(base_url=two_workers["gateway"].url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stop = threading.Event()
    done: list[str] = []
    failures: list[str] = []

    def user(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                stream = client.chat.completions.create(
                    model="SmolLM2-135M-Instruct", stream=True, max_tokens=TOKENS, temperature=0, extra_body={
                        "ignore_eos": True}, messages=[{"role": "user", "content": f"User {i}, message {n}: hello"}])
                finish = None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                if finish != "length":
                    failures.append(f"user {i} message {n}: finish {finish}")
                else:
                    done.append(f"{i}/{n}")
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                failures.append(f"user {i} message {n}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=user, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(4)
        old = two_workers["workers"][0]
        before = len(done)
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(timeout=60) == 0, old.logs()[-2000:]
        assert "deregistered from controller" in old.logs() and "drained" in old.logs()
        new = procs.worker(two_workers["controller"].url, port=old.port).start()
        two_workers["workers"].append(new)
        new.wait(ok=procs.worker_registered, timeout=300)
        time.sleep(4)  # the new worker serves too
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not failures, failures[:5]
    assert len(done) > before + 16, (before, len(done))
