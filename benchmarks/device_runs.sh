#!/usr/bin/env bash
# The GPU runs behind the engine's figures, for the device tool (one H100, kind nvidia-h100-x1), each part
# well inside one call's 10 minutes. Writes JSON under $OUT (default ./out). Carry .whl/ as the device README
# says: fastapi, uvicorn, uvloop, httptools, pydantic and their wheels, py-spy (serve's profiles), and .whl/tok,
# a tokenizer folder.
#
#   benchmarks/device_runs.sh scoring  # prompt logprobs (echo+logprobs requests) vs transformers' forward, 7B shape
#   benchmarks/device_runs.sh engine   # 512-request workload and batch-1 decode, bf16 and fp8 KV cache, with the
#                                      # transformers baselines (generate at batch 1, generate_batch), in one run
#   benchmarks/device_runs.sh ablations  # batch-1 decode: GEMV or cuBLAS, running ahead or not (no HF baselines)
#   benchmarks/device_runs.sh kernels  # decode attention: tile sweeps at large batches (kernels timed in CUDA graphs),
#                                      # one pass vs split context at small batches, bf16 / fp8, and step profiles;
#                                      # the batch-1 GEMV against cuBLAS
#   benchmarks/device_runs.sh serve    # 1 and 64 users over HTTP (64 four times: users in 8 client processes, in
#                                      # one, and the last under py-spy), then the same conversations in-process;
#                                      # the 5-turn, 500-token system prompt run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
fi
case "${1:-}" in
scoring)  # lm-eval-style echo+logprobs scoring of 512 prompts x 256 tokens against transformers' forward
    python3 benchmarks/scoring.py > "$OUT/scoring.txt" ;;
engine)
    python3 benchmarks/engine_offline.py --kv-cache-dtype fp8 --baselines batch1,continuous > "$OUT/engine_offline.txt" ;;
ablations)
    python3 benchmarks/engine_offline.py --kv-cache-dtype fp8 --baselines batch1 --batch1-ablations \
        > "$OUT/engine_ablations.txt" ;;
kernels)
    python3 benchmarks/profile_step.py --sweep --splits > "$OUT/decode_kernels.txt"
    python3 benchmarks/gemv.py > "$OUT/gemv.json" ;;
serve)
    python3 benchmarks/make_random_checkpoint.py --shape 7b --tokenizer .whl/tok --out /tmp/m7b
    W="--model-path /tmp/m7b --model-name m7b --max-num-seqs 256 --max-batched-tokens 8192"
    PATH=/tmp/site/bin:$PATH python3 benchmarks/serve_multiturn.py --users 1,64,64,64,64 --client-procs 1,8,8,1,8 \
        --turns 3 --tokens 128 --offline \
        --profile /tmp/prof --worker-args "$W" > "$OUT/serve_multiturn.json"
    tar czf "$OUT/profiles.tgz" -C /tmp prof
    python3 benchmarks/serve_multiturn.py --users 1,8 --turns 5 --tokens 32 --system-tokens 500 --rounds 10 --offline \
        --worker-args "$W" > "$OUT/serve_sys500.json" ;;
*)
    echo "usage: $0 engine|ablations|kernels|serve" >&2; exit 2 ;;
esac
