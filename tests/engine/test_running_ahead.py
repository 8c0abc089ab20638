"""Running ahead (the GPU's mode, engine.py): each step is queued before the previous step's tokens are
read back, taking them on the device as its input. On the CPU the same code runs, only without overlap,
so these tests check its bookkeeping: outputs equal transformers' and the step-at-a-time mode's."""

from __future__ import annotations

import random

import pytest

from chatserve.protocol.sampling import SamplingParams
from tests.engine.conftest import engine_for, hf_greedy, run
from worker.engine.request import PLACEHOLDER


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 320) for _ in range(n)]


def outputs(engine, requests: list[tuple[str, list[int], SamplingParams]], n: int = 1) -> dict:
    """Each request's (tokens, finish reason), by request id (with n > 1: by (request id, choice))."""
    for rid, p, params in requests:
        engine.add_request(rid, p, params, n=n)
    out: dict = {}
    while engine.has_unfinished():
        for o in engine.step():
            key = o.request_id if n == 1 else (o.request_id, o.index)
            toks, _ = out.get(key, ([], ""))
            out[key] = (toks + o.token_ids, o.finish_reason or "")
    return out


def test_a_sampled_token_feeds_the_next_step_from_the_device(hf_model):
    p = prompt(1, 20)
    engine = engine_for(hf_model, overlap=True)
    engine.add_request("a", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert engine.step() == []  # the prefill's token is still in flight
    seq = engine.by_request["a"][0]
    assert seq.token_ids[-1] == PLACEHOLDER and seq.pending_row == 0 and engine.inflight is not None
    first = engine.step()  # queues the next step on that token, then reads it back
    assert [o.token_ids for o in first] == [hf_greedy(hf_model, p, 1)]
    assert seq.token_ids[-2] != PLACEHOLDER and seq.token_ids[-1] == PLACEHOLDER
    rest = run(engine)
    assert first[0].token_ids + rest.get("a", []) == hf_greedy(hf_model, p, 6)


def test_no_step_runs_for_a_token_that_ends_by_length(hf_model):
    engine = engine_for(hf_model, overlap=True)
    steps = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch, prev=None: (steps.append(len(batch.items)), execute(batch, prev))[1]
    out = outputs(engine, [("a", prompt(2, 9), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))])
    assert out["a"][1] == "length" and len(out["a"][0]) == 5
    assert len(steps) == 5  # one prefill, four decodes: the fifth token is read back, never fed


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu-mode", "running-ahead-gpu-mode"])
def test_a_stop_token_found_a_step_late_drops_the_extra_token_and_frees_its_blocks(hf_model, overlap):
    p = prompt(3, 14)
    ref = hf_greedy(hf_model, p, 10)
    stop_at = next(i for i in range(2, 10) if ref[i] not in ref[:i])
    engine = engine_for(hf_model, num_blocks=64, overlap=overlap)
    out = outputs(engine, [("a", p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[ref[stop_at]]))])
    assert out["a"] == (ref[: stop_at + 1], "stop")
    assert engine.blocks.num_free == 64 and not engine.has_unfinished()


def test_penalties_seeds_and_choices_answer_alike_in_both_modes(hf_model):
    """Penalties read generated tokens on the host (the engine reads each step back first); seeded
    sampling and n > 1 run ahead. Both modes must give the same tokens."""
    reqs = [("pen", prompt(4, 11), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                    repetition_penalty=1.3, frequency_penalty=0.5)),
            ("seed", prompt(5, 17), SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                                                     ignore_eos=True)),
            ("late", prompt(6, 5), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]
    step_mode = outputs(engine_for(hf_model, overlap=False), reqs)
    ahead = outputs(engine_for(hf_model, overlap=True), reqs)
    assert ahead == step_mode
    assert all(len(toks) == params.max_tokens for (_, _, params), (toks, _) in zip(reqs, ahead.values()))
    two = [("n", prompt(8, 9), SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True))]
    ahead_two = outputs(engine_for(hf_model, overlap=True), two, n=2)
    assert set(ahead_two) == {("n", 0), ("n", 1)}
    assert ahead_two == outputs(engine_for(hf_model, overlap=False), two, n=2)


def test_abort_while_a_token_is_in_flight_leaves_nothing_behind(hf_model):
    engine = engine_for(hf_model, num_blocks=64, overlap=True)
    engine.add_request("a", prompt(9, 30), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("b", prompt(10, 12), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort("a")
    assert engine.inflight is not None  # b's token is still to be read back
    out = run(engine)
    assert len(out["b"]) >= 1 and "a" not in out
    assert engine.blocks.num_free == 64 and not engine.has_unfinished()


def test_logprobs_of_rows_asking_for_different_top_k_in_one_batch(hf_model):
    import math

    engine = engine_for(hf_model, overlap=True)
    asks = {"k3": 3, "k0": 0, "none": None}
    for i, (rid, k) in enumerate(asks.items()):
        engine.add_request(rid, prompt(20 + i, 10), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                                   logprobs=k))
    seen: dict[str, list] = {rid: [] for rid in asks}
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.request_id] += o.logprobs or []
    assert seen["none"] == []
    for rid in ("k3", "k0"):
        assert len(seen[rid]) == 4
        for token, logprob, top in seen[rid]:
            assert logprob <= 0 and len(top) == asks[rid]
            if top:  # greedy: the chosen token is the most likely one, listed first with the same logprob
                assert top[0][0] == token and math.isclose(top[0][1], logprob, rel_tol=1e-5)
                assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
