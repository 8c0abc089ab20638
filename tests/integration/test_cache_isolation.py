"""Prefix-cache isolation: a request's `cache_salt`, and per API key with --isolate-prefix-cache-per-key,
keep one tenant's cached prompts out of another's reach (`cached_tokens` tells who reused what)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration
SYSTEM = "You are a careful assistant for the accounts team. " * 6


def cached(client: openai.OpenAI, model: str, **extra) -> int:
    r = client.chat.completions.create(model=model, max_tokens=2, temperature=0, extra_body=extra or None,
                                       messages=[{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": "Summarise the ledger."}])
    return r.usage.prompt_tokens_details.cached_tokens


@pytest.fixture(scope="module")
def isolating_gateway(platform, request) -> Iterator[procs.Service]:
    yield from procs.extra_gateway(platform, request, "--api-keys", "key-a,key-b",
                                   "--isolate-prefix-cache-per-key", "true")


def test_a_request_salt_separates_the_cache(platform):
    c = openai.OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)
    cached(c, platform.model, cache_salt="salt-one")
    assert cached(c, platform.model, cache_salt="salt-one") > 40
    assert cached(c, platform.model, cache_salt="salt-two") == 0


def test_keys_do_not_share_cached_prompts(isolating_gateway, platform):
    a = openai.OpenAI(base_url=isolating_gateway.url + "/v1", api_key="key-a", max_retries=0)
    b = openai.OpenAI(base_url=isolating_gateway.url + "/v1", api_key="key-b", max_retries=0)
    cached(a, platform.model)
    assert cached(a, platform.model) > 40  # the same key reuses its own prompt
    assert cached(b, platform.model) == 0  # another key finds nothing
