"""The internal plane as production runs it: every service with the shared secret. Without it a rogue
registration, a direct /generate or /embed, /report_failure and a heartbeat for someone else's worker are
each 401 in the envelope; with it they work. A service bound to a non-loopback address without a secret
refuses to start, saying how to make one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests import procs

pytestmark = pytest.mark.integration
SECRET = "another-s3cret-for-tests-0123456789"
OK = {"X-Chatserve-Secret": SECRET}


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Iterator[dict[str, procs.Service]]:
    secret_file = tmp_path_factory.mktemp("secret") / "internal-secret"
    secret_file.write_text(SECRET + "\n")
    c = procs.controller()
    c.env["CHATSERVE_INTERNAL_SECRET"] = SECRET
    c.start()
    c.wait()
    w = procs.worker(c.url, "--internal-secret-file", str(secret_file))  # the file form
    w.start()
    g = procs.gateway(c.url)
    g.env["CHATSERVE_INTERNAL_SECRET"] = SECRET
    g.start()
    request.node.services = [c, w, g]
    try:
        w.wait(ok=procs.worker_registered, timeout=300)
        g.wait(ok=procs.gateway_has_models)
        yield {"controller": c, "worker": w, "gateway": g}
    finally:
        for s in (g, w, c):
            s.stop()


def unauthorized(r: httpx.Response) -> bool:
    return r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"


def test_chat_works_through_the_secured_plane(stack):
    r = httpx.post(stack["gateway"].url + "/v1/chat/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_a_rogue_registration_is_refused(stack):
    rogue = {"worker_id": "rogue", "address": "http://203.0.113.9:1", "models": ["SmolLM2-135M-Instruct"],
             "context_length": 2048}
    c = stack["controller"].url
    assert unauthorized(httpx.post(c + "/register", json=rogue))
    assert unauthorized(httpx.post(c + "/register", json=rogue, headers={"X-Chatserve-Secret": "guess"}))
    workers = httpx.get(c + "/status", headers=OK).json()["workers"]
    assert [w["worker_id"] for w in workers if w["worker_id"] == "rogue"] == []


def test_direct_worker_calls_need_the_secret(stack):
    w = stack["worker"].url
    gen = {"request_id": "direct-1", "prompt": "Hello", "params": {"max_tokens": 2}}
    assert unauthorized(httpx.post(w + "/generate", json=gen))
    assert unauthorized(httpx.post(w + "/embed", json={"inputs": ["a cat"]}))
    assert unauthorized(httpx.get(w + "/status"))
    with httpx.stream("POST", w + "/generate", json={**gen, "request_id": "direct-2"}, headers=OK, timeout=60) as r:
        assert r.status_code == 200 and b'"kind":"start"' in r.read().replace(b" ", b"")
    assert httpx.post(w + "/embed", json={"inputs": ["a cat"]}, headers=OK, timeout=60).status_code == 200


def test_failure_reports_and_heartbeats_for_someone_elses_worker_need_the_secret(stack):
    c = stack["controller"].url
    real = httpx.get(c + "/status", headers=OK).json()["workers"][0]["worker_id"]
    assert unauthorized(httpx.post(c + "/report_failure", json={"worker_id": real}))
    assert unauthorized(httpx.post(c + "/heartbeat", json={"worker_id": real, "load": {"queue_length": 999}}))
    assert unauthorized(httpx.post(c + "/deregister", json={"worker_id": real}))
    status = httpx.get(c + "/status", headers=OK).json()["workers"]
    assert [w["worker_id"] for w in status] == [real] and status[0]["load"]["queue_length"] < 999
    assert httpx.post(c + "/heartbeat", json={"worker_id": real}, headers=OK).status_code == 200


@pytest.mark.parametrize("service", ["controller", "worker", "gateway"])
def test_a_service_on_every_interface_without_a_secret_will_not_start(service):
    env = {k: v for k, v in __import__("os").environ.items() if k != "CHATSERVE_INTERNAL_SECRET"}
    cmd = [sys.executable, "-m", "chatserve.cli.main", service, "--host", "0.0.0.0", "--port", str(procs.free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=procs.REPO)
    assert out.returncode != 0
    assert "--internal-secret-file" in out.stderr and "CHATSERVE_INTERNAL_SECRET" in out.stderr, out.stderr


def test_the_insecure_flag_serves_open_and_says_so():
    c = procs.Service("controller", ["--insecure-open-internal-plane", "true"], procs.free_port(), host="0.0.0.0")
    c.start()
    try:
        c.host = "127.0.0.1"  # reach it over loopback
        c.wait()
        assert "internal plane of this controller is OPEN" in c.logs()
    finally:
        c.stop()


def test_status_hides_the_topology_unless_asked(stack):
    hidden = httpx.get(stack["gateway"].url + "/status").json()["workers"]
    assert [(w["worker_id"], w["address"]) for w in hidden] == [("worker-1", "")]
    assert hidden[0]["models"] == ["SmolLM2-135M-Instruct"] and "queue_length" in hidden[0]["load"]
    g = procs.gateway(stack["controller"].url, "--show-topology", "true")
    g.env["CHATSERVE_INTERNAL_SECRET"] = SECRET
    g.start()
    try:
        g.wait(ok=procs.gateway_has_models)
        shown = httpx.get(g.url + "/status").json()["workers"]
        assert shown[0]["address"] == stack["worker"].url
    finally:
        g.stop()
