"""GPU diagnostics for the engine (LLaMA-7B shape, random weights): the paged-decode kernel's bandwidth
over tile/warp configurations, and the top CUDA kernels of one mixed (prefill) step and one decode step.

    python benchmarks/profile_step.py [--sweep] [--splits] [--no-steps]
    python benchmarks/profile_step.py --best-fp8 SWEEP_OUTPUT   # the fp8 sweep's best as tile,warps,stages

--splits: small batches (1..16) over 256..2048-token contexts, bf16 and fp8 caches: one program per
(sequence, head) against the split-context kernel (the engine's choice of splits and a few tile configs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_offline import NumberTokenizer, workload  # noqa: E402
from chatserve.protocol.sampling import SamplingParams  # noqa: E402
from worker.engine import triton_kernels  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.model import LlamaConfig  # noqa: E402
from worker.engine.model_runner import CacheConfig, ModelRunner  # noqa: E402
from worker.loader import random_model  # noqa: E402


def bench(fn, iters: int = 20) -> float:
    """Device time of one call: `iters` calls captured in a CUDA graph and replayed (small kernels timed
    with host launches measure the launch overhead, ~25 us a Triton launch, not the kernel)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1000


def decode_inputs(b: int, ctx: int, kv_dtype: torch.dtype = torch.bfloat16, h: int = 32, d: int = 128, bs: int = 16):
    nblocks = b * ctx // bs + 8
    k = torch.randn(nblocks * bs, h, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
    v = torch.randn(nblocks * bs, h, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
    q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(nblocks - 8, device="cuda").int()
    tables = perm[: b * (ctx // bs)].view(b, ctx // bs).contiguous()
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    return q, torch.empty_like(q), k, v, tables, lens, 2 * b * ctx * h * d * k.element_size()


def split_sweep() -> list[dict]:
    rows = []
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for b in (1, 2, 4, 8, 16):
            for ctx in (256, 1024, 2048):
                q, out, k, v, tables, lens, nbytes = decode_inputs(b, ctx, kv_dtype)
                auto = triton_kernels.decode_splits(b, q.shape[1], triton_kernels._num_sms(0))
                row = {"kv": str(kv_dtype).removeprefix("torch."), "batch": b, "ctx": ctx, "auto_splits": auto}
                for label, splits in (("one_pass", 1), ("auto", auto)):
                    t = bench(lambda: triton_kernels.paged_decode(out, q, k, v, tables, lens, 16, 0.088, splits=splits))
                    row[f"{label}_us"], row[f"{label}_GB_s"] = round(t * 1e6, 1), round(nbytes / t / 1e9)
                best = None
                for tile in (16, 32, 64):
                    for warps in (1, 2, 4):
                        cfg = {"tile": tile, "num_warps": warps, "num_stages": 2}
                        t = bench(lambda: triton_kernels.paged_decode(out, q, k, v, tables, lens, 16, 0.088, cfg,
                                                                      splits=max(2, auto)))
                        if best is None or t < best[0]:
                            best = (t, tile, warps)
                row["best_split_us"], row["best_split_tile_warps"] = round(best[0] * 1e6, 1), best[1:]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def decode_kernel_sweep(kv_dtype: torch.dtype, b: int, ctx: int) -> list[dict]:
    """One-pass decode configurations at a large batch (the 512-request workload runs ~256 sequences)."""
    q, out, k, v, tables, lens, bytes_read = decode_inputs(b, ctx, kv_dtype)
    rows = []
    for tile in (32, 64, 128):
        for warps in (1, 2, 4):
            for stages in (2, 3):
                cfg = {"tile": tile, "num_warps": warps, "num_stages": stages}
                try:
                    t = bench(lambda: triton_kernels.paged_decode(out, q, k, v, tables, lens, 16, 0.088, cfg, splits=1))
                except Exception as exc:  # noqa: BLE001
                    rows.append({**cfg, "error": str(exc)[:80]})
                    continue
                rows.append({**cfg, "us": round(t * 1e6, 1), "GB_s": round(bytes_read / t / 1e9)})
    return sorted([r for r in rows if "us" in r], key=lambda r: r["us"])[:5]


def profile_steps() -> dict:
    shape = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, max_position_embeddings=2048)
    cfg = LlamaConfig(**shape)
    model = random_model(cfg, device="cuda", dtype=torch.bfloat16)
    runner = ModelRunner(model, CacheConfig(block_size=16), 256, 2048)
    engine = LLMEngine(runner, NumberTokenizer(), max_num_seqs=256, max_batched_tokens=8192)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for i, p in enumerate(workload(160, 64, 1024, 32000)):
        engine.add_request(f"r{i}", p, params)
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label in ("mixed", "mixed2", "decode"):
        while label == "decode" and not engine.last_step_decode_only:
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            import time

            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50)
        out[label] = {"wall_ms": round(wall * 1000, 1), "decode_only": engine.last_step_decode_only,
                      "running": len(engine.scheduler.running)}
        print(f"=== {label} step: {out[label]}\n{table}", flush=True)
    # batch-1 decode: what the single-stream step spends on the device
    while engine.has_unfinished():
        engine.step()
    engine.add_request("solo", workload(1, 128, 128, 32000, seed=5)[0], SamplingParams(max_tokens=40, temperature=0,
                                                                                       ignore_eos=True))
    for _ in range(5):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print("=== batch-1 decode, 10 steps\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=16,
                                                                      max_name_column_width=60), flush=True)
    return out


def best_fp8(path: str) -> str:
    """tile,warps,stages of the fastest fp8 row in a --sweep output file (for engine_offline.py)."""
    rows = [json.loads(line) for line in open(path) if line.startswith('{"kv"')]
    b = next(r for r in rows if r["kv"] == "float8_e4m3fn" and "best" in r)["best"][0]
    return f"{b['tile']},{b['num_warps']},{b['num_stages']}"


if __name__ == "__main__":
    if "--best-fp8" in sys.argv:
        print(best_fp8(sys.argv[sys.argv.index("--best-fp8") + 1]))
        sys.exit()
    if "--splits" in sys.argv:
        split_sweep()
    if "--sweep" in sys.argv:
        for kv, b, ctx in ((torch.bfloat16, 128, 800), (torch.float8_e4m3fn, 256, 608), (torch.bfloat16, 256, 608)):
            best = decode_kernel_sweep(kv, b, ctx)
            print(json.dumps({"kv": str(kv).removeprefix("torch."), "batch": b, "ctx": ctx, "best": best}), flush=True)
    if "--no-steps" not in sys.argv:
        print(json.dumps(profile_steps()), flush=True)
