"""What constrained requests cost their neighbours: inter-token latency of a batch of 32 streams where 8
carry a JSON schema, against the same batch with none, in one run (in-process engine, decode steps with
all 32 running; both runs sample at temperature 1).

    python benchmarks/guided_itl.py                                    # CPU: the embedded model
    python benchmarks/guided_itl.py --shape 7b --tokenizer /tmp/bpe128k  # GPU: random LLaMA-7B shape, ~128k vocab
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

from benchmarks.engine_offline import SHAPES  # noqa: E402
from chatserve.protocol.sampling import SamplingParams  # noqa: E402
from chatserve.tools.grammar import json_schema_grammar  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.model import LlamaConfig  # noqa: E402
from worker.engine.model_runner import CacheConfig, ModelRunner  # noqa: E402

# long string fields: the state constrained replies spend most tokens in. (No seeds: a seeded row draws its
# noise from a host generator, a cost of its own that would hide the one measured here.)
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "summary": {"type": "string"},
                                           "paragraphs": {"type": "array", "items": {"type": "string"}},
                                           "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["title", "summary", "paragraphs", "rating"], "additionalProperties": False}


def build(a: argparse.Namespace) -> tuple[LLMEngine, str]:
    if a.shape == "embedded":
        from chatserve.settings import WorkerSettings
        from worker.app import build_engine

        settings = WorkerSettings.from_args(["--max-num-seqs", "32", "--max-batched-tokens", "2048"])
        loaded, engine = build_engine(settings)
        return engine, "SmolLM2-135M-Instruct (embedded), 49k vocabulary"
    from transformers import AutoTokenizer

    from worker.loader import random_model

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    cfg = LlamaConfig.from_hf(_hf_config(a.shape, len(tok)))
    model = random_model(cfg, device="cuda", dtype=torch.bfloat16)
    runner = ModelRunner(model, CacheConfig(block_size=16, gpu_memory_utilization=0.85), 32, 2048)
    engine = LLMEngine(runner, tok, max_num_seqs=32, max_batched_tokens=8192)
    engine.eos_ids = (tok.eos_token_id,)
    return engine, f"random LLaMA-{a.shape} shape, vocabulary {len(tok)}"


def _hf_config(shape: str, vocab: int):
    from transformers import LlamaConfig as HFConfig

    return HFConfig(**{**SHAPES[shape], "vocab_size": vocab}, max_position_embeddings=2048, rms_norm_eps=1e-6)


def run(engine: LLMEngine, guided: int, tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = engine.runner.cfg.vocab_size
    grammar = json_schema_grammar(SCHEMA)
    for i in range(32):
        prompt = [rng.randrange(100, min(vocab, 30000)) for _ in range(rng.randint(32, 96))]
        g = grammar if i < guided else None
        engine.add_request(f"r{seed}-{i}", prompt, SamplingParams(max_tokens=tokens, temperature=1.0,
                                                                  ignore_eos=g is None, grammar=g))
    steps: list[float] = []
    while engine.has_unfinished():
        full = len(engine.scheduler.running) == 32 and not engine.scheduler.waiting
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if full and engine.last_step_decode_only:
            steps.append(dt)
    steps = steps[2:]  # the first steps after prefill settle the pipeline
    return {"decode_steps_at_32": len(steps), "itl_ms_mean": round(statistics.mean(steps) * 1e3, 3),
            "itl_ms_p50": round(statistics.median(steps) * 1e3, 3),
            "itl_ms_p90": round(sorted(steps)[int(0.9 * (len(steps) - 1))] * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    ap.add_argument("--tokenizer", default="/tmp/bpe128k", help="HF tokenizer folder (GPU shapes)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each kind")
    a = ap.parse_args()
    engine, what = build(a)
    engine.guide()
    run(engine, 8, 8, seed=99)  # warm-up: graphs, grammar paths
    runs = {"none": [], "8_json": []}
    for r in range(a.rounds):
        for kind, guided in (("none", 0), ("8_json", 8)):
            runs[kind].append(run(engine, guided, a.tokens, seed=r))
    mean = {k: statistics.mean(x["itl_ms_mean"] for x in v) for k, v in runs.items()}
    out = {"machine": torch.cuda.get_device_name() if torch.cuda.is_available() and a.shape != "embedded"
           else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
           "model": what, "batch": 32, "json_requests": 8, "tokens": a.tokens, "runs": runs,
           "itl_ms_mean": {k: round(v, 3) for k, v in mean.items()},
           "penalty_pct": round(100 * (mean["8_json"] / mean["none"] - 1), 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
