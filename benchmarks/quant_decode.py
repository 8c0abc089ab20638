"""Weight-only quantization on the GPU: weight memory and batch-1 (and batch-8) decode speed of bf16,
int8 and int4 in the LLaMA-7B shape (random weights time exactly like real ones), all in one run, plus the
memory table: weights of 7B / 13B / 33B / 65B x bf16 / int8 / int4, measured on the GPU where they fit
(models are built and quantized layer by layer, so the bf16 copy never has to fit), computed where not.

    python benchmarks/quant_decode.py > benchmarks/results/quant_h100.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_offline import NumberTokenizer, workload  # noqa: E402
from chatserve.protocol.sampling import SamplingParams  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.model import LlamaConfig, LlamaModel, rope_inv_freq  # noqa: E402
from worker.engine.model_runner import CacheConfig, ModelRunner  # noqa: E402
from worker.engine.quant import DEFAULT_INT4_GROUP, QuantLinear  # noqa: E402

SIZES = {  # LLaMA-1 shapes: (dim, layers, heads, ffn)
    "7B": (4096, 32, 32, 11008),
    "13B": (5120, 40, 40, 13824),
    "33B": (6656, 60, 52, 17920),
    "65B": (8192, 80, 64, 22016),
}


def config(size: str) -> LlamaConfig:
    dim, layers, heads, ffn = SIZES[size]
    return LlamaConfig(vocab_size=32000, hidden_size=dim, intermediate_size=ffn, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=dim // heads, max_position_embeddings=2048)


@torch.no_grad()
def build(cfg: LlamaConfig, mode: str) -> LlamaModel:
    """Random weights on the GPU, quantized one layer at a time (peak: one bf16 layer over the rest)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    for name in ("embed_tokens", "norm", "lm_head"):
        getattr(model, name).to_empty(device="cuda")
    model.inv_freq = rope_inv_freq(cfg).cuda()
    model.to(torch.bfloat16)
    model.embed_tokens.weight.normal_(std=0.02)
    model.lm_head.weight.normal_(std=0.02)
    model.norm.weight.fill_(1.0)
    for layer in model.layers:
        layer.to_empty(device="cuda")
        layer.to(torch.bfloat16)
        for pname, p in layer.named_parameters():
            p.fill_(1.0) if "norm" in pname else p.normal_(std=0.02)
        if mode != "bf16":
            a, m = layer.self_attn, layer.mlp
            a.qkv_proj, a.o_proj = QuantLinear(a.qkv_proj, mode), QuantLinear(a.o_proj, mode)
            m.gate_up_proj, m.down_proj = QuantLinear(m.gate_up_proj, mode), QuantLinear(m.down_proj, mode)
    return model.eval()


def computed_bytes(cfg: LlamaConfig, mode: str) -> int:
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    linear = n * (4 * d * d + 3 * d * f)
    other = 2 * cfg.vocab_size * d * 2 + (2 * n + 1) * d * 2  # embeddings + LM head + norms, bf16
    if mode == "bf16":
        return linear * 2 + other
    if mode == "int8":
        return linear + n * (4 * d + 2 * f + d) * 2 + other  # + one bf16 scale per output channel
    groups = n * (3 * d * (d // DEFAULT_INT4_GROUP) + d * (d // DEFAULT_INT4_GROUP) + 2 * f * (d // DEFAULT_INT4_GROUP)
                  + d * (f // DEFAULT_INT4_GROUP))
    return linear // 2 + groups * 4 + other  # + bf16 scale and zero per group of 128


def decode_speed(model: LlamaModel, batch: int, new: int = 256) -> float:
    runner = ModelRunner(model, CacheConfig(block_size=16, gpu_memory_utilization=0.9), 16, 2048)
    engine = LLMEngine(runner, NumberTokenizer(), max_num_seqs=16, max_batched_tokens=4096)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    for i, p in enumerate(workload(batch, 128, 128, 32000, seed=7)):
        engine.add_request(f"w{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    for i, p in enumerate(workload(batch, 128, 128, 32000, seed=8)):
        engine.add_request(f"r{i}", p, params)
    engine.step()  # prefill + first token
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return batch * (new - 1) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table-sizes", default="7B,13B,33B,65B")
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "decode_7B": {}, "memory_GB": {}}
    free_total = torch.cuda.mem_get_info()[1]
    for mode in ("bf16", "int8", "int4"):
        model = build(config("7B"), mode)
        weights = torch.cuda.memory_allocated() / 1e9
        out["decode_7B"][mode] = {"weights_GB": round(weights, 2),
                                  "batch1_tok_s": round(decode_speed(model, 1), 1),
                                  "batch8_tok_s": round(decode_speed(model, 8), 1)}
        print(mode, out["decode_7B"][mode], file=sys.stderr, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    base = out["decode_7B"]["bf16"]["batch1_tok_s"]
    for mode in ("int8", "int4"):
        out["decode_7B"][mode]["batch1_speedup_vs_bf16"] = round(out["decode_7B"][mode]["batch1_tok_s"] / base, 2)
    for size in [s for s in args.table_sizes.split(",") if s]:
        cfg = config(size)
        for mode in ("bf16", "int8", "int4"):
            est = computed_bytes(cfg, mode)
            row = {"computed": round(est / 1e9, 2)}
            if est < 0.92 * free_total:
                torch.cuda.reset_peak_memory_stats()
                model = build(cfg, mode)
                row["measured"] = round(torch.cuda.memory_allocated() / 1e9, 2)
                row["peak_while_building"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                del model
                gc.collect()
                torch.cuda.empty_cache()
            out["memory_GB"][f"{size} {mode}"] = row
            print(size, mode, row, file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
