"""The worker registry: pure state with an injected clock. Expiry is a method, run by the app's loop.

A worker is known from `register` until it deregisters, or its heartbeats stop for `expiry` seconds, or
the gateway reports it failed. `inflight` counts dispatches since the worker's last load report, so
dispatch sees load that a heartbeat has not reported yet.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from chatserve.protocol.internal import WorkerLoad, WorkerRegistration, WorkerView

MAX_AFFINITY_KEYS = 4096


@dataclass
class WorkerEntry:
    reg: WorkerRegistration
    last_seen: float
    load: WorkerLoad
    inflight: int = 0
    prefixes: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def worker_id(self) -> str:
        return self.reg.worker_id

    def effective_load(self) -> int:
        return self.load.queue_length + self.inflight

    def remember(self, key: str) -> None:
        self.prefixes[key] = None
        self.prefixes.move_to_end(key)
        while len(self.prefixes) > MAX_AFFINITY_KEYS:
            self.prefixes.popitem(last=False)


class WorkerRegistry:
    def __init__(self, expiry: float, clock: Callable[[], float]):
        self.expiry = expiry
        self.clock = clock
        self.workers: dict[str, WorkerEntry] = {}
        self.ever_served: set[str] = set()  # a model served once and now without workers is a 503, not a 404

    def register(self, reg: WorkerRegistration) -> None:
        old = self.workers.get(reg.worker_id)
        entry = WorkerEntry(reg, self.clock(), reg.load)
        if old is not None:
            entry.prefixes = old.prefixes
        self.workers[reg.worker_id] = entry
        self.ever_served.update(reg.models)

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        entry = self.workers.get(worker_id)
        if entry is None:
            return False
        entry.last_seen = self.clock()
        entry.load = load
        entry.inflight = 0
        return True

    def remove(self, worker_id: str) -> bool:
        return self.workers.pop(worker_id, None) is not None

    def expire(self) -> list[str]:
        now = self.clock()
        dead = [wid for wid, e in self.workers.items() if now - e.last_seen > self.expiry]
        for wid in dead:
            del self.workers[wid]
        return dead

    def for_model(self, model: str) -> list[WorkerEntry]:
        return [e for e in self.workers.values() if model in e.reg.models]

    def models(self) -> dict[str, list[WorkerEntry]]:
        out: dict[str, list[WorkerEntry]] = {}
        for e in self.workers.values():
            for m in e.reg.models:
                out.setdefault(m, []).append(e)
        return out

    def views(self) -> list[WorkerView]:
        now = self.clock()
        return [
            WorkerView(worker_id=e.worker_id, address=e.reg.address, models=e.reg.models,
                       context_length=e.reg.context_length, load=e.load,
                       last_heartbeat_age_s=round(now - e.last_seen, 3), inflight=e.inflight)
            for e in self.workers.values()
        ]
