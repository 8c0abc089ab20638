"""API keys and per-key rate limits of the gateway.

Keys come from `--api-keys`/`CHATSERVE_API_KEYS` and from `--api-keys-file`, one key per line with
optional limits (`KEY rpm=60 tpm=20000`; `#` starts a comment). A request is matched against every key in
constant time. Limits are sliding one-minute windows per key (per client address when no keys are set):
requests are counted when admitted; tokens are reserved when admitted (the request's max_tokens, at most
the whole limit) and settled to what the response used (prompt + completion) when it ends, so a burst of
long requests cannot pass a tokens-per-minute limit before any of them has finished. A request that
arrives over either limit gets 429 with `Retry-After` saying when the window frees up.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatserve.protocol.errors import AuthenticationError, RateLimitError

WINDOW_S = 60.0
MAX_TRACKED = 10_000  # windows kept before idle ones are dropped


@dataclass(frozen=True)
class KeyPolicy:
    rpm: int = 0  # requests per minute, 0 = unlimited
    tpm: int = 0  # tokens per minute, 0 = unlimited


def parse_key_file(path: str | Path) -> dict[str, KeyPolicy]:
    keys: dict[str, KeyPolicy] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, *opts = line.split()
        limits: dict[str, int] = {}
        for opt in opts:
            name, _, value = opt.partition("=")
            if name not in ("rpm", "tpm") or not value.isdigit():
                raise ValueError(f"{path}:{n}: expected 'KEY [rpm=N] [tpm=N]', got {opt!r}")
            limits[name] = int(value)
        keys[key] = KeyPolicy(**limits)
    return keys


@dataclass(slots=True)
class _Tokens:
    at: float
    count: int
    live: bool = True  # still inside the window


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[_Tokens] = field(default_factory=deque)
    token_sum: int = 0

    def trim(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0].at >= WINDOW_S:
            gone = self.tokens.popleft()
            gone.live = False
            self.token_sum -= gone.count

    def add(self, at: float, count: int) -> _Tokens:
        entry = _Tokens(at, count)
        self.tokens.append(entry)
        self.token_sum += count
        return entry


@dataclass
class KeyRing:
    """Which key a request carries (constant time), and whether it is over its limits."""

    keys: dict[str, KeyPolicy]
    default: KeyPolicy = field(default_factory=KeyPolicy)
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, _Window] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str) -> str:
        """The key of an `Authorization: Bearer KEY` header; 401 when it matches none."""
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = ""
        for key in self.keys:  # every key is compared, so timing tells nothing about which one matched
            if hmac.compare_digest(given, key.encode()):
                found = key
        if not found:
            raise AuthenticationError("Incorrect API key provided." if given else "Missing API key "
                                      "(send 'Authorization: Bearer <key>').", code="invalid_api_key")
        return found

    def policy(self, key: str) -> KeyPolicy:
        own = self.keys.get(key)
        if own is None:
            return self.default
        return KeyPolicy(own.rpm or self.default.rpm, own.tpm or self.default.tpm)

    def admit(self, key: str, reserve: int = 0) -> Callable[[int], None]:
        """Count one request for `key` and reserve `reserve` tokens for it, or raise 429 if that would pass
        its request or token limit. Returns how to settle the reservation to the tokens used (once)."""
        policy = self.policy(key)
        if not (policy.rpm or policy.tpm):
            return _unlimited
        now = self.clock()
        if len(self._windows) > MAX_TRACKED and key not in self._windows:
            self._forget_idle(now)
        w = self._windows.setdefault(key, _Window())
        w.trim(now)
        if policy.rpm and len(w.requests) >= policy.rpm:
            raise RateLimitError(f"Rate limit reached: {policy.rpm} requests per minute.",
                                 retry_after=WINDOW_S - (now - w.requests[0]), code="rate_limit_exceeded")
        held = min(max(reserve, 1), policy.tpm) if policy.tpm else 0
        if policy.tpm and w.token_sum + held > policy.tpm:
            raise RateLimitError(f"Rate limit reached: {policy.tpm} tokens per minute ({w.token_sum} used or "
                                 f"reserved, {held} asked for).",
                                 retry_after=WINDOW_S - (now - w.tokens[0].at) if w.tokens else 1.0,
                                 code="rate_limit_exceeded")
        w.requests.append(now)
        if not policy.tpm:
            return _unlimited
        entry = w.add(now, held)
        settled = False

        def settle(tokens: int) -> None:
            """The first call replaces the reservation with the tokens used; later ones (the other prompts
            of one completions request) add theirs."""
            nonlocal settled
            w.trim(self.clock())
            if not settled and entry.live:
                w.token_sum += tokens - entry.count
                entry.count = tokens
            elif tokens > 0:  # a later part, or the reservation has left the window: counts from now
                w.add(self.clock(), tokens)
            settled = True

        return settle

    def _forget_idle(self, now: float) -> None:
        """Drop the windows that hold nothing any more (many one-off client addresses)."""
        for key, w in list(self._windows.items()):
            w.trim(now)
            if not w.requests and not w.tokens:
                del self._windows[key]



def _unlimited(tokens: int) -> None:  # noqa: ARG001 - nothing to settle
    return None
