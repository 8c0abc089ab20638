import random

from chatserve.protocol.internal import WorkerLoad, WorkerRegistration
from controller.dispatch import choose, least_loaded
from controller.registry import WorkerRegistry


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def reg(wid: str, model: str = "m", queue: int = 0) -> WorkerRegistration:
    return WorkerRegistration(worker_id=wid, address=f"http://{wid}", models=[model], context_length=2048,
                              load=WorkerLoad(queue_length=queue))


def test_registry_expires_silent_workers_only():
    clock = FakeClock()
    r = WorkerRegistry(expiry=10, clock=clock)
    r.register(reg("a"))
    r.register(reg("b"))
    clock.t = 8
    assert r.heartbeat("a", WorkerLoad())
    clock.t = 11
    assert r.expire() == ["b"]
    assert list(r.workers) == ["a"]
    clock.t = 30
    assert r.expire() == ["a"]


def test_heartbeat_from_unknown_worker_asks_it_to_register_again():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    assert r.heartbeat("ghost", WorkerLoad()) is False


def test_heartbeat_resets_inflight_dispatch_count():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a"))
    r.workers["a"].inflight = 3
    r.heartbeat("a", WorkerLoad(queue_length=1))
    assert r.workers["a"].effective_load() == 1


def test_models_lists_each_model_with_its_workers():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a", "x"))
    r.register(reg("b", "x"))
    r.register(reg("c", "y"))
    assert {m: len(ws) for m, ws in r.models().items()} == {"x": 2, "y": 1}


def test_dispatch_picks_least_loaded_counting_unreported_dispatches():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a", queue=2))
    r.register(reg("b", queue=0))
    r.workers["b"].inflight = 5  # dispatched since its last heartbeat
    assert least_loaded(list(r.workers.values()), random.Random(0)).worker_id == "a"


def test_dispatch_prefers_worker_holding_conversation_prefix():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a", queue=1))
    r.register(reg("b", queue=0))
    r.workers["a"].remember("conv1")
    ws = list(r.workers.values())
    assert choose(ws, "conv1", random.Random(0)).worker_id == "a"
    assert choose(ws, "other", random.Random(0)).worker_id == "b"


def test_dispatch_leaves_overloaded_prefix_holder():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a", queue=20))
    r.register(reg("b", queue=0))
    r.workers["a"].remember("conv1")
    assert choose(list(r.workers.values()), "conv1", random.Random(0), slack=4).worker_id == "b"


def test_reregistration_keeps_affinity_keys():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a"))
    r.workers["a"].remember("conv1")
    r.register(reg("a"))
    assert "conv1" in r.workers["a"].prefixes


def test_registry_remembers_models_it_has_served_after_their_workers_leave():
    r = WorkerRegistry(expiry=10, clock=FakeClock())
    r.register(reg("a", "x"))
    r.remove("a")
    assert "x" in r.ever_served and not r.for_model("x")
