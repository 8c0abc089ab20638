"""Batch-1 decode: how much of a step is the GPU (one CUDA-graph replay) and how much is the host
(scheduling, input copies, sampling, detokenizing) around it, on the LLaMA-7B shape.

    python benchmarks/decode_overhead.py [--quantize int8|int4]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_offline import SHAPES, NumberTokenizer, workload  # noqa: E402
from chatserve.protocol.sampling import SamplingParams  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.model import LlamaConfig  # noqa: E402
from worker.engine.model_runner import CacheConfig, ModelRunner  # noqa: E402
from worker.engine.quant import quantize_model  # noqa: E402
from worker.loader import random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", default="")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="CUDA kernel times of one eager batch-1 decode step")
    a = ap.parse_args()
    s = SHAPES["7b"]
    cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                      num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                      num_kv_heads=s["num_key_value_heads"], head_dim=s["hidden_size"] // s["num_attention_heads"])
    model = random_model(cfg, device="cuda", dtype=torch.bfloat16)
    if a.quantize:
        quantize_model(model, a.quantize)
    runner = ModelRunner(model, CacheConfig(block_size=16), 16, 2048)
    engine = LLMEngine(runner, NumberTokenizer(), max_num_seqs=16, max_batched_tokens=4096)
    engine.add_request("r", workload(1, 128, 128, cfg.vocab_size)[0],
                       SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 10
    graph = runner.graphs[1]
    t0 = time.perf_counter()
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t0) * 10
    out = {"quantize": a.quantize or "bf16", "engine_step_ms": round(step_ms, 3), "graph_replay_ms": round(replay_ms, 3),
           "host_overhead_ms": round(step_ms - replay_ms, 3), "tok_s": round(1000 / step_ms, 1),
           "tok_s_if_no_overhead": round(1000 / replay_ms, 1)}
    print(json.dumps(out))
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile

        from worker.engine.attention import AttentionMetadata

        ids, pos, slots, lens = runner.g_packed[:4].view(4, 1).unbind(0)  # batch size 1's static inputs
        meta = AttentionMetadata(slots, 1, runner.g_tables[:1], lens, [], [], 16)
        step = lambda: model.logits(model.hidden(ids, pos, runner.kv_caches, meta))  # noqa: E731
        with torch.inference_mode():
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.self_device_time_total for e in events) / 10 / 1000
        print(f"GPU kernel time per eager decode step: {total:.3f} ms (graph replay {replay_ms:.3f} ms)")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            print(f"{e.self_device_time_total / 10 / 1000:8.3f} ms  {e.count // 10:5d}x  {e.key[:110]}")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            engine.step()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(22)
        print(buf.getvalue()[-5000:])


if __name__ == "__main__":
    main()
