"""The gateway's body limit holds for bodies sent without a Content-Length (chunked), not only for those
that declare one."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests import procs

pytestmark = pytest.mark.integration
LIMIT = 4096


@pytest.fixture(scope="module")
def small_gateway(platform, request) -> Iterator[procs.Service]:
    yield from procs.extra_gateway(platform, request, "--max-body-bytes", str(LIMIT))


def chunked(data: bytes, piece: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def body(platform, size: int) -> bytes:
    return json.dumps({"model": platform.model, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "x" * size}]}).encode()


def test_a_chunked_body_over_the_limit_is_413(small_gateway, platform):
    r = httpx.post(small_gateway.url + "/v1/chat/completions", content=chunked(body(platform, 50_000_000 // 100)),
                   headers={"content-type": "application/json"}, timeout=60)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"


def test_bodies_within_the_limit_pass_chunked_or_not(small_gateway, platform):
    data = body(platform, 100)
    for content in (data, chunked(data, 7)):
        r = httpx.post(small_gateway.url + "/v1/chat/completions", content=content,
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 200, r.text
    big = body(platform, 2 * LIMIT)
    assert httpx.post(small_gateway.url + "/v1/chat/completions", content=big,
                      headers={"content-type": "application/json"}).status_code == 413
