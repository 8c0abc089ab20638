"""Non-streaming /v1/responses against /v1/chat/completions, the same conversations, over HTTP on one
platform (controller, embedded-model worker, gateway as real processes): mean and p50/p90 latency at 1 user
and at 64 concurrent users, alternating rounds so both see the same machine. Responses are stored (the
API's default: one database write each) and, in a third arm, not stored. The same questions in every arm,
the worker's prefix cache off. Prints one JSON object.

    python benchmarks/responses_latency.py                # 1 and 64 users, 32 tokens each
    python benchmarks/responses_latency.py --rounds 1     # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import procs  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def bodies(kind: str, user: int, tokens: int) -> tuple[str, dict]:
    # every arm asks the same questions (the same prompts, the same greedy replies: the same work); the
    # worker runs without its prefix cache, so no arm is served from another's
    question = f"User {user}: name a fruit and say why you like it."
    if kind == "chat":
        return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": question}],
                                        "max_tokens": tokens, "temperature": 0}
    return "/v1/responses", {"model": MODEL, "input": question, "max_output_tokens": tokens, "temperature": 0,
                             "store": kind == "responses"}


async def one(client: httpx.AsyncClient, kind: str, user: int, tokens: int) -> tuple[float, int]:
    path, body = bodies(kind, user, tokens)
    t0 = time.perf_counter()
    r = await client.post(path, json=body)
    r.raise_for_status()
    data = r.json()
    out = data["usage"]["completion_tokens"] if kind == "chat" else data["usage"]["output_tokens"]
    return time.perf_counter() - t0, out


async def arm(url: str, kind: str, users: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*(one(client, kind, u, tokens) for u in range(users)))
    lat = sorted(t for t, _ in results)
    return {"mean_s": statistics.mean(lat), "p50_s": lat[len(lat) // 2], "p90_s": lat[int(len(lat) * 0.9) - 1 if users > 1 else 0],
            "output_tokens": sum(n for _, n in results)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each arm per user count (each arm first in turn)")
    ap.add_argument("--single-requests", type=int, default=8, help="sequential requests per round at 1 user")
    a = ap.parse_args()
    c = procs.controller().start()
    c.wait()
    w = procs.worker(c.url, "--enable-prefix-caching", "false").start()  # else the default worker, as `make run`
    db = str(Path(tempfile.mkdtemp(prefix="bench-responses-")) / "r.sqlite3")
    g = procs.gateway(c.url, "--responses-db", db).start()
    kinds = ("chat", "responses", "responses_store_false")
    out: dict = {"machine": "this host (CPU)", "model": MODEL, "tokens": a.tokens, "rounds": a.rounds}
    try:
        w.wait(ok=procs.worker_registered, timeout=300)
        g.wait(ok=procs.gateway_has_models)
        for kind in kinds:  # warm every path once
            asyncio.run(arm(g.url, kind, 2, 4))
        for users in (1, 64):
            samples: dict[str, list[dict]] = {k: [] for k in kinds}
            for rnd in range(a.rounds):
                order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]  # each arm goes first in turn
                for kind in order:
                    if users == 1:
                        runs = [asyncio.run(arm(g.url, kind, 1, a.tokens)) for _ in range(a.single_requests)]
                        samples[kind].append({"mean_s": statistics.mean(r["mean_s"] for r in runs),
                                              "output_tokens": sum(r["output_tokens"] for r in runs)})
                    else:
                        samples[kind].append(asyncio.run(arm(g.url, kind, users, a.tokens)))
            res = {k: {"mean_latency_s": round(statistics.mean(s["mean_s"] for s in v), 4),
                       "output_tokens": sum(s["output_tokens"] for s in v)} for k, v in samples.items()}
            base = res["chat"]["mean_latency_s"]
            for k in kinds[1:]:
                res[k]["ratio_vs_chat"] = round(res[k]["mean_latency_s"] / base, 3)
            out[f"users_{users}"] = res
            print(json.dumps(out), flush=True)
    finally:
        for s in (g, w, c):
            s.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
