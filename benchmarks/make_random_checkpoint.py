"""Write an HF folder (config + safetensors + tokenizer) of a LLaMA shape with random weights, so the
whole serving path (worker loading included) can be measured where no real checkpoint can be fetched.
Random weights time exactly like real ones.

    python benchmarks/make_random_checkpoint.py --shape 7b --tokenizer TOKENIZER_DIR --out /tmp/llama-7b-random
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_offline import SHAPES  # noqa: E402


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--tokenizer", required=True, help="folder with a tokenizer (its vocabulary sizes the model)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    shape = {**SHAPES[a.shape], "vocab_size": len(tok)}
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    print(f"wrote {a.out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
