"""Prompt logprobs (scoring, echo) come from the prefill pass and equal transformers' forward of the prompt,
through chunked prefill, beside decoding sequences, a cached prefix and preemption."""

from __future__ import annotations

import random

import pytest
import torch

from chatserve.protocol.sampling import SamplingParams
from tests.engine.conftest import engine_for


def _prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def _reference(hf, prompt: list[int], k: int) -> tuple[list[float], list[list[int]], list[int]]:
    """transformers' logprob of each prompt token after the first, the top-k ids and the token's rank."""
    with torch.no_grad():
        lp = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    targets = torch.tensor(prompt[1:])
    chosen = lp[:-1].gather(1, targets[:, None]).squeeze(1)
    ranks = ((lp[:-1] > chosen[:, None]).sum(1) + 1).tolist()
    return chosen.tolist(), lp[:-1].topk(k, dim=-1).indices.tolist(), ranks


def _score(engine, requests: dict[str, tuple[list[int], int]]) -> dict[str, list]:
    for rid, (prompt, k) in requests.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=k))
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got, "prompt logprobs are sent once"
                got[out.request_id] = out.prompt_logprobs
    return got


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_prompt_logprobs_equal_a_transformers_forward_through_chunked_prefill(hf_model, overlap):
    ps = _prompts(11, 4, 30, 90)  # budget 32: every prompt is prefilled in several chunks, beside the others
    engine = engine_for(hf_model, budget=32, overlap=overlap)
    got = _score(engine, {f"r{i}": (p, 3) for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        entries = got[f"r{i}"]
        assert len(entries) == len(p)
        assert entries[0] == (p[0], None, None, [])
        chosen, top, ranks = _reference(hf_model, p, 3)
        assert [e[0] for e in entries] == p
        assert max(abs(e[1] - c) for e, c in zip(entries[1:], chosen)) < 1e-3
        assert [[t for t, _ in e[3]] for e in entries[1:]] == top
        assert [e[2] for e in entries[1:]] == ranks


def test_a_scored_prompt_is_computed_whole_even_when_its_prefix_is_cached(hf_model):
    p = _prompts(12, 1, 40, 40)[0]
    engine = engine_for(hf_model, budget=64)
    _score(engine, {"warm": (p, 0)})  # fills the cache with p's blocks
    engine.add_request("plain", p, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished():
        engine.step()
    got = _score(engine, {"again": (p, 0)})["again"]
    chosen, _, _ = _reference(hf_model, p, 1)
    assert len(got) == len(p) and max(abs(e[1] - c) for e, c in zip(got[1:], chosen)) < 1e-3


def test_preempted_scoring_requests_keep_one_entry_per_prompt_token(hf_model):
    ps = _prompts(13, 5, 12, 30)
    engine = engine_for(hf_model, num_blocks=24, block_size=4)
    engine.scheduler.growth_cap = 0
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                        prompt_logprobs=1))
    got = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                got[out.request_id] = out.prompt_logprobs
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        chosen, _, _ = _reference(hf_model, p, 1)
        assert [e[0] for e in got[f"r{i}"]] == p
        assert max(abs(e[1] - c) for e, c in zip(got[f"r{i}"][1:], chosen)) < 1e-3
