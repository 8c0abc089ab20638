"""What a large /v1/embeddings call does to running streams: 16 decoding streams while one request of 2,048
inputs is embedded, the whole request between two engine steps (the engine before) against a chunk of at
most one step's token budget between steps (now), in one run. Inter-token latency p50/p99/max of the
streams and the embedding request's own latency; in-process engine (the embedded model on a CPU, or a
random LLaMA shape on a GPU). Prints one JSON object.

    python benchmarks/embed_stall.py [--inputs 2048] [--streams 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatserve.protocol.sampling import SamplingParams  # noqa: E402


def run(engine, mode: str, streams: int, inputs: list[list[int]], tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    last: dict[str, float] = {}
    pairs: list[tuple[float, float]] = []  # (previous token, this token) of every stream
    for i in range(streams):
        prompt = [rng.randrange(100, 30000) for _ in range(rng.randint(32, 96))]
        engine.add_request(f"{mode}{seed}-{i}", prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    step, started, finished = 0, None, None
    while engine.has_unfinished():
        for o in engine.step():
            now = time.perf_counter()
            if o.request_id in last:
                pairs.append((last[o.request_id], now))
            last[o.request_id] = now
        step += 1
        if step == 5:
            started = time.perf_counter()
            if mode == "whole":
                engine.embed(inputs)
                finished = time.perf_counter()
            else:
                engine.add_embedding("e", inputs)
        if mode == "chunked" and engine.embed_jobs:
            if engine.embed_step() is not None:
                finished = time.perf_counter()
    assert started is not None and finished is not None
    gaps = sorted(b - a for a, b in pairs if b >= started and a <= finished)  # gaps the embedding overlapped
    return {"itl_ms_p50": round(statistics.median(gaps) * 1e3, 1),
            "itl_ms_p99": round(gaps[int(0.99 * (len(gaps) - 1))] * 1e3, 1), "itl_ms_max": round(gaps[-1] * 1e3, 1),
            "embedding_s": round(finished - started, 2), "gaps": len(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=2048)
    ap.add_argument("--input-tokens", type=int, default=12)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=400, help="each stream's length (outlasts the embedding)")
    a = ap.parse_args()
    from chatserve.settings import WorkerSettings
    from worker.app import build_engine, warm_up

    _, engine = build_engine(WorkerSettings.from_args([]))
    warm_up(engine)
    rng = random.Random(1)
    inputs = [[rng.randrange(100, 30000) for _ in range(a.input_tokens)] for _ in range(a.inputs)]
    engine.embed(inputs[:64])
    out = {"machine": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}",
           "streams": a.streams, "inputs": a.inputs, "input_tokens": a.input_tokens,
           "step_budget_tokens": engine.scheduler.max_batched_tokens,
           "whole": run(engine, "whole", a.streams, inputs, a.tokens, 0),
           "chunked": run(engine, "chunked", a.streams, inputs, a.tokens, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
