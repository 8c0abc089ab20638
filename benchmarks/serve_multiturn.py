"""Multi-turn serving benchmark through the gateway over HTTP (streaming, history resent every turn).

U concurrent users each hold a T-turn conversation; every turn asks for `--tokens` new tokens (EOS ignored,
so every run generates the same amount). Prints JSON: per user count, aggregate output tok/s, and per turn
TTFT and inter-token latency p50/p99. Starts its own controller, worker and gateway on free ports unless
--api-url is given.

    python benchmarks/serve_multiturn.py --users 1,8 --turns 3 --tokens 64
    python benchmarks/serve_multiturn.py --users 1,8 --turns 5 --tokens 32 --system-tokens 500 --rounds 5
                                                                              # prefix-cache check
    python benchmarks/serve_multiturn.py --users 64,64 --profile prof/   # the last run under py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPICS = ["the sea", "mountains", "bread", "trains", "the moon", "music", "gardens", "rain", "cities", "birds",
          "rivers", "winter", "coffee", "books", "bridges", "clocks"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def system_prompt(tokens: int) -> str:
    if tokens <= 0:
        return ""
    sentence = "You are a careful assistant who answers briefly and politely, citing facts when you can. "
    return (sentence * (tokens // 17 + 1)).strip()


WARM_UP_UID = 10_000


def user_message(uid: int, turn: int) -> dict[str, str]:
    """User `uid`'s message at `turn` (from 0): the same conversations over HTTP and in-process. The warm-up
    conversation's message shares no wording with the measured ones: it leaves the system prompt in the
    prefix cache, as other users of a host would, and no part of a first message (which later turns,
    following an answer, could never reuse: their TTFT would be compared with a turn 1 that prefills less)."""
    if uid == WARM_UP_UID:
        return {"role": "user", "content": "Hello!"}
    topic = TOPICS[(uid * 3 + turn) % len(TOPICS)]
    return {"role": "user", "content": f"Tell me something about {topic}. (user {uid}, turn {turn + 1})"}


def turn_result(uid: int, turn: int, t0: float, stamps: list[float], completion: int, prompt: int,
                cached: int) -> dict:
    """One answered turn: TTFT and inter-token gaps from the arrival times of its text, and its usage."""
    return {"user": uid, "turn": turn + 1, "ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "completion_tokens": completion,
            "prompt_tokens": prompt, "cached_tokens": cached}


async def user(client: httpx.AsyncClient, url: str, model: str, uid: int, turns: int, tokens: int, system: str,
               results: list[dict]) -> None:
    history = [{"role": "system", "content": system}] if system else []
    for turn in range(turns):
        history.append(user_message(uid, turn))
        body = {"model": model, "messages": history, "stream": True, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        stamps: list[float] = []
        parts: list[str] = []
        usage = {}
        async with client.stream("POST", url + "/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices", []):
                    if ch["delta"].get("content"):
                        stamps.append(time.perf_counter())
                        parts.append(ch["delta"]["content"])
        history.append({"role": "assistant", "content": "".join(parts)})
        results.append(turn_result(uid, turn, t0, stamps, usage.get("completion_tokens", 0),
                                   usage.get("prompt_tokens", 0),
                                   usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)))


async def _converse(url: str, model: str, uids: list[tuple[int, ...]], turns: int, tokens: int, system: str,
                    rounds: int, ready=None) -> tuple[list[dict], list[tuple[float, float]]]:
    """`rounds` runs, one after another, of one conversation per entry of `uids` (its user id in each
    round); `ready()` (a barrier across client processes) is awaited before each round. Returns the turns
    answered and each round's (start, end) wall-clock time."""
    results: list[dict] = []
    spans: list[tuple[float, float]] = []
    # a client per user, as U people in browsers or scripts have: one client shared by U streams spends its
    # time in httpx's connection-pool scans (quadratic in open connections) and the benchmark measures itself
    tls = ssl.create_default_context()
    clients = [httpx.AsyncClient(timeout=httpx.Timeout(600.0), verify=tls) for _ in uids]
    try:
        for r in range(rounds):
            if ready is not None:
                await asyncio.to_thread(ready)
            t0 = time.time()
            await asyncio.gather(*(user(client, url, model, uid[r], turns, tokens, system, results)
                                   for client, uid in zip(clients, uids)))
            spans.append((t0, time.time()))
    finally:
        for c in clients:
            await c.aclose()
    return results, spans


def _client_process(url: str, model: str, uids: list[tuple[int, ...]], turns: int, tokens: int, system: str,
                    rounds: int, barrier, out) -> None:
    try:
        out.put(asyncio.run(_converse(url, model, uids, turns, tokens, system, rounds, barrier.wait)))
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        barrier.abort()
        out.put(exc)


def run_users(url: str, model: str, users: int, turns: int, tokens: int, system: str,
              first_uid: int = 0, rounds: int = 1, procs: int = 1) -> dict:
    """`rounds` runs of `users` concurrent conversations, one after another (new conversations each
    round): the per-turn percentiles then rest on users x rounds samples, not on `users` alone.

    `procs` > 1 spreads the users over that many client processes (started together each round), so that the
    measuring client is never what limits the figure (on the 16-core H100 host, 64 users in one process and in
    eight measured the same: `serve_multiturn_h100_session7.json`)."""
    uids = [tuple(first_uid + r * users + u for r in range(rounds)) for u in range(users)]
    procs = max(1, min(procs, users))
    if procs == 1:
        results, spans = asyncio.run(_converse(url, model, uids, turns, tokens, system, rounds))
        return summarize(results, users, rounds, turns, tokens, sum(b - a for a, b in spans))
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_client_process, args=(url, model, uids[i::procs], turns, tokens, system, rounds,
                                                         barrier, out), daemon=True) for i in range(procs)]
    for p in workers:
        p.start()
    parts = [out.get() for _ in workers]
    for p in workers:
        p.join()
    for part in parts:
        if isinstance(part, BaseException):
            raise part
    results = [r for res, _ in parts for r in res]
    wall = sum(max(spans[r][1] for _, spans in parts) - min(spans[r][0] for _, spans in parts)
               for r in range(rounds))
    out_ = summarize(results, users, rounds, turns, tokens, wall)
    out_["client_processes"] = procs
    return out_


def summarize(results: list[dict], users: int, rounds: int, turns: int, tokens: int, wall: float) -> dict:
    out_tokens = sum(r["completion_tokens"] for r in results)
    per_turn = {}
    for t in range(1, turns + 1):
        rs = [r for r in results if r["turn"] == t]
        itl = [x for r in rs for x in r["itl"]]
        per_turn[t] = {"ttft_p50_s": round(pct([r["ttft"] for r in rs], 0.5), 3),
                       "ttft_p99_s": round(pct([r["ttft"] for r in rs], 0.99), 3),
                       "itl_p50_ms": round(1000 * pct(itl, 0.5), 1), "itl_p99_ms": round(1000 * pct(itl, 0.99), 1),
                       "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in rs)),
                       "cached_tokens_mean": round(statistics.mean(r["cached_tokens"] for r in rs))}
    return {"users": users, "rounds": rounds, "turns": turns, "tokens_per_turn": tokens, "wall_s": round(wall, 2),
            "output_tokens": out_tokens, "output_tok_s": round(out_tokens / wall, 1),
            "ttft_mean_s": round(statistics.mean(r["ttft"] for r in results), 3), "per_turn": per_turn}


def run_offline(engine, loaded, renderer, users: int, turns: int, tokens: int, system: str, first_uid: int = 0,
                rounds: int = 1) -> dict:
    """The same conversations as `run_users`, straight through the worker's engine in this process: each
    turn's prompt goes through the worker's own `prepare` (template, stops), a user's next turn is added
    the moment its reply ends, and time stamps are taken as each step returns. This is the HTTP path's
    baseline: the same workload and engine settings, without the network, the gateway and the event loop."""
    from chatserve.protocol.internal import GenerateRequest, Message
    from chatserve.protocol.sampling import SamplingParams
    from worker.app import prepare

    results: list[dict] = []
    wall = 0.0
    for r in range(rounds):
        uids = [first_uid + r * users + u for u in range(users)]
        history = {u: ([{"role": "system", "content": system}] if system else []) for u in uids}
        turn = dict.fromkeys(uids, 0)
        live: dict[str, dict] = {}

        def submit(u: int) -> None:
            history[u].append(user_message(u, turn[u]))
            req = GenerateRequest(request_id=f"u{u}t{turn[u]}", messages=[Message(**m) for m in history[u]],
                                  params=SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
            ids, _, params = prepare(req, loaded, renderer)
            engine.add_request(req.request_id, ids, params)
            live[req.request_id] = {"user": u, "t0": time.perf_counter(), "stamps": [], "parts": []}

        t0 = time.perf_counter()
        for u in uids:
            submit(u)
        while live:
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                st = live[o.request_id]
                if o.text:
                    st["stamps"].append(now)
                    st["parts"].append(o.text)
                if o.finished:
                    del live[o.request_id]
                    u = st["user"]
                    results.append(turn_result(u, turn[u], st["t0"], st["stamps"], o.completion_tokens,
                                               o.prompt_tokens, o.cached_tokens))
                    history[u].append({"role": "assistant", "content": "".join(st["parts"])})
                    turn[u] += 1
                    if turn[u] < turns:
                        submit(u)
        wall += time.perf_counter() - t0
    return summarize(results, users, rounds, turns, tokens, wall)


def profiled(pids: dict[str, int], out_dir: str, tag: str) -> list[subprocess.Popen]:
    """py-spy (sampling, non-blocking) on each named process until `stop_profiles`; raw folded stacks land in
    out_dir/<name>_<tag>.txt. Nothing happens without py-spy on PATH."""
    spy = shutil.which("py-spy")
    if not spy:
        print("--profile: py-spy not found on PATH", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    spies = []
    for name, pid in pids.items():
        if not pid:
            continue
        with open(os.path.join(out_dir, f"{name}_{tag}.log"), "w") as log:  # py-spy keeps its own copy
            spies.append(subprocess.Popen([spy, "record", "--nonblocking", "-r", "200", "-f", "raw", "-p", str(pid),
                                           "-o", os.path.join(out_dir, f"{name}_{tag}.txt")],
                                          stdout=subprocess.DEVNULL, stderr=log))
    return spies


def stop_profiles(spies: list[subprocess.Popen]) -> None:
    for p in spies:
        p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for p in spies:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def first_uids(counts: list[int], rounds: int) -> list[int]:
    """Each run's first user id: every run holds conversations of its own. (A run that repeated an earlier
    run's conversations would find their history in the prefix cache. In-process the repeat is exact, so it
    does; over HTTP, arrival times shape the batches and, with random weights' near-tied logits, the
    answers, so it mostly does not: the in-process runs after the first measured up to 15% faster.)"""
    starts, uid = [], 0
    for users in counts:
        starts.append(uid)
        uid += users * rounds
    return starts


def client_procs(spec: str, counts: list[int]) -> list[int]:
    auto = [max(1, min(-(-u // 8), (os.cpu_count() or 2) // 2)) for u in counts]
    if spec == "auto":
        return auto
    given = [int(x) for x in spec.split(",")]
    if len(given) == 1:
        return given * len(counts)
    if len(given) != len(counts):
        raise SystemExit("--client-procs: one value, or one per --users entry")
    return given


def gateway_ttft(url: str) -> tuple[float, float] | None:
    """(sum, count) of the gateway's time-to-first-token histogram, all models together."""
    try:
        text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    total = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for kind in total:
            if line.startswith(f"chatserve:time_to_first_token_seconds_{kind}{{"):
                total[kind] += float(line.rsplit(" ", 1)[1])
    return total["sum"], total["count"]


def start_stack(extra_worker_args: list[str]):
    from tests import procs

    c = procs.controller().start()
    c.wait()
    w = procs.worker(c.url, *extra_worker_args).start()
    g = procs.gateway(c.url).start()
    w.wait(ok=procs.worker_registered, timeout=600)
    g.wait(ok=procs.gateway_has_models)
    return [g, w, c], g.url + "/v1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--api-url", default="")
    ap.add_argument("--model", default="")
    ap.add_argument("--users", default="1,8")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="conversations per user, one after another (more "
                    "samples per turn for the percentiles)")
    ap.add_argument("--worker-args", default="", help="extra worker flags when the script starts the stack")
    ap.add_argument("--show-logs", action="store_true", help="print the services' warnings at the end")
    ap.add_argument("--profile", default="", help="a folder: py-spy records gateway, worker, engine process and "
                    "this client during the last run (needs py-spy on PATH and the stack started here)")
    ap.add_argument("--client-procs", default="auto", help="client processes per run (one value, or one per "
                    "--users entry); auto: one per 8 users, at most half the CPUs")
    ap.add_argument("--offline", action="store_true", help="then run the same conversations through the worker's "
                    "engine in this process (same --worker-args), after the stack has stopped: the HTTP runs' "
                    "baseline, measured in the same run")
    a = ap.parse_args()
    services = []
    url = a.api_url
    if not url:
        services, url = start_stack(a.worker_args.split())
    try:
        model = a.model or httpx.get(url + "/models").json()["data"][0]["id"]
        system = system_prompt(a.system_tokens)
        # warm-up: a conversation no measured user holds, so turn 1 finds the system prompt cached (as on a
        # serving host) but not its own first message
        run_users(url, model, 1, 1, 8, system, first_uid=WARM_UP_UID)
        report = {"model": model, "api_url": url, "system_prompt_tokens_approx": a.system_tokens, "runs": []}
        pids = {}
        if a.profile and services:
            g, w, c = services
            engine_pid = httpx.get(w.url + "/status").json().get("engine_pid")
            pids = {"gateway": g.proc.pid, "worker": w.proc.pid, "engine": engine_pid, "controller": c.proc.pid,
                    "client": os.getpid()}  # the client: only when it is this process (--client-procs 1)
        counts = [int(x) for x in a.users.split(",")]
        procs = client_procs(a.client_procs, counts)
        starts = first_uids(counts, a.rounds)
        for i, u in enumerate(counts):
            # only the last run is profiled: list a user count twice for its figure and its profile
            spies = profiled(pids, a.profile, f"run{i}_{u}users") if pids and i == len(counts) - 1 else []
            t_start = time.time()
            try:
                ttft0 = gateway_ttft(url)
                run = run_users(url, model, u, a.turns, a.tokens, system, first_uid=starts[i], rounds=a.rounds,
                                procs=procs[i])
                ttft1 = gateway_ttft(url)
                if ttft0 and ttft1 and ttft1[1] > ttft0[1]:
                    # from the gateway's receipt of each request to its first token leaving: the server's share
                    run["gateway_ttft_mean_s"] = round((ttft1[0] - ttft0[0]) / (ttft1[1] - ttft0[1]), 3)
            finally:
                stop_profiles(spies)
            if spies:
                run["profiled"] = True
                run["unix_time"] = [round(t_start, 3), round(time.time(), 3)]
            report["runs"].append(run)
    finally:
        for s in services:
            s.stop()
        if a.show_logs:
            for s in services:
                lines = [ln for ln in s.logs().splitlines() if "WARNING" in ln or "ERROR" in ln]
                print(f"--- {s.name}: {len(lines)} warnings\n" + "\n".join(lines[-25:]), file=sys.stderr)
    if a.offline:
        report["offline_runs"] = offline_runs(a, system)
        ratios: dict[str, float] = {}
        for i, (r, o) in enumerate(zip(report["runs"], report["offline_runs"])):
            key = str(r["users"]) if str(r["users"]) not in ratios else f"{r['users']} (run {i + 1})"
            ratios[key + (", profiled" if r.get("profiled") else "")] = round(r["output_tok_s"] / o["output_tok_s"], 2)
        report["http_over_offline"] = ratios
    for key in ("runs", "offline_runs"):
        runs = report.get(key, [])
        for r in runs:
            last = r["per_turn"][a.turns]["ttft_p50_s"]
            r["ttft_last_over_first_turn_p50"] = round(last / r["per_turn"][1]["ttft_p50_s"], 2)
    runs = report["runs"]
    if len(runs) > 1:
        report["scaling_vs_first"] = {r["users"]: round(r["output_tok_s"] / runs[0]["output_tok_s"], 2) for r in runs}
    print(json.dumps(report, indent=1))


def offline_runs(a: argparse.Namespace, system: str) -> list[dict]:
    from chatserve.settings import WorkerSettings
    from worker.app import build_engine, warm_up
    from worker.prompting import PromptRenderer

    settings = WorkerSettings.from_args(["--kv-cache-tokens", "16384", *a.worker_args.split()], env={})  # as procs.worker
    loaded, engine = build_engine(settings)
    warm_up(engine)
    renderer = PromptRenderer(loaded.tokenizer, loaded.name, settings.chat_template)
    run_offline(engine, loaded, renderer, 1, 1, 8, system, first_uid=WARM_UP_UID)  # warm-up, as for HTTP
    counts = [int(u) for u in a.users.split(",")]
    return [run_offline(engine, loaded, renderer, u, a.turns, a.tokens, system, first_uid=start, rounds=a.rounds)
            for u, start in zip(counts, first_uids(counts, a.rounds))]

if __name__ == "__main__":
    main()
