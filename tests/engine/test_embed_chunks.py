"""A large embeddings request runs a step's token budget at a time between decode steps, so streams keep
going; its vectors equal those of embedding everything at once."""

from __future__ import annotations

import random

import torch

from tests.engine.conftest import engine_for, greedy


def test_a_large_embedding_request_interleaves_with_decoding(hf_model):
    engine = engine_for(hf_model, budget=64)
    rng = random.Random(0)
    inputs = [[rng.randrange(3, 320) for _ in range(rng.randint(4, 20))] for _ in range(40)]
    whole = engine.embed(inputs)
    engine.add_request("s", [5, 6, 7, 8], greedy(200))
    engine.add_embedding("job", inputs)
    chunks, tokens_between, done = 0, 0, None
    while done is None:
        tokens_between += sum(len(o.token_ids) for o in engine.step())
        before = engine.embed_jobs[0].done
        done = engine.embed_step()
        if done is None:
            assert sum(len(x) for x in inputs[before:engine.embed_jobs[0].done]) <= 64  # one step's budget
        chunks += 1
    assert done[0] == "job" and chunks > 5 and tokens_between >= chunks - 1  # the stream advanced meanwhile
    for a, b in zip(done[1], whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not engine.embed_jobs
