"""Scoring throughput: lm-evaluation-harness-style requests (echo + logprobs, max_tokens 1: every prompt
token's logprob from the prefill pass), against transformers' forward of the same prompts (batched, one
log_softmax + gather: what lm-eval's own HF backend does), in one run. Also the engine's plain prefill of
the same prompts (no scores) to show what scoring costs, and the largest logprob difference between the two
on the first prompts. Random weights in the given shape. Prints one JSON object.

    python benchmarks/scoring.py                                   # GPU: 512 prompts of 256 tokens, LLaMA-7B shape
    python benchmarks/scoring.py --shape tiny --requests 16 --device cpu   # smoke test anywhere
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

from benchmarks.engine_offline import SHAPES, build_engine, hf_model, our_model, sync, workload  # noqa: E402
from chatserve.protocol.sampling import SamplingParams  # noqa: E402


def hf_scores(model, prompts: list[list[int]], batch: int, device: str) -> tuple[float, list[list[float]]]:
    """Seconds to score every prompt (equal lengths: no padding), and the scores of the first batch."""
    first: list[list[float]] = []
    with torch.no_grad():
        warm = torch.tensor(prompts[:batch], device=device)
        model(warm).logits.float().log_softmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device=device)
            lp = model(ids).logits.float().log_softmax(-1)
            chosen = lp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
            if not first:
                first = chosen.tolist()
            del lp
        sync(device)
    return time.perf_counter() - t0, first


def engine_scores(engine, prompts: list[list[int]], scored: bool) -> tuple[float, dict[int, list[float]]]:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=1 if scored else None)
    got: dict[int, list[float]] = {}
    sync(str(engine.runner.device))
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}-{scored}", p, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                got[int(out.request_id[1:].split("-")[0])] = out.prompt_logprobs.logprobs[1:]
    sync(str(engine.runner.device))
    return time.perf_counter() - t0, got


def timed_parts(engine) -> dict[str, float]:
    """Wrap the runner's scoring pass and the engine's read-back with synchronized timers (a diagnostic
    run after the timed ones: the synchronizations cost the running ahead)."""
    spent = {"score_pass_s": 0.0, "read_back_s": 0.0, "forward_s": 0.0}
    runner = engine.runner
    dev = str(runner.device)

    def wrap(obj, name, key):
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            sync(dev)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(dev)
            spent[key] += time.perf_counter() - t0
            return out
        setattr(obj, name, timed)

    wrap(runner, "_score_prompts", "score_pass_s")
    wrap(engine, "_keep_scores", "read_back_s")
    wrap(runner.model, "hidden", "forward_s")
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--budget", type=int, default=8192, help="tokens per engine step")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    prompts = workload(a.requests, a.prompt, a.prompt, SHAPES[a.shape]["vocab_size"])
    tokens = a.requests * a.prompt
    result: dict = {"dtype": a.dtype, "shape": a.shape, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                    "torch": torch.__version__, "requests": a.requests, "prompt_tokens_each": a.prompt}
    hf = hf_model(a.shape, dtype, a.device)
    hf_s, hf_first = hf_scores(hf, prompts, a.hf_batch, a.device)
    result["hf_forward"] = {"batch": a.hf_batch, "seconds": round(hf_s, 3), "prompt_tok_s": round(tokens / hf_s)}
    print(json.dumps(result), flush=True)
    model = our_model(hf, a.device, dtype)
    del hf
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()
    engine = build_engine(model, 256, a.budget, a.device == "cuda", 4 * tokens)
    engine_scores(engine, prompts[:8], True)  # warm up both kinds of step
    engine.blocks.enable_prefix_caching = False  # the timed runs compute every prompt in full, as HF does
    plain_s, _ = engine_scores(engine, prompts, False)
    scored_s, got = engine_scores(engine, prompts, True)
    spent = timed_parts(engine)
    engine_scores(engine, prompts, True)
    result["diagnostic_synchronized_parts"] = {k: round(v, 3) for k, v in spent.items()}
    diffs = sorted(abs(x - y) for i, row in enumerate(hf_first) for x, y in zip(got[i], row))
    result["chatserve_scoring"] = {"seconds": round(scored_s, 3), "prompt_tok_s": round(tokens / scored_s)}
    result["chatserve_prefill_only"] = {"seconds": round(plain_s, 3), "prompt_tok_s": round(tokens / plain_s)}
    result["ratio_scoring_vs_hf_forward"] = round(hf_s / scored_s, 2)
    result["scoring_cost_vs_prefill_only"] = round(scored_s / plain_s, 3)
    # both in bf16: rounding differs between the two implementations, so compare the spread, not a bound
    result["abs_logprob_diff_vs_hf_first_batch"] = {"median": round(diffs[len(diffs) // 2], 4),
                                                    "p99": round(diffs[int(len(diffs) * 0.99)], 4),
                                                    "max": round(diffs[-1], 4)}
    result["hf_mean_logprob_first_batch"] = round(sum(map(sum, hf_first)) / sum(map(len, hf_first)), 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
