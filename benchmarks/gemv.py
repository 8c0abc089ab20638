"""Batch-1 decode's matmuls on the GPU: cuBLAS (F.linear at one row) against the Triton GEMV over a sweep of
its tile configurations, for each weight shape of LLaMA-7B (q/k/v, o, gate/up, down, lm_head). Kernels are
timed inside CUDA graphs over 8 distinct weight copies (as 32 layers stream different weights: one matrix
replayed alone would sit partly in the 50 MB L2). Prints JSON: TB/s per shape and config.

    python benchmarks/gemv.py
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profile_step import bench
from worker.engine import triton_kernels

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}
COPIES = 8


def tb_s(fn, weights: list[torch.Tensor]) -> float:
    """Weight bytes streamed per second by fn(w) over all the weights, in TB/s."""
    def all_copies() -> None:
        for w in weights:
            fn(w)
    return sum(w.numel() * w.element_size() for w in weights) / bench(all_copies, iters=4) / 1e12


def main() -> None:
    torch.manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(), "shapes": {}}
    configs = [{"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": s}
               for bn, bk, w, s in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8), (1, 2))]
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(COPIES)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0]).float()

        row = {"cublas_tb_s": round(tb_s(lambda w: F.linear(x, w), ws), 3)}
        results = []
        for c in configs:
            if c["block_k"] > k:
                continue
            try:
                err = (triton_kernels.gemv(x, ws[0], c).float() - ref).abs().max().item()
                results.append((tb_s(lambda w, c=c: triton_kernels.gemv(x, w, c), ws), c, err))
            except Exception as e:  # a config that does not compile or fit
                print(f"{name} {c}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
        results.sort(key=lambda r: -r[0])
        row["triton_best"] = [{"tb_s": round(tb, 3), **c, "max_abs_err": round(err, 4)} for tb, c, err in results[:5]]
        row["triton_default_tb_s"] = round(tb_s(lambda w: triton_kernels.gemv(x, w), ws), 3)
        report["shapes"][name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
