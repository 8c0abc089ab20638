"""Offline engine throughput and batch-1 decode, with transformers baselines measured in the same run.

Workload (issue: engine): LLaMA-7B shape (dim 4096, 32 heads, 32 layers, vocab 32000, 2048 context),
random bf16 weights, N requests with prompts uniform in [min_prompt, max_prompt] tokens, `output` new
tokens each, EOS ignored. Prints one JSON object.

    python benchmarks/engine_offline.py                      # on a GPU: the full workload
    python benchmarks/engine_offline.py --shape tiny --requests 32 --device cpu   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatserve.protocol.sampling import SamplingParams  # noqa: E402
from worker.engine import triton_kernels  # noqa: E402  (imports no triton until a kernel is built)
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.model import LlamaConfig, LlamaModel, Linear  # noqa: E402
from worker.engine.model_runner import CacheConfig, ModelRunner  # noqa: E402

SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16),
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
}


class NumberTokenizer:
    def decode(self, ids, skip_special_tokens=True):  # noqa: ARG002
        return "".join(f" t{i}" for i in ids)


def hf_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    cfg = HFConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_batch1(model, device: str, prompt_len: int, new: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        sync(device)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync(device)
    return (new - 1) / (time.perf_counter() - t0 - prefill)


def hf_continuous(model, prompts: list[list[int]], new: int, device: str) -> dict:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    sync(device)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"output_tokens": tokens, "seconds": round(dt, 2), "output_tok_s": round(tokens / dt, 1)}


def our_model(hf, device: str, dtype: torch.dtype) -> LlamaModel:
    """chatserve's model with the weights of a transformers one (built on the meta device: no second init)."""
    from worker.engine.model import rope_inv_freq

    cfg = LlamaConfig.from_hf(hf.config)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.load_hf_state_dict(hf.state_dict())
    return model


def build_engine(model: LlamaModel, max_num_seqs: int, budget: int, graphs: bool, cpu_tokens: int,
                 kv_dtype: str = "auto") -> LLMEngine:
    runner = ModelRunner(model, CacheConfig(block_size=16, cpu_cache_tokens=cpu_tokens, dtype=kv_dtype), max_num_seqs, 2048,
                         use_cuda_graphs=graphs)
    return LLMEngine(runner, NumberTokenizer(), max_num_seqs=max_num_seqs, max_batched_tokens=budget)


def engine_batch1(engine: LLMEngine, vocab: int, prompt_len: int, new: int) -> float:
    prompt = workload(1, prompt_len, prompt_len, vocab, seed=1)[0]
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.add_request("warm", prompt, params)
    while engine.has_unfinished():
        engine.step()
    engine.add_request("b1", [t + 1 for t in prompt], params)
    engine.step()  # prefill + first token
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (new - 1) / (time.perf_counter() - t0)


def batch1_ablations(model: LlamaModel, vocab: int, cpu_cache_tokens: int) -> dict[str, float]:
    """Batch-1 decode tok/s with the GEMV or cuBLAS for the one-row matmuls, running ahead or reading each
    step back before the next (one-sequence engines: only the batch-1 graph is captured)."""
    out = {}
    for gemv in (True, False):
        Linear.use_gemv = gemv
        engine = build_engine(model, 1, 2048, True, cpu_cache_tokens, "auto")
        for ahead in (True, False):
            engine.overlap = ahead
            name = f"{'gemv' if gemv else 'cublas'}_{'run_ahead' if ahead else 'read_back_each_step'}"
            out[name] = round(engine_batch1(engine, vocab, 128, 128), 1)
        del engine
        gc.collect()
    Linear.use_gemv = True
    return out


def engine_offline(engine: LLMEngine, prompts: list[list[int]], new: int) -> dict:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    tokens = 0
    split = {"decode_steps": 0, "decode_s": 0.0, "mixed_steps": 0, "mixed_s": 0.0}
    while engine.has_unfinished():
        ts = time.perf_counter()
        tokens += len(engine.step())
        kind = "decode" if engine.last_step_decode_only else "mixed"
        split[f"{kind}_steps"] += 1
        split[f"{kind}_s"] += time.perf_counter() - ts
    dt = time.perf_counter() - t0
    split = {k: round(v, 2) for k, v in split.items()}
    return {"output_tokens": tokens, "seconds": round(dt, 2), "output_tok_s": round(tokens / dt, 1),
            "preemptions": engine.scheduler.num_preemptions, **split}


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=8192, help="tokens per engine step")
    ap.add_argument("--baselines", default="batch1,continuous", help="comma list: batch1, continuous, none")
    ap.add_argument("--baseline-requests", type=int, default=0, help="requests for the HF continuous baseline (0 = all)")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--batch1-ablations", action="store_true", help="batch-1 decode also with cuBLAS instead of the "
                    "GEMV and without running ahead (each step read back before the next), in the same run")
    ap.add_argument("--cpu-cache-tokens", type=int, default=65536)
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (bf16) or fp8; with fp8 the bf16 figures are "
                    "measured too, in the same run, as the baseline")
    ap.add_argument("--fp8-decode-config", default="", help="tile,warps,stages of the decode kernel over an fp8 "
                    "cache (e.g. a sweep's best from benchmarks/profile_step.py --sweep; default: the engine's)")
    a = ap.parse_args()
    if a.fp8_decode_config:
        tile, warps, stages = (int(x) for x in a.fp8_decode_config.split(","))
        triton_kernels.FP8_DECODE_CONFIG.update(tile=tile, num_warps=warps, num_stages=stages)
    dtype = torch.bfloat16
    result: dict = {"shape": a.shape, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "torch": torch.__version__, "requests": a.requests, "prompt_range": [a.min_prompt, a.max_prompt],
                    "output_tokens_each": a.output}
    if a.kv_cache_dtype == "fp8":
        result["fp8_decode_config"] = dict(triton_kernels.FP8_DECODE_CONFIG)
    hf = hf_model(a.shape, dtype, a.device)
    prompts = workload(a.requests, a.min_prompt, a.max_prompt, hf.config.vocab_size)
    baselines = set(a.baselines.split(","))
    if "batch1" in baselines:
        result["hf_batch1_decode_tok_s"] = round(hf_batch1(hf, a.device, 128, 128), 1)
    if "continuous" in baselines:
        subset = prompts[: a.baseline_requests or len(prompts)]
        try:
            result["hf_generate_batch"] = {"requests": len(subset), **hf_continuous(hf, subset, a.output, a.device)}
        except Exception as exc:  # noqa: BLE001 - report, keep measuring ours
            result["hf_generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    model = our_model(hf, a.device, dtype)
    cfg = model.cfg
    del hf
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()
        result["gpu_allocated_gib_before_engine"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)  # baselines survive a later failure
    if a.batch1_ablations:
        result["batch1_ablations"] = batch1_ablations(model, cfg.vocab_size, a.cpu_cache_tokens)
        print(json.dumps(result), flush=True)
    kv_dtypes = ["auto", "fp8"] if a.kv_cache_dtype == "fp8" else ["auto"]
    for kv in kv_dtypes:
        engine = build_engine(model, a.max_num_seqs, a.budget, not a.no_graphs, a.cpu_cache_tokens, kv)
        key = "" if kv == "auto" else "fp8kv_"
        result[f"{key}kv_cache_tokens"] = engine.runner.capacity_tokens
        result[f"{key}kv_cache_full_2048_seqs"] = round(engine.runner.capacity_tokens / 2048, 1)
        result[f"{key}chatserve_batch1_decode_tok_s"] = round(engine_batch1(engine, cfg.vocab_size, 128, 128), 1)
        print(json.dumps(result), flush=True)
        result[f"{key}chatserve_offline"] = engine_offline(engine, prompts, a.output)
        del engine
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if "fp8kv_chatserve_offline" in result:
        result["ratio_fp8kv_vs_bf16kv_offline"] = round(result["fp8kv_chatserve_offline"]["output_tok_s"]
                                                        / result["chatserve_offline"]["output_tok_s"], 2)
    ours = result["chatserve_offline"]["output_tok_s"]
    if "hf_batch1_decode_tok_s" in result:
        result["ratio_batch1_vs_hf"] = round(result["chatserve_batch1_decode_tok_s"] / result["hf_batch1_decode_tok_s"], 2)
    hb = result.get("hf_generate_batch", {})
    if "output_tok_s" in hb:
        result["ratio_offline_vs_hf_generate_batch"] = round(ours / hb["output_tok_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
