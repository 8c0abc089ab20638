"""`chatserve health`: the container healthcheck. Finds which service this container runs (the command
line of PID 1, or of the given PID) and its port, then asks that service: `/health` for controller,
worker and gateway (a worker is healthy once its model is loaded), `/` for the web UI. Exit 0 = healthy.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import httpx

from chatserve.settings import ControllerSettings, GatewaySettings, WebUISettings, WorkerSettings

DEFAULT_PORTS = {"controller": ControllerSettings.port, "worker": WorkerSettings.port,
                 "gateway": GatewaySettings.port, "webui": WebUISettings.port, "up": GatewaySettings.port}


def service_and_port(argv: Sequence[str], env: dict[str, str]) -> tuple[str, int]:
    """From a command line like `chatserve worker --port 9000`: ("worker", 9000)."""
    args = list(argv)
    service = next((a for a in args if a in DEFAULT_PORTS), "up")
    flag = "--gateway-port" if service == "up" else "--port"
    port = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            port = args[i + 1]
        elif a.startswith(flag + "="):
            port = a.split("=", 1)[1]
    if port is None:
        port = env.get("CHATSERVE_GATEWAY_PORT" if service == "up" else "CHATSERVE_PORT")
    return service, int(port) if port else DEFAULT_PORTS[service]


def health(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="chatserve health", description=__doc__)
    p.add_argument("--pid", type=int, default=1, help="process whose command line names the service")
    p.add_argument("--timeout", type=float, default=4.0)
    a = p.parse_args(list(argv))
    try:
        with open(f"/proc/{a.pid}/cmdline", "rb") as f:
            cmdline = [s.decode(errors="replace") for s in f.read().split(b"\0") if s]
    except OSError:
        cmdline = []
    service, port = service_and_port(cmdline, dict(os.environ))
    url = f"http://127.0.0.1:{port}" + ("/" if service == "webui" else "/health")
    try:
        r = httpx.get(url, timeout=a.timeout)
    except httpx.HTTPError as exc:
        print(f"{service}: {url} unreachable: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{service}: {url} -> {r.status_code}")
    raise SystemExit(0 if r.status_code == 200 else 1)
