"""`chatserve up`: controller, one worker, gateway and web UI as child processes of this one.

Prints the URLs and the model once everything answers /health, relays the worker's loading progress,
and on Ctrl-C (or SIGTERM) stops every process it started, by PID: SIGTERM first, SIGKILL after a grace
period.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from chatserve.gateway.limits import parse_key_file


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    health: str


def _args(argv: Sequence[str]) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="chatserve up", description="start the whole platform on this machine")
    p.add_argument("--host", default=env.get("CHATSERVE_HOST", "127.0.0.1"))
    p.add_argument("--controller-port", type=int, default=int(env.get("CHATSERVE_CONTROLLER_PORT", 21001)))
    p.add_argument("--worker-port", type=int, default=int(env.get("CHATSERVE_WORKER_PORT", 21002)))
    p.add_argument("--gateway-port", type=int, default=int(env.get("CHATSERVE_GATEWAY_PORT", 8000)))
    p.add_argument("--webui-port", type=int, default=int(env.get("CHATSERVE_WEBUI_PORT", 7860)))
    p.add_argument("--model-path", default=env.get("CHATSERVE_MODEL_PATH", ""))
    p.add_argument("--model-name", default=env.get("CHATSERVE_MODEL_NAME", ""))
    p.add_argument("--context-length", default=env.get("CHATSERVE_CONTEXT_LENGTH", "2048"))
    p.add_argument("--api-key", "--api-keys", dest="api_key", default=env.get("CHATSERVE_API_KEYS", ""),
                   help="comma-separated API keys")
    p.add_argument("--api-keys-file", default=env.get("CHATSERVE_API_KEYS_FILE", ""),
                   help="file of API keys, one per line: KEY [rpm=N] [tpm=N]")
    p.add_argument("--no-webui", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    return p.parse_args(list(argv))


def child_specs(a: argparse.Namespace) -> list[tuple[str, list[str], dict[str, str], str]]:
    """(name, argv, environment, health URL) of each process `up` starts. Keys and the internal secret go
    by environment, never in argv: `ps` shows every user a process's arguments."""
    host = a.host
    controller = f"http://{host}:{a.controller_port}"
    gateway = f"http://{host}:{a.gateway_port}"
    py = [sys.executable, "-m", "chatserve.cli.main"]
    # the internal plane (register, dispatch, generate) is closed to everyone but these processes
    token = os.environ.get("CHATSERVE_INTERNAL_SECRET") or secrets.token_urlsafe(24)
    secret = {"CHATSERVE_INTERNAL_SECRET": token}
    specs = [
        ("controller", [*py, "controller", "--host", host, "--port", str(a.controller_port)], secret,
         f"{controller}/health"),
        ("worker", [*py, "worker", "--host", host, "--port", str(a.worker_port), "--controller-url", controller,
                    "--model-path", a.model_path, "--model-name", a.model_name, "--context-length", a.context_length],
         secret, f"http://{host}:{a.worker_port}/health"),
        ("gateway", [*py, "gateway", "--host", host, "--port", str(a.gateway_port), "--controller-url", controller,
                     "--api-keys-file", a.api_keys_file], {**secret, "CHATSERVE_API_KEYS": a.api_key},
         f"{gateway}/health"),
    ]
    if not a.no_webui:
        ui_key = a.api_key.split(",")[0]
        if not ui_key and a.api_keys_file:
            ui_key = next(iter(parse_key_file(a.api_keys_file)), "")
        specs.append(("webui", [*py, "webui", "--host", host, "--port", str(a.webui_port), "--api-url",
                                f"{gateway}/v1"], {"CHATSERVE_API_KEY": ui_key}, f"http://{host}:{a.webui_port}/"))
    return specs


def up(argv: Sequence[str]) -> None:
    a = _args(argv)
    host = a.host
    controller = f"http://{host}:{a.controller_port}"
    gateway = f"http://{host}:{a.gateway_port}"
    specs = child_specs(a)
    children: list[Child] = []

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for name, cmd, env, health in specs:
            children.append(Child(name, subprocess.Popen(cmd, env={**os.environ, **env}), health))
        print(f"chatserve: starting {', '.join(c.name for c in children)} (the model loads first; this can take a minute)",
              flush=True)
        model = _wait_ready(children, a.startup_timeout)
        print("\n" + "=" * 70)
        print(f"  chatserve is up. Model: {model}")
        print(f"  OpenAI-compatible API : {gateway}/v1")
        if not a.no_webui:
            print(f"  Web UI                : http://{host}:{a.webui_port}")
        print(f"  Controller            : {controller}")
        print("  Press Ctrl-C to stop.")
        print("=" * 70 + "\n", flush=True)
        while True:
            for c in children:
                if c.proc.poll() is not None:
                    print(f"chatserve: {c.name} exited with code {c.proc.returncode}; stopping", flush=True)
                    raise KeyboardInterrupt
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_all(children)


def _wait_ready(children: list[Child], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    pending = {c.name for c in children}
    last_note = 0.0
    model = "?"
    with httpx.Client(timeout=2.0) as client:
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"chatserve: timed out waiting for {', '.join(sorted(pending))}")
            for c in children:
                if c.proc.poll() is not None:
                    raise SystemExit(f"chatserve: {c.name} exited with code {c.proc.returncode} during start-up")
                if c.name not in pending:
                    continue
                try:
                    r = client.get(c.health)
                except httpx.HTTPError:
                    continue
                if c.name == "worker":
                    body = r.json()
                    if body.get("status") == "failed":
                        raise SystemExit(f"chatserve: the worker could not load its model: {body.get('error')}")
                    if r.status_code == 200 and body.get("registered"):
                        model = body.get("model") or model
                        pending.discard(c.name)
                        print(f"chatserve: worker ready, serving {model}", flush=True)
                elif c.name == "gateway":
                    if r.status_code == 200 and r.json().get("models"):
                        pending.discard(c.name)
                elif r.status_code < 500:
                    pending.discard(c.name)
            if time.monotonic() - last_note > 10 and "worker" in pending:
                print("chatserve: ... model still loading", flush=True)
                last_note = time.monotonic()
            time.sleep(0.5)
    return model


def _stop_all(children: list[Child]) -> None:
    for c in reversed(children):
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for c in reversed(children):
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
    print("chatserve: all processes stopped", flush=True)
