"""API keys and sliding-window rate limits, with a fake clock."""

from __future__ import annotations

import pytest

from chatserve.gateway.limits import KeyPolicy, KeyRing, parse_key_file
from chatserve.protocol.errors import AuthenticationError, RateLimitError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_key_file_parses_limits_and_comments(tmp_path):
    f = tmp_path / "keys"
    f.write_text("a\n# comment\nb rpm=5 tpm=100  # trailing\n\n")
    assert parse_key_file(f) == {"a": KeyPolicy(), "b": KeyPolicy(rpm=5, tpm=100)}
    f.write_text("c rpm=lots\n")
    with pytest.raises(ValueError, match="rpm=lots"):
        parse_key_file(f)


def test_identify_matches_bearer_keys_only():
    ring = KeyRing({"k1": KeyPolicy(), "k2": KeyPolicy()})
    assert ring.identify("Bearer k2") == "k2" and ring.identify("bearer  k1 ") == "k1"
    for header in ("", "Bearer", "Bearer k3", "Basic k1", "k1"):
        with pytest.raises(AuthenticationError):
            ring.identify(header)


def test_request_limit_slides_with_the_clock():
    clock = Clock()
    ring = KeyRing({"k": KeyPolicy(rpm=2)}, clock=clock)
    ring.admit("k")
    clock.t += 10
    ring.admit("k")
    with pytest.raises(RateLimitError) as e:
        ring.admit("k")
    assert e.value.retry_after == pytest.approx(50.0) and e.value.status_code == 429
    clock.t += 50  # the first request leaves the window
    ring.admit("k")


def test_token_limit_uses_settled_tokens_and_the_default_policy_applies_to_plain_keys():
    clock = Clock()
    ring = KeyRing({"k": KeyPolicy(), "own": KeyPolicy(tpm=1000)}, default=KeyPolicy(tpm=100), clock=clock)
    ring.admit("k")(120)
    with pytest.raises(RateLimitError, match="100 tokens per minute"):
        ring.admit("k")
    ring.admit("own")(120)
    ring.admit("own")  # its own, larger limit
    clock.t += 60
    ring.admit("k")


def test_a_burst_of_long_requests_is_held_to_the_limit_by_reservations():
    clock = Clock()
    ring = KeyRing({"k": KeyPolicy(tpm=1000)}, clock=clock)
    settles = [ring.admit("k", reserve=300) for _ in range(3)]  # 900 reserved, none finished yet
    with pytest.raises(RateLimitError, match="900 used or reserved, 300 asked for"):
        ring.admit("k", reserve=300)
    settles[0](50)  # finished with fewer tokens than it reserved: the rest comes back at once
    settles[1](0)  # refused upstream: all of it back
    ring.admit("k", reserve=300)
    ring.admit("k", reserve=350)  # 50 + 300 + 300 + 350: the minute is full
    with pytest.raises(RateLimitError):
        ring.admit("k", reserve=1)
    clock.t += 61
    ring.admit("k", reserve=5000)  # more than the limit: held at the whole limit, so it can still run alone


def test_later_parts_of_one_request_add_their_tokens():
    ring = KeyRing({"k": KeyPolicy(tpm=1000)}, clock=Clock())
    settle = ring.admit("k", reserve=100)
    settle(40)
    settle(40)  # the second prompt of a completions request
    assert ring._windows["k"].token_sum == 80


def test_idle_windows_are_forgotten_when_many_clients_came_and_went(monkeypatch):
    import chatserve.gateway.limits as limits

    monkeypatch.setattr(limits, "MAX_TRACKED", 5)
    clock = Clock()
    ring = KeyRing({}, default=KeyPolicy(rpm=10), clock=clock)
    for i in range(6):
        ring.admit(f"client:{i}")
    clock.t += 61
    ring.admit("client:new")
    assert list(ring._windows) == ["client:new"]
