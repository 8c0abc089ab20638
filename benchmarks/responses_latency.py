"""Non-streaming /v1/responses against /v1/chat/completions, the same questions, over HTTP on one platform
(controller, embedded-model worker, gateway as real processes): mean latency at 1 user (one request at a
time, the kinds in turn) and at 64 concurrent users (the kinds side by side in each batch of 64, so every
kind sees the same engine steps). Responses are stored (the API's default: one database write each) and,
as a third kind, not stored. The worker's prefix cache is off, so no kind is served from another's.
Prints one JSON object.

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


async def arm(url: str, kinds: list[str], tokens: int) -> dict[str, list[float]]:
    """One request per entry of `kinds`, all at once (user i asks question i // 3: each question once in
    each arm), and each kind's latencies."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*(one(client, k, u // 3, tokens) for u, k in enumerate(kinds)))
    out: dict[str, list[float]] = {}
    for kind, (t, _) in zip(kinds, results):
        out.setdefault(kind, []).append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="batches of 64 users (each kind a third of every batch)")
    ap.add_argument("--single-requests", type=int, default=4, help="requests of each kind per round at 1 user")
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
        asyncio.run(arm(g.url, list(kinds), 4))  # warm every path once
        # 1 user: one request at a time, the kinds in turn; 64 users: the three kinds side by side in one
        # batch (users 0, 3, 6, ... chat; 1, 4, 7, ... responses; ...), so all see the same engine steps and
        # what differs is each API's own path through the gateway
        for users in (1, 64):
            lat: dict[str, list[float]] = {k: [] for k in kinds}
            rounds = []
            for _ in range(a.rounds if users == 64 else a.rounds * a.single_requests):
                if users == 1:
                    for kind in kinds:
                        lat[kind] += asyncio.run(arm(g.url, [kind], a.tokens))[kind]
                else:
                    got = asyncio.run(arm(g.url, [kinds[u % 3] for u in range(users)], a.tokens))
                    rounds.append({k: round(statistics.mean(v), 3) for k, v in got.items()})
                    for k, v in got.items():
                        lat[k] += v
            res: dict = {k: {"mean_latency_s": round(statistics.mean(v), 4), "requests": len(v)} for k, v in lat.items()}
            base = res["chat"]["mean_latency_s"]
            for k in kinds[1:]:
                res[k]["ratio_vs_chat"] = round(res[k]["mean_latency_s"] / base, 3)
            if rounds:
                res["per_round_means_s"] = rounds
            out[f"users_{users}"] = res
            print(json.dumps(out), flush=True)
    finally:
        for s in (g, w, c):
            s.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
