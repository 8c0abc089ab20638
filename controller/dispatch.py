"""Dispatch policies: pure functions from candidate workers to the chosen one.

least_loaded: the smallest live load (reported queue length + dispatches not yet reported), ties broken
by the given random source. Prefix affinity: a conversation's next turn goes back to the worker that
holds its KV cache, unless that worker's load exceeds the least loaded one's by more than `slack`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from controller.registry import WorkerEntry

AFFINITY_SLACK = 4


def least_loaded(candidates: Sequence[WorkerEntry], rng: random.Random) -> WorkerEntry:
    best = min(e.effective_load() for e in candidates)
    return rng.choice([e for e in candidates if e.effective_load() == best])


def choose(candidates: Sequence[WorkerEntry], prefix_key: str | None, rng: random.Random,
           policy: str = "least_loaded", slack: int = AFFINITY_SLACK) -> WorkerEntry:
    if not candidates:
        raise ValueError("no candidates")
    if policy == "random":
        return rng.choice(list(candidates))
    fallback = least_loaded(candidates, rng)
    if prefix_key:
        holders = [e for e in candidates if prefix_key in e.prefixes]
        if holders:
            holder = min(holders, key=lambda e: e.effective_load())
            if holder.effective_load() <= fallback.effective_load() + slack:
                return holder
    return fallback
