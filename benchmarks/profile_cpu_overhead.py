"""Where the host time of engine steps goes (cProfile), for batch-1 decode and a large decode batch.

    python benchmarks/profile_cpu_overhead.py --shape 7b
"""

from __future__ import annotations

import argparse
import cProfile
import io
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
from worker.loader import random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    a = ap.parse_args()
    s = SHAPES[a.shape]
    cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                      num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                      num_kv_heads=s["num_key_value_heads"], head_dim=s["hidden_size"] // s["num_attention_heads"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(cfg, device=dev, dtype=torch.bfloat16)
    engine = LLMEngine(ModelRunner(model, CacheConfig(block_size=16), 256, 2048), NumberTokenizer(),
                       max_num_seqs=256, max_batched_tokens=8192)
    for batch in (1, 160):
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        for i, p in enumerate(workload(batch, 500, 600, cfg.vocab_size, seed=batch)):
            engine.add_request(f"{batch}-{i}", p, params)
        for _ in range(8):
            engine.step()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(30):
            engine.step()
        prof.disable()
        dt = (time.perf_counter() - t0) / 30
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(f"=== batch {batch}: {dt * 1000:.2f} ms per step (under cProfile)\n" + out.getvalue()[-4500:], flush=True)
        while engine.has_unfinished():
            engine.step()


if __name__ == "__main__":
    main()
