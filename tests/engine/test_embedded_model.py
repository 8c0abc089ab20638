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


def test_bf16_default_answers_paris():
    loaded = load_model(None, device="cpu", dtype=torch.bfloat16, context_length=2048)
    engine = LLMEngine(ModelRunner(loaded.model, CacheConfig(cpu_cache_tokens=2048), 4, 2048), loaded.tokenizer)
    engine.add_request("p", chat_ids(loaded.tokenizer, "What is the capital of France?"),
                       SamplingParams(max_tokens=16, temperature=0))
    text = []
    while engine.has_unfinished():
        text += [o.text for o in engine.step()]
    assert "Paris" in "".join(text)


def test_json_object_mode_yields_json_objects_greedy_and_sampled(embedded):
    import json

    from worker.engine.json_constraint import INITIAL, feed

    loaded, _ = embedded
    tok = loaded.tokenizer
    engine = LLMEngine(ModelRunner(loaded.model, CacheConfig(cpu_cache_tokens=4096), 8, 2048), tok, max_num_seqs=8,
                       max_batched_tokens=256)
    prompts = ["What is the capital of France? Answer in JSON.", "Describe a cat as a JSON object.", "Hello!"]
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=96, temperature=0 if i == 0 else 1.0, seed=i, response_format="json_object")
        engine.add_request(str(i), chat_ids(tok, p), params, n=2 if i else 1)
    texts: dict[tuple[str, int], str] = {}
    reasons: dict[tuple[str, int], str] = {}
    while engine.has_unfinished():
        for o in engine.step():
            texts[o.request_id, o.index] = texts.get((o.request_id, o.index), "") + o.text
            if o.finished:
                reasons[o.request_id, o.index] = o.finish_reason
    assert len(reasons) == 5
    for key, text in texts.items():
        if reasons[key] == "stop":
            assert isinstance(json.loads(text), dict), text
        else:  # cut by max_tokens: still a valid beginning of a JSON object
            assert reasons[key] == "length" and feed(INITIAL, text.encode()) is not None, text
    assert json.loads(texts["0", 0]) == {"city": "Paris"} or "Paris" in texts["0", 0]
