"""Greedy output of the engine equals transformers' own `generate`, token for token."""

from __future__ import annotations

import random

import pytest

import torch

from tests.engine.conftest import engine_for, greedy, hf_greedy, run, tiny_hf


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_single_request_matches_transformers(hf_model):
    p = prompts(1, 1, 20, 20)[0]
    out = run(engine_for(hf_model), {0: [("a", p, 24)]})
    assert out["a"] == hf_greedy(hf_model, p, 24)


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_mixed_lengths_arriving_at_different_steps_match(hf_model, overlap):
    ps = prompts(2, 6, 3, 90)
    arrivals = {0: [("r0", ps[0], 12), ("r1", ps[1], 20)], 3: [("r2", ps[2], 8)], 5: [("r3", ps[3], 16)],
                9: [("r4", ps[4], 10), ("r5", ps[5], 14)]}
    out = run(engine_for(hf_model, budget=32, overlap=overlap), arrivals)  # small budget: prefills are chunked
    for step_reqs in arrivals.values():
        for rid, p, n in step_reqs:
            assert out[rid] == hf_greedy(hf_model, p, n), rid


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_prefix_cache_hits_match_and_are_counted(hf_model, overlap):
    engine = engine_for(hf_model, overlap=overlap)
    history = prompts(3, 1, 40, 40)[0]
    first = run(engine, {0: [("t1", history, 10)]})["t1"]
    turn2 = history + first + prompts(4, 1, 7, 7)[0]
    cached = []
    outs: list[int] = []
    engine.add_request("t2", turn2, greedy(12))
    while engine.has_unfinished():
        for o in engine.step():
            outs.extend(o.token_ids)
            cached.append(o.cached_tokens)
    # all of turn 1's computed tokens came from the cache: full blocks by hash and the partly filled last
    # block taken over (turn 1's last sampled token was never fed back, so it is computed now)
    assert cached[-1] == len(history) + len(first) - 1
    assert outs == hf_greedy(hf_model, turn2, 12)


def test_a_cached_prompt_with_one_token_left_sampled_beside_other_prefills(hf_model):
    """A prompt whose cached blocks leave one token to compute is scheduled like a decode and moved to
    the front of the step's batch: its logits must still reach it, not the prefill admitted before it."""
    engine = engine_for(hf_model)
    p, other = prompts(12, 1, 21, 21)[0], prompts(13, 1, 30, 30)[0]
    run(engine, {0: [("first", p, 3)]})
    out = run(engine, {0: [("other", other, 8), ("again", p, 8)]})  # "again": 20 of 21 tokens cached
    assert out["other"] == hf_greedy(hf_model, other, 8)
    assert out["again"] == hf_greedy(hf_model, p, 8)


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_preempted_and_resumed_requests_match(hf_model, overlap):
    ps = prompts(5, 5, 10, 30)
    engine = engine_for(hf_model, num_blocks=24, block_size=4, overlap=overlap)  # 96 slots: not all at once
    engine.scheduler.growth_cap = 0  # admit on prompt blocks alone, so running sequences get preempted
    out = run(engine, {0: [(f"r{i}", p, 24) for i, p in enumerate(ps)]})
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == hf_greedy(hf_model, p, 24), i
    assert engine.blocks.num_free == 24


def test_multi_query_attention_and_tied_embeddings_match():
    hf = tiny_hf(seed=7, tie_word_embeddings=True, num_key_value_heads=1)
    p = prompts(6, 1, 15, 15)[0]
    out = run(engine_for(hf), {0: [("a", p, 16)]})
    assert out["a"] == hf_greedy(hf, p, 16)


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_abort_frees_blocks_at_once(hf_model, overlap):
    engine = engine_for(hf_model, num_blocks=64, overlap=overlap)
    engine.add_request("a", prompts(8, 1, 30, 30)[0], greedy(50))
    engine.step()
    engine.step()
    assert engine.blocks.num_free < 64
    engine.abort("a")
    assert engine.blocks.num_free == 64 and not engine.has_unfinished()


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_stop_string_cuts_the_text_and_frees_everything(hf_model, overlap):
    """Running ahead (the GPU's mode), the stop string is found a step late and the token computed meanwhile
    is dropped; CPU mode finds it in the step that sampled it. The client sees the same either way."""
    from chatserve.protocol.sampling import SamplingParams

    p = prompts(9, 1, 12, 12)[0]
    ref = hf_greedy(hf_model, p, 12)
    stop = f" {ref[4]} {ref[5]}"
    assert stop not in "".join(f" {t}" for t in ref[:5])
    engine = engine_for(hf_model, num_blocks=64, overlap=overlap)
    engine.add_request("s", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
    text, tokens, last = [], [], None
    while engine.has_unfinished():
        for o in engine.step():
            text.append(o.text)
            tokens.extend(o.token_ids)
            last = o
    assert "".join(text) == "".join(f" {t}" for t in ref[:4])
    assert tokens == ref[:6] and last.finish_reason == "stop" and last.completion_tokens == 6
    assert engine.blocks.num_free == 64


def test_embeddings_equal_mean_pooled_transformers_hidden_states(hf_model):
    engine = engine_for(hf_model)
    inputs = [[5, 6, 7], list(range(1, 40)), [9], [3, 4] * 20, [7, 8, 9, 10]]
    vectors = engine.embed(inputs)
    for ids, vec in zip(inputs, vectors):
        with torch.no_grad():
            hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0]
        ref = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
        torch.testing.assert_close(vec, ref, atol=1e-5, rtol=1e-5)
    # batching (padding, sorting by length) changes nothing
    alone = engine.runner.embed([inputs[1]])[0]
    torch.testing.assert_close(alone, vectors[1], atol=1e-5, rtol=1e-5)
