"""A worker started with --tensor-parallel 3 (SmolLM2 has 9 heads and 3 KV heads; gloo on CPU here; NCCL on GPUs) serves through the gateway and
answers greedily exactly as the single-process worker does."""

from __future__ import annotations

import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration

TP_MODEL = "SmolLM2-135M-tp3"


@pytest.fixture(scope="module")
def tp_worker(platform, request):
    yield from procs.extra_worker(platform, request, TP_MODEL, "--tensor-parallel", "3")


def test_three_rank_worker_answers_like_one(platform, tp_worker):
    client = openai.OpenAI(base_url=platform.api_url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answers = {m: client.chat.completions.create(model=m, messages=messages, temperature=0, max_tokens=24)
               for m in (platform.model, TP_MODEL)}
    one, two = (answers[m].choices[0].message.content for m in (platform.model, TP_MODEL))
    assert "Paris" in two and two == one
    assert answers[TP_MODEL].usage.prompt_tokens == answers[platform.model].usage.prompt_tokens
    assert "tensor parallel over 3 ranks" in tp_worker.logs()
