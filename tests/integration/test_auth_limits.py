"""API keys and request limits on a second gateway in front of the same controller."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keyed_gateway(platform, request, tmp_path_factory) -> Iterator[procs.Service]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# team keys\nslow-key rpm=2   # two requests a minute\nthrifty-key tpm=30\n"
                        "burst-key tpm=100\n")
    yield from procs.extra_gateway(platform, request, "--api-keys", "key-one,key-two", "--max-body-bytes", "4000",
                             "--max-tokens-cap", "64", "--api-keys-file", str(key_file),
                             "--cors-origins", "https://chat.example.org")


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


def chat(gateway: procs.Service, key: str, model: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})


def test_keys_from_the_file_work_and_their_request_limit_gives_429_with_retry_after(keyed_gateway, platform):
    assert chat(keyed_gateway, "slow-key", platform.model).status_code == 200
    assert chat(keyed_gateway, "slow-key", platform.model).status_code == 200
    r = chat(keyed_gateway, "slow-key", platform.model)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    sdk = openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key="slow-key", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model=platform.model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert chat(keyed_gateway, "key-one", platform.model).status_code == 200  # other keys are not affected


def test_token_limit_counts_prompt_and_completion_tokens(keyed_gateway, platform):
    first = chat(keyed_gateway, "thrifty-key", platform.model)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 30
    r = chat(keyed_gateway, "thrifty-key", platform.model)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]


def test_cors_admits_only_the_configured_origin_without_credentials(keyed_gateway):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(keyed_gateway.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    ok = preflight("https://chat.example.org")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://chat.example.org"
    assert "access-control-allow-credentials" not in ok.headers
    bad = preflight("https://evil.example.com")
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_a_burst_of_long_requests_cannot_pass_a_token_limit(keyed_gateway, platform):
    """Tokens are reserved at admission (max_tokens), so requests sent together are held to the limit
    before any has finished: 100 tokens a minute admit one 60-token request, not three."""
    import concurrent.futures

    body = {"model": platform.model, "max_tokens": 60, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}

    def send(_):
        return httpx.post(keyed_gateway.url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": "Bearer burst-key"}).status_code

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(send, range(3)))
    assert codes == [200, 429, 429], codes
