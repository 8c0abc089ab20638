"""GPU correctness (opt-in: needs CUDA; run through the device tool). Triton paged decode, CUDA graphs,
chunked prefill, prefix-cache hits and preemption, all against transformers' `generate`."""

from __future__ import annotations

import random

import pytest
import torch

from tests.engine.conftest import engine_for, greedy, hf_greedy, run, tiny_hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MID = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def hf_gpu():
    return tiny_hf(seed=3, **MID).cuda()


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_gpu_engine_matches_transformers_fp32_mixed_arrivals(hf_gpu):
    ps = prompts(1, 8, 5, 300)
    engine = engine_for(hf_gpu, block_size=16, budget=256, max_num_seqs=16)
    assert engine.runner.graphs, "decode CUDA graphs were captured"
    arrivals = {0: [(f"r{i}", p, 20) for i, p in enumerate(ps[:3])], 4: [(f"r{i}", p, 20) for i, p in enumerate(ps[3:], 3)]}
    out = run(engine, arrivals)
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf_gpu, p, 20), i


def test_gpu_prefix_cache_and_preemption_match(hf_gpu):
    engine = engine_for(hf_gpu, num_blocks=40, block_size=16, budget=512, max_num_seqs=16)
    engine.scheduler.growth_cap = 0  # admit on prompt blocks alone, so running sequences get preempted
    ps = prompts(2, 6, 60, 150)
    out = run(engine, {0: [(f"r{i}", p, 40) for i, p in enumerate(ps)]})
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf_gpu, p, 40), i
    turn2 = ps[0] + out["r0"] + prompts(3, 1, 10, 10)[0]
    engine.add_request("t2", turn2, greedy(16))
    toks, cached = [], 0
    while engine.has_unfinished():
        for o in engine.step():
            toks.extend(o.token_ids)
            cached = o.cached_tokens
    assert cached >= 16
    assert toks == hf_greedy(hf_gpu, turn2, 16)


def test_gpu_embeddings_equal_transformers_mean_pooling(hf_gpu):
    engine = engine_for(hf_gpu, block_size=16, budget=256)
    inputs = prompts(4, 5, 3, 200)
    for ids, vec in zip(inputs, engine.embed(inputs)):
        with torch.no_grad():
            hidden = hf_gpu.model(torch.tensor([ids], device="cuda")).last_hidden_state[0]
        ref = torch.nn.functional.normalize(hidden.mean(0), dim=-1).cpu()
        torch.testing.assert_close(vec, ref, atol=2e-4, rtol=2e-4)


class JsonPieces:
    """A 32000-token vocabulary of JSON-ish pieces (the rest special), decoding pieces back to text."""

    def __init__(self):
        base = ["{", "}", "[", "]", '"', ":", ",", " ", "\n", "true", "false", "null", "-", ".", "e", '{"', '":',
                '",', '"}', "\\", "\\n", "\\u00e9"] + list("0123456789abcdefghijklmnopqrstuvwxyz") + ["name", "age"]
        self.pieces = ["<s>", "</s>"] + base + [f"<unused{i}>" for i in range(32000 - 2 - len(base))]
        self.all_special_ids = [0, 1] + list(range(2 + len(base), 32000))

    def get_vocab(self):
        return {p: i for i, p in enumerate(self.pieces)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i not in (0, 1))


def test_gpu_json_object_mode_keeps_random_weights_to_json():
    import json

    from worker.engine.engine import LLMEngine
    from worker.engine.json_constraint import INITIAL, feed

    hf = tiny_hf(seed=5, **MID).cuda().to(torch.bfloat16)
    base = engine_for(hf, block_size=16, budget=512)
    engine = LLMEngine(base.runner, JsonPieces(), max_num_seqs=16, max_batched_tokens=512)
    engine.eos_ids = (1,)
    from chatserve.protocol.sampling import SamplingParams

    for i, p in enumerate(prompts(6, 8, 5, 50)):
        engine.add_request(f"j{i}", p, SamplingParams(max_tokens=64, temperature=1.0, seed=i,
                                                       response_format="json_object"))
    texts, reasons = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            texts[o.request_id] = texts.get(o.request_id, "") + o.text
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert len(reasons) == 8
    for rid, text in texts.items():
        assert feed(INITIAL, text.encode()) is not None, text
        if reasons[rid] == "stop":
            assert isinstance(json.loads(text), dict)
