"""Real service processes for tests: free ports on 127.0.0.1, wait for /health, logs kept for failure
reports, stopped by PID (only the processes the tests started)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    args: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    wrap: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]: run on another "host"
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Service:
        fd, path = tempfile.mkstemp(prefix=f"chatserve-{self.name}-", suffix=".log")
        self.log_path = Path(path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        cmd = [*self.wrap, sys.executable, "-m", "chatserve.cli.main", self.name, "--host", self.host, "--port",
               str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        os.close(fd)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def wait(self, path: str = "/health", ok: Callable[[httpx.Response], bool] | None = None,
             timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        ok = ok or (lambda r: r.status_code == 200)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                if ok(httpx.get(self.url + path, timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.logs()[-3000:]}")


FAST_TIMING = {"CHATSERVE_HEARTBEAT_INTERVAL": "0.5", "CHATSERVE_HEARTBEAT_EXPIRY": "3",
               "CHATSERVE_EXPIRY_CHECK_INTERVAL": "0.5"}


def controller(port: int | None = None) -> Service:
    return Service("controller", [], port or free_port(), dict(FAST_TIMING))


def worker(controller_url: str, *extra: str, port: int | None = None) -> Service:
    return Service("worker", ["--controller-url", controller_url, "--kv-cache-tokens", "16384", *extra],
                   port or free_port(), dict(FAST_TIMING))


def gateway(controller_url: str, *extra: str) -> Service:
    """A gateway; its stored responses in a database file of its own unless `--responses-db` is given."""
    own_db = {"CHATSERVE_RESPONSES_DB": str(Path(tempfile.mkdtemp(prefix="chatserve-responses-")) / "r.sqlite3")}
    return Service("gateway", ["--controller-url", controller_url, "--worker-cache-ttl", "2", *extra], free_port(),
                   own_db)


def webui(api_url: str, *extra: str) -> Service:
    return Service("webui", ["--api-url", api_url, *extra], free_port())


def worker_registered(r: httpx.Response) -> bool:
    return r.status_code == 200 and bool(r.json().get("registered"))


def gateway_has_models(r: httpx.Response) -> bool:
    return r.status_code == 200 and bool(r.json().get("models"))


def extra_gateway(platform, request, *args: str):  # type: ignore[no-untyped-def]
    """A second gateway (own flags) in front of the session platform's controller, for a module fixture
    to `yield from`; its log goes into failure reports."""
    g = gateway(platform.controller.url, *args)
    g.start()
    request.node.services = [g]
    g.wait(ok=gateway_has_models)
    yield g
    g.stop()


def own_stack(request, *worker_args: str):  # type: ignore[no-untyped-def]
    """A controller, a worker (own flags) and a gateway of a module's own, for a module fixture to
    `yield from` (a dict of the three); their logs go into failure reports."""
    c = controller().start()
    c.wait()
    w = worker(c.url, *worker_args).start()
    g = gateway(c.url).start()
    services = {"controller": c, "worker": w, "gateway": g}
    request.node.services = list(services.values())
    try:
        w.wait(ok=worker_registered, timeout=300)
        g.wait(ok=gateway_has_models)
        yield services
    finally:
        for s in (g, w, c):
            s.stop()


def extra_worker(platform, request, model_name: str, *args: str):  # type: ignore[no-untyped-def]
    """Another fp32 worker of the embedded model, serving it as `model_name` behind the session platform,
    for a module fixture to `yield from`; stopped even when its start-up fails."""
    w = worker(platform.controller.url, "--dtype", "float32", "--model-name", model_name, *args).start()
    request.node.services = [w]
    try:
        w.wait(ok=worker_registered, timeout=300)
        platform.gateway.wait(path="/v1/models", ok=lambda r: model_name in r.text)
        yield w
    finally:
        w.stop()
