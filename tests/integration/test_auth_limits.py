"""API keys and request limits on a second gateway in front of the same controller."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keyed_gateway(platform, request) -> Iterator[procs.Service]:
    g = procs.gateway(platform.controller.url, "--api-keys", "key-one,key-two", "--max-body-bytes", "4000",
                      "--max-tokens-cap", "64")
    g.start()
    request.node.services = [g]
    g.wait(ok=procs.gateway_has_models)
    yield g
    g.stop()


def test_missing_or_wrong_key_is_401_and_any_listed_key_works(keyed_gateway, platform):
    url = keyed_gateway.url + "/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    r = httpx.get(url + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    models = openai.OpenAI(base_url=url, api_key="key-two", max_retries=0).models.list()
    assert [m.id for m in models.data] == [platform.model]
    assert httpx.get(keyed_gateway.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(keyed_gateway.url + "/metrics").status_code == 401  # metrics are behind a key by default


def test_oversized_body_is_413_and_max_tokens_over_the_cap_is_400(keyed_gateway, platform):
    headers = {"Authorization": "Bearer key-one"}
    big = {"model": platform.model, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(keyed_gateway.url + "/v1/chat/completions", json=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
    r = httpx.post(keyed_gateway.url + "/v1/chat/completions", headers=headers, json={
        "model": platform.model, "max_tokens": 65, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
