from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import procs


@dataclass
class Platform:
    controller: procs.Service
    worker: procs.Service
    gateway: procs.Service
    model: str = "SmolLM2-135M-Instruct"

    @property
    def api_url(self) -> str:
        return self.gateway.url + "/v1"

    def services(self) -> list[procs.Service]:
        return [self.controller, self.worker, self.gateway]


_started: list[procs.Service] = []


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    """Controller, embedded-model worker and gateway as real processes, shared by the session."""
    c = procs.controller().start()
    _started.append(c)
    c.wait()
    # float32: the exactness oracle (batch-invariant results, probes checked against transformers in fp32);
    # the bf16 default is checked in tests/engine/test_embedded_model.py
    w = procs.worker(c.url, "--dtype", "float32").start()
    _started.append(w)
    g = procs.gateway(c.url).start()
    _started.append(g)
    w.wait(ok=procs.worker_registered, timeout=300)
    g.wait(ok=procs.gateway_has_models)
    yield Platform(c, w, g)
    for s in (g, w, c):
        s.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for s in list(_started) + list(getattr(item, "services", [])):
            report.sections.append((f"log of {s.name} (port {s.port})", s.logs()[-4000:]))
