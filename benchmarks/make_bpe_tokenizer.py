"""Train a byte-level BPE tokenizer of a LLaMA-3-sized vocabulary (~128k) offline, on text already on the
machine (the Python standard library's sources and docs), and save it as an HF tokenizer folder. Grammar
engines' mask costs grow with the vocabulary; no 128k tokenizer can be fetched here.

    python benchmarks/make_bpe_tokenizer.py --out /tmp/bpe128k [--vocab 128256]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path


def corpus(limit_bytes: int) -> Iterator[str]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    total = 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in (".py", ".txt", ".rst", ".md", ".html", ".json") or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            total += len(text)
            yield text
            if total >= limit_bytes:
                return


def build(out: str, vocab: int = 128256, limit_bytes: int = 120_000_000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(limit_bytes), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[2])
    fast.save_pretrained(out)
    return Path(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=128256)
    a = ap.parse_args()
    t0 = time.time()
    build(a.out, a.vocab)
    from transformers import AutoTokenizer

    print(f"vocabulary {len(AutoTokenizer.from_pretrained(a.out))} tokens, {time.time() - t0:.0f}s -> {a.out}")


if __name__ == "__main__":
    main()
