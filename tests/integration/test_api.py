"""The platform through the real openai SDK: real controller, worker and gateway processes."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)


def ask(client, model, messages, **kw):
    kw.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_models_lists_the_embedded_model(client, platform):
    ids = [m.id for m in client.models.list().data]
    assert ids == [platform.model]
    assert client.models.retrieve(platform.model).id == platform.model


def test_capital_of_france_is_paris(client, platform):
    r = ask(client, platform.model, [{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.id.startswith("chatcmpl-") and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_three_turn_streamed_conversation_carries_its_history(client, platform):
    history = [{"role": "user", "content": "My name is Tom."}]
    prompt_tokens, cached = [], []
    for question in ("What is the capital of France?", "Please repeat my name."):
        stream = client.chat.completions.create(model=platform.model, messages=history, temperature=0,
                                                max_tokens=40, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None
        prompt_tokens.append(usage.prompt_tokens)
        cached.append(usage.prompt_tokens_details.cached_tokens)
        history += [{"role": "assistant", "content": "".join(parts)}, {"role": "user", "content": question}]
    final = ask(client, platform.model, history)
    prompt_tokens.append(final.usage.prompt_tokens)
    assert prompt_tokens[0] < prompt_tokens[1] < prompt_tokens[2]
    # the earlier turns are served from the prefix cache
    assert final.usage.prompt_tokens_details.cached_tokens >= prompt_tokens[1] - 16
    # the worker's rendered prompt holds the name from turn 1
    rendered = httpx.post(f"{platform.gateway.url}/tokenize", json={"model": platform.model, "messages": history}).json()
    assert "My name is Tom." in rendered["prompt"] and rendered["count"] == prompt_tokens[2]


def test_recall_probe_checked_against_transformers(client, platform):
    """Checked with transformers' own generate (greedy, fp32): this history makes the model say 'Tom'."""
    history = [{"role": "user", "content": "My name is Tom."}, {"role": "assistant", "content": "Nice to meet you, Tom!"},
               {"role": "user", "content": "What is the capital of France?"}]
    a2 = ask(client, platform.model, history).choices[0].message.content
    history += [{"role": "assistant", "content": a2}, {"role": "user", "content": "Please repeat my name."}]
    a3 = ask(client, platform.model, history, max_tokens=20).choices[0].message.content
    assert "Tom" in a3


def test_stream_equals_non_stream_at_temperature_zero(client, platform):
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    full = ask(client, platform.model, msgs).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in ask(client, platform.model, msgs, stream=True) if c.choices]
    assert "".join(parts) == full and full


def test_concurrent_requests_do_not_corrupt_each_other(client, platform):
    prompts = ["Name a colour.", "Count to five.", "What is 2+2?", "Say hello in French.", "Name a planet.",
               "What is the capital of France?"]
    solo = {p: ask(client, platform.model, [{"role": "user", "content": p}]).choices[0].message.content for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = dict(zip(prompts, pool.map(
            lambda p: ask(client, platform.model, [{"role": "user", "content": p}]).choices[0].message.content, prompts)))
    assert together == solo


def test_completions_endpoint(client, platform):
    r = client.completions.create(model=platform.model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.id.startswith("cmpl-") and r.choices[0].text and r.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=platform.model, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "no-such-model", [{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model"


def test_malformed_json_is_400_in_openai_envelope(platform):
    r = httpx.post(f"{platform.api_url}/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 100}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format"),
])
def test_invalid_fields_are_400_naming_the_field(platform, body, param):
    r = httpx.post(f"{platform.api_url}/chat/completions", json={"model": platform.model, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_context_overflow_is_400_with_the_limit(client, platform):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, platform.model, [{"role": "user", "content": "hello " * 1500}], max_tokens=1000)
    assert "maximum context length is 2048 tokens" in e.value.body["message"]


def test_client_disconnect_aborts_the_request_and_frees_its_cache(platform):
    body = {"model": platform.model, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{platform.api_url}/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(5):
                next(lines)
            load = http.get(platform.worker.url + "/status").json()["load"]
            assert load["num_running"] == 1 and load["kv_cache_usage"] > 0
        # the stream is closed here: the worker must abort and free the blocks at once
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            load = http.get(platform.worker.url + "/status").json()["load"]
            if load["num_running"] == 0:
                break
            time.sleep(0.1)
    assert load["num_running"] == 0 and load["queue_length"] == 0


def test_metrics_use_chatserve_names_and_count_requests(client, platform):
    ask(client, platform.model, [{"role": "user", "content": "Say hi."}], max_tokens=8)
    httpx.get(platform.api_url + "/models/no-such-model")
    text = httpx.get(platform.gateway.url + "/metrics").text
    for name in ("chatserve:time_to_first_token_seconds_bucket", "chatserve:inter_token_latency_seconds_bucket",
                 "chatserve:e2e_request_latency_seconds_count", "chatserve:generation_tokens_total",
                 "chatserve:prompt_tokens_total", "chatserve:num_requests_running", "chatserve:kv_cache_usage_perc",
                 "chatserve:prefix_cache_hit_rate"):
        assert name in text, name
    assert 'chatserve:requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'chatserve:requests_total{route="other",status="404"}' in text


def test_logit_bias_is_honoured_and_validated(client, platform):
    tok = httpx.post(f"{platform.gateway.url}/tokenize", json={"model": platform.model, "prompt": " banana"}).json()
    target = tok["tokens"][-1]
    r = ask(client, platform.model, [{"role": "user", "content": "Say something."}], max_tokens=3,
            logit_bias={str(target): 100})
    assert r.choices[0].message.content.strip().startswith("banana")
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, platform.model, [{"role": "user", "content": "x"}], logit_bias={"10": 500})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, platform.model, [{"role": "user", "content": "x"}], logit_bias={"99999999": 1})
    assert e.value.body["param"] == "logit_bias"


def test_logprobs_n_seed_and_echo(client, platform):
    r = ask(client, platform.model, [{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    kw = dict(model=platform.model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8,
              temperature=1.0, n=2, seed=7)
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(first.choices) == 2 and first.usage.completion_tokens == 16
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    comp = client.completions.create(model=platform.model, prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2, echo=True)
    assert comp.choices[0].text.startswith("The capital of France is")
    # echo with logprobs: an entry for every prompt token (the first has none), then the 4 generated
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == comp.usage.prompt_tokens + 4 and lp.token_logprobs[0] is None
    assert "".join(lp.tokens).startswith("The capital of France is")


def test_json_object_response_format_parses_stream_and_non_stream(client, platform):
    import json

    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    r = ask(client, platform.model, messages, max_tokens=64, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    stream = ask(client, platform.model, messages, max_tokens=64, response_format={"type": "json_object"},
                 stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text) == json.loads(r.choices[0].message.content)


def test_embeddings_through_the_sdk(client, platform):
    import numpy as np

    texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue grew five percent."]
    r = client.embeddings.create(model=platform.model, input=texts)  # the SDK asks for base64 and decodes it
    vecs = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == [0, 1, 2] and vecs.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]  # the paraphrase is nearer than the unrelated sentence
    assert r.usage.prompt_tokens == r.usage.total_tokens > 10
    plain = httpx.post(f"{platform.api_url}/embeddings", json={"model": platform.model, "input": texts[0],
                                                               "encoding_format": "float"}).json()
    np.testing.assert_allclose(plain["data"][0]["embedding"], vecs[0], atol=1e-6)
    ids = httpx.post(platform.gateway.url + "/tokenize", json={"model": platform.model, "prompt": texts[0]}).json()
    by_ids = client.embeddings.create(model=platform.model, input=ids["tokens"], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, vecs[0], atol=1e-5)
    short = client.embeddings.create(model=platform.model, input=texts[0], dimensions=64)
    assert len(short.data[0].embedding) == 64 and abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-4


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": "hello " * 3000}, "input"),
    ({"input": [10**9]}, "input"),
    ({"input": "x", "dimensions": 100000}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embedding_requests_are_400(platform, body, param):
    r = httpx.post(f"{platform.api_url}/embeddings", json={"model": platform.model, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_remaining_fields_through_the_sdk_and_golden_wire_format(client, platform):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    # stop strings end the reply before them; max_completion_tokens bounds it
    r = ask(client, platform.model, msgs, stop=["Paris"], max_tokens=None, max_completion_tokens=30, user="u-1")
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    r = ask(client, platform.model, msgs, max_tokens=None, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # extensions through extra_body: EOS ignored, a floor on length, top-k, repetition penalty
    r = ask(client, platform.model, msgs, max_tokens=20, presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9,
            extra_body={"ignore_eos": True, "min_tokens": 20, "top_k": 5, "repetition_penalty": 1.2})
    assert r.usage.completion_tokens == 20
    # golden key sets of the wire format
    raw = httpx.post(f"{platform.api_url}/chat/completions", json={"model": platform.model, "messages": msgs,
                                                                    "max_tokens": 2}).json()
    assert set(raw) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert raw["object"] == "chat.completion" and set(raw["choices"][0]) == {"index", "message", "finish_reason",
                                                                              "logprobs"}
    assert set(raw["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    with httpx.stream("POST", f"{platform.api_url}/chat/completions", json={
            "model": platform.model, "messages": msgs, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    # completions: a list of prompts, and token ids
    batch = client.completions.create(model=platform.model, prompt=["One, two,", "Red, green,"], max_tokens=3,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 6
    ids = httpx.post(f"{platform.gateway.url}/tokenize", json={"model": platform.model, "prompt": "One, two,"}).json()
    by_ids = client.completions.create(model=platform.model, prompt=ids["tokens"], max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == batch.choices[0].text


def test_echoed_prompt_with_unicode_line_breaks_survives_the_internal_stream(client, platform):
    """Found by fuzzing: U+0085 / U+2028 in echoed text split the worker's NDJSON lines."""
    prompt = "a\u0085b\u2028c\u2029d\x1ce"
    for stream in (False, True):
        r = client.completions.create(model=platform.model, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                      stream=stream)
        text = r.choices[0].text if not stream else "".join(c.choices[0].text for c in r if c.choices)
        assert text.startswith(prompt)
