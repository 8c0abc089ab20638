"""Reasoning output end to end: a worker of the embedded model on the DeepSeek-R1 template (its generation
prompt opens the <think> span; the 135M model never closes it, so every reply is a span cut by max_tokens)
answers with reasoning_content and no content, streamed and not, and with a reasoning item on /v1/responses;
the session's worker (no markers in its template) answers in content only."""

from __future__ import annotations

import openai
import pytest

from tests import procs

pytestmark = pytest.mark.integration
MODEL = "smol-r1"
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def r1(platform, request):
    yield from procs.extra_worker(platform, request, MODEL, "--chat-template", "deepseek-r1")


@pytest.fixture(scope="module")
def client(platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)


def test_a_span_cut_by_max_tokens_is_reasoning_never_content(r1, client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert msg.reasoning_content and msg.model_extra["reasoning"] == msg.reasoning_content
    assert not msg.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == msg.reasoning_content
    assert not "".join(d.content or "" for d in deltas)


def test_responses_put_the_span_in_a_reasoning_item(r1, client):
    r = client.responses.create(model=MODEL, input="What is 2 + 2?", max_output_tokens=12, temperature=0)
    assert [o.type for o in r.output] == ["reasoning"] and r.status == "incomplete"
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text
    assert r.output_text == ""
    events = list(client.responses.create(model=MODEL, input="What is 2 + 2?", max_output_tokens=12, temperature=0,
                                          stream=True))
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == r.output[0].content[0].text


def test_a_model_that_does_not_reason_answers_in_content(platform, client):
    r = client.chat.completions.create(model=platform.model, messages=ASK, max_tokens=12, temperature=0)
    assert r.choices[0].message.content and getattr(r.choices[0].message, "reasoning_content", None) is None
    assert "reasoning_content" not in r.choices[0].message.model_dump(exclude_unset=True)  # not sent at all
