"""Tensor parallelism on one host's GPUs (device kind nvidia-h100-x4).

    python benchmarks/tensor_parallel.py --check          # 7B shape, fp32: greedy with TP=2 == TP=1
    python benchmarks/tensor_parallel.py --speed --tp 4   # 65B shape, bf16: batch-1 decode and the 512-request
                                                          # (add --graphs for decode CUDA graphs: experimental)
                                                          # workload of benchmarks/engine_offline.py
Prints JSON; random weights (each rank generates only its own slice).
"""

from __future__ import annotations

import argparse
import gc
import logging
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_offline import NumberTokenizer, engine_batch1, engine_offline, workload  # noqa: E402
from benchmarks.quant_decode import config  # noqa: E402  (LLaMA-1 shapes 7B..65B)
from chatserve.protocol.sampling import SamplingParams  # noqa: E402
from worker.engine import tensor_parallel as tp  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.model import LlamaConfig  # noqa: E402
from worker.engine.model_runner import CacheConfig, ModelRunner  # noqa: E402

def runner_for(world: int, cfg: LlamaConfig, dtype: torch.dtype, max_num_seqs: int, graphs: bool,
               util: float = 0.8) -> ModelRunner:
    # 0.8: NCCL's buffers and the captured all-reduces need room beside the KV cache
    cache = CacheConfig(block_size=16, gpu_memory_utilization=util)
    source = tp.ShardSource(cfg, dtype)
    if world == 1:
        return ModelRunner(source.build(1, 0, torch.device("cuda", 0)), cache, max_num_seqs, 2048, graphs)
    return tp.start(world, source, cache, max_num_seqs, 2048, graphs)


def greedy(runner: ModelRunner, prompts: list[list[int]], n: int) -> dict[str, list[int]]:
    engine = LLMEngine(runner, NumberTokenizer(), max_num_seqs=16, max_batched_tokens=2048)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return out


def release(runner: ModelRunner) -> None:
    if isinstance(runner, tp.TensorParallelRunner):
        runner.close()
    del runner
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--graphs", action="store_true", help="decode CUDA graphs with captured all-reduces (experimental: "
                    "multi-sequence runs hung on 4x H100)")
    ap.add_argument("--no-graphs", action="store_true", help="(the default)")
    a = ap.parse_args()
    graphs = a.graphs and not a.no_graphs
    out: dict = {"device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}", "cuda_graphs": graphs}
    if a.check:
        cfg = config("7B")
        prompts = workload(6, 20, 400, cfg.vocab_size, seed=3)
        results = {}
        for world in (1, 2):
            runner = runner_for(world, cfg, torch.float32, 8, graphs)
            results[world] = greedy(runner, prompts, 32)
            release(runner)
            del runner  # before the next one is built
        same = sum(results[1][k] == results[2][k] for k in results[1])
        out["check_7b_fp32"] = {"requests": len(prompts), "tokens_each": 32, "identical_requests": same,
                                "equal": same == len(prompts)}
        print(json.dumps(out), flush=True)
    if a.speed:
        cfg = config("65B")
        runner = runner_for(a.tp, cfg, torch.bfloat16, 256, graphs)
        engine = LLMEngine(runner, NumberTokenizer(), max_num_seqs=256, max_batched_tokens=8192)
        t0 = time.perf_counter()
        b1 = engine_batch1(engine, cfg.vocab_size, 128, 128)
        weights_gb = 2 * (2 * cfg.vocab_size * cfg.hidden_size + cfg.num_layers * (
            4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size)) / 1e9
        bw = 3.35e12 * a.tp  # H100 SXM HBM3, per card
        out["speed_65b_bf16"] = {
            "tp": a.tp, "kv_capacity_tokens_per_rank_cache": runner.capacity_tokens,
            "batch1_tok_s": round(b1, 1),
            "batch1_bandwidth_ceiling_tok_s": round(bw / (weights_gb * 1e9), 1),
            "batch1_share_of_ceiling": round(b1 / (bw / (weights_gb * 1e9)), 2)}
        print(json.dumps(out), flush=True)
        prompts = workload(a.requests, 64, 1024, cfg.vocab_size)
        out["speed_65b_bf16"]["offline"] = engine_offline(engine, prompts, 128)
        out["speed_65b_bf16"]["seconds_total"] = round(time.perf_counter() - t0, 1)
        release(runner)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
