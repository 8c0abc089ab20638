"""The internal plane is closed: without the shared secret nobody can register a worker, dispatch, or call
a worker directly (FastChat's controller lets anyone register)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests import procs

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-tests"


@pytest.fixture(scope="module")
def controller(request) -> Iterator[procs.Service]:
    c = procs.controller()
    c.env["CHATSERVE_INTERNAL_SECRET"] = SECRET
    c.start()
    request.node.services = [c]
    c.wait()
    yield c
    c.stop()


ROGUE = {"worker_id": "rogue", "address": "http://203.0.113.9:1", "models": ["m"], "context_length": 2048}


@pytest.mark.parametrize("headers", [{}, {"X-Chatserve-Secret": "wrong"}])
def test_registration_without_the_secret_is_refused(controller, headers):
    r = httpx.post(controller.url + "/register", json=ROGUE, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(controller.url + "/status", headers={"X-Chatserve-Secret": SECRET}).json()["workers"] == []


def test_dispatch_and_status_need_the_secret_too(controller):
    assert httpx.post(controller.url + "/dispatch", json={"model": "m"}).status_code == 401
    assert httpx.get(controller.url + "/status").status_code == 401
    assert httpx.get(controller.url + "/health").status_code == 200  # health stays open for probes


def test_registration_with_the_secret_works(controller):
    r = httpx.post(controller.url + "/register", json={**ROGUE, "worker_id": "good"},
                   headers={"X-Chatserve-Secret": SECRET})
    assert r.status_code == 200
