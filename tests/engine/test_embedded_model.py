"""The engine on the embedded SmolLM2-135M-Instruct equals transformers' `generate` (fp32, greedy)."""

from __future__ import annotations

import pytest
import torch

from chatserve.protocol.sampling import SamplingParams
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import CacheConfig, ModelRunner
from worker.loader import EMBEDDED_FILE, load_model


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM

    loaded = load_model(None, device="cpu", dtype=torch.float32, context_length=2048)
    hf = AutoModelForCausalLM.from_pretrained(loaded.path, gguf_file=EMBEDDED_FILE, dtype=torch.float32).eval()
    return loaded, hf


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def test_embedded_model_batch_matches_transformers_and_answers_paris(embedded):
    loaded, hf = embedded
    tok = loaded.tokenizer
    runner = ModelRunner(loaded.model, CacheConfig(cpu_cache_tokens=4096), 8, 2048)
    engine = LLMEngine(runner, tok, max_num_seqs=8, max_batched_tokens=48)
    prompts = ["What is the capital of France?", "Write a haiku about autumn.", "Name three fruits."]
    ids = [chat_ids(tok, p) for p in prompts]
    outs: dict[str, list[int]] = {}
    engine.add_request("0", ids[0], SamplingParams(max_tokens=20, temperature=0))
    step = 0
    while engine.has_unfinished():
        if step == 2:
            engine.add_request("1", ids[1], SamplingParams(max_tokens=20, temperature=0))
            engine.add_request("2", ids[2], SamplingParams(max_tokens=20, temperature=0))
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    for i, x in enumerate(ids):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([x]), max_new_tokens=20, do_sample=False)[0, len(x):].tolist()
        assert outs[str(i)] == ref[: len(outs[str(i)])] and len(outs[str(i)]) == len(ref), i
    assert "Paris" in tok.decode(outs["0"])


@pytest.fixture(scope="module")
def embedded_bf16():
    return load_model(None, device="cpu", dtype=torch.bfloat16, context_length=2048)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_bf16_default_answers_paris_with_a_bf16_or_fp8_kv_cache(embedded_bf16, kv_dtype):
    loaded = embedded_bf16
    runner = ModelRunner(loaded.model, CacheConfig(cpu_cache_tokens=2048, dtype=kv_dtype), 4, 2048)
    want = torch.float8_e4m3fn if kv_dtype == "fp8" else torch.bfloat16
    assert runner.kv_caches[0][0].dtype == want
    engine = LLMEngine(runner, loaded.tokenizer)
    # every generated token attends over cached K/V (fp8 ones with an fp8 cache); the second request also
    # finds the whole prompt but its last token in the cache
    answers, firsts = [], []
    for rid in ("p", "q"):
        engine.add_request(rid, chat_ids(loaded.tokenizer, "What is the capital of France?"),
                           SamplingParams(max_tokens=16, temperature=0, logprobs=5))
        text, first = [], None
        while engine.has_unfinished():
            for o in engine.step():
                text.append(o.text)
                first = first or dict(o.logprobs[0][2])
        answers.append("".join(text))
        firsts.append(first)
    assert "Paris" in answers[0]
    assert engine.blocks.hit_tokens == len(chat_ids(loaded.tokenizer, "What is the capital of France?")) - 1
    if kv_dtype == "auto":
        # the same cache contents as a cold prompt's: the same first-token distribution, to bf16's rounding. Not
        # the same greedy text: here "The" leads "L" by 0.12 nats, and CPUs without native bf16 (AVX2: bf16
        # matmuls emulated) round the two attention paths apart by about that much (seen: a tie, then "L")
        common = set(firsts[0]) & set(firsts[1])
        assert len(common) >= 4 and max(abs(firsts[0][t] - firsts[1][t]) for t in common) < 0.2
    else:  # the prompt now attends over its own fp8 keys and values, not the unrounded ones: a fair answer
        assert answers[1]


def test_fp8_kv_cache_holds_twice_the_tokens_per_byte():
    from worker.engine.model import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128)
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 524288 == 2 * cfg.kv_bytes_per_token(torch.float8_e4m3fn)


def test_unknown_kv_cache_dtype_is_refused_before_any_loading():
    from chatserve.settings import WorkerSettings
    from worker.app import build_engine
    from worker.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="--kv-cache-dtype must be one of auto, fp8"):
        build_engine(WorkerSettings(kv_cache_dtype="fp16", model_path="/nonexistent"))
