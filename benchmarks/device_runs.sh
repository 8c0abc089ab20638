#!/usr/bin/env bash
# The GPU runs behind the engine's figures, for the device tool (one H100, kind nvidia-h100-x1), each part
# well inside one call's 10 minutes. Writes JSON under $OUT (default ./out). Carry .whl/ (fastapi, uvicorn,
# pydantic and their wheels, and .whl/tok, a tokenizer folder) as the device README says.
#
#   benchmarks/device_runs.sh engine   # 512-request workload and batch-1 decode, bf16 and fp8 KV cache in one run
#   benchmarks/device_runs.sh kernels  # decode attention: tile sweeps at large batches (kernels timed in CUDA graphs),
#                                      # one pass vs split context at small batches, bf16 / fp8, and step profiles
#   benchmarks/device_runs.sh serve    # 1 and 64 users over HTTP, then the same conversations in-process
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
fi
case "${1:-}" in
engine)
    python3 benchmarks/engine_offline.py --kv-cache-dtype fp8 --baselines batch1 > "$OUT/engine_offline.txt" ;;
kernels)
    python3 benchmarks/profile_step.py --sweep --splits > "$OUT/decode_kernels.txt" ;;
serve)
    python3 benchmarks/make_random_checkpoint.py --shape 7b --tokenizer .whl/tok --out /tmp/m7b
    python3 benchmarks/serve_multiturn.py --users 1,64 --turns 3 --tokens 128 --offline \
        --worker-args "--model-path /tmp/m7b --model-name m7b --max-num-seqs 256 --max-batched-tokens 8192" \
        > "$OUT/serve_multiturn.json" ;;
*)
    echo "usage: $0 engine|kernels|serve" >&2; exit 2 ;;
esac
