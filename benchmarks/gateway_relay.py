"""The gateway's cost per streamed token, without an engine: a stand-in worker (its own process) answers
/generate with N deltas as fast as it can; U concurrent clients stream chat completions through the real
controller and gateway. Prints tokens/s through the gateway and the gateway's CPU time per relayed token
(from /proc, so it holds whatever else shares the machine's cores).

    python benchmarks/gateway_relay.py --users 64 --tokens 128 --rounds 3
    python benchmarks/gateway_relay.py --users 64 --tokens 2 --rounds 30   # bursts of short requests: the
                                                                           # per-request costs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import threading
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatserve.protocol.internal import Heartbeat, WorkerRegistration  # noqa: E402

MODEL = "relay"


def fake_worker(port: int, controller: str) -> None:
    """A worker that streams `max_tokens` one-token deltas per request, registered like a real one."""
    import uvicorn

    app = FastAPI()
    address = f"http://127.0.0.1:{port}"
    worker_id = f"relay:{port}"

    @app.post("/generate")
    async def generate(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body["params"].get("max_tokens") or 16)

        async def lines():
            yield b'{"kind":"start","prompt_tokens":10}\n'
            for i in range(n):
                line = {"kind": "delta", "index": 0, "text": " tok", "token_ids": [i + 3], "prompt_tokens": 10,
                        "completion_tokens": i + 1, "cached_tokens": 0}
                if i == n - 1:
                    line["finish_reason"] = "length"
                yield (json.dumps(line, separators=(",", ":")) + "\n").encode()
                await asyncio.sleep(0)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def heartbeats() -> None:
        reg = WorkerRegistration(worker_id=worker_id, address=address, models=[MODEL], context_length=2048)
        while True:
            try:
                httpx.post(controller + "/register", json=reg.model_dump(), timeout=5)
                while True:
                    time.sleep(1)
                    r = httpx.post(controller + "/heartbeat", json=Heartbeat(worker_id=worker_id).model_dump(),
                                   timeout=5)
                    if not r.json().get("known"):
                        break
            except httpx.HTTPError:
                time.sleep(0.5)

    threading.Thread(target=heartbeats, daemon=True).start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def one(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[int, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    t0 = time.perf_counter()
    first, count = 0.0, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
                count += 1
                first = first or time.perf_counter() - t0
    return count, first


async def drive(url: str, users: int, tokens: int, rounds: int) -> dict:
    # a client per user: one shared client's connection pool costs it time quadratic in open connections
    tls = ssl.create_default_context()
    clients = [httpx.AsyncClient(timeout=120, verify=tls) for _ in range(users)]
    try:
        await one(clients[0], url, 4)  # warm-up
        t0 = time.perf_counter()
        results = []
        for _ in range(rounds):
            results += await asyncio.gather(*(one(c, url, tokens) for c in clients))
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.aclose()
    count = sum(c for c, _ in results)
    ttfts = sorted(f for _, f in results)
    return {"tokens": count, "wall_s": round(wall, 2), "tok_s": round(count / wall), "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fake-worker", nargs=2, metavar=("PORT", "CONTROLLER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.fake_worker:
        fake_worker(int(a.fake_worker[0]), a.fake_worker[1])
        return
    from tests import procs

    c = procs.controller().start()
    c.wait()
    port = procs.free_port()
    import subprocess

    w = subprocess.Popen([sys.executable, __file__, "--fake-worker", str(port), c.url])
    g = procs.gateway(c.url).start()
    try:
        g.wait(ok=procs.gateway_has_models)
        pids = {"gateway": g.proc.pid, "controller": c.proc.pid, "stand_in_worker": w.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        out = asyncio.run(drive(g.url, a.users, a.tokens, a.rounds))
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        out["gateway_cpu_us_per_token"] = round(cpu["gateway"] / out["tokens"] * 1e6, 1)
        requests = a.users * a.rounds  # with --tokens 2: the per-request costs (dispatch, stream set-up) dominate
        out["cpu_ms_per_request"] = {k: round(v / requests * 1000, 2) for k, v in cpu.items()}
        print(json.dumps({"users": a.users, "tokens_per_request": a.tokens, "rounds": a.rounds, **out}))
    except Exception:
        print(g.logs()[-3000:], file=sys.stderr)
        raise
    finally:
        g.stop()
        w.terminate()
        w.wait(timeout=10)
        c.stop()


if __name__ == "__main__":
    main()
