"""The Responses API through the real openai SDK against the embedded model: stream and non-stream, function
tools (constrained by tool_choice "required", so even a 135M model returns a valid call), stored responses
continued by previous_response_id across two gateways and a gateway restart on one database, key
isolation, store: false, and the bad inputs."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from tests import procs
from tests.integration.test_tools import Capital

pytestmark = pytest.mark.integration

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city", "parameters": CITY}]


@pytest.fixture(scope="module")
def client(platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)


def create(client, platform, **kw):
    kw.setdefault("max_output_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.responses.create(model=platform.model, **kw)


def test_a_response_answers_with_a_message_item_usage_and_output_text(client, platform):
    r = create(client, platform, input="What is the capital of France?", instructions="Answer in one sentence.")
    assert r.id.startswith("resp_") and r.object == "response" and r.status in ("completed", "incomplete")
    assert [o.type for o in r.output] == ["message"]
    assert "Paris" in r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer in one sentence."
    assert client.responses.retrieve(r.id).output_text == r.output_text


def test_a_stream_sends_the_typed_events_in_order_with_sequence_numbers(client, platform):
    events = list(create(client, platform, input="Say hello.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert text and done.text == text == events[-1].response.output_text
    with client.responses.stream(model=platform.model, input="Say hello.", max_output_tokens=24,
                                 temperature=0) as stream:
        final = stream.get_final_response()  # the SDK's helper accumulates the same events
    assert final.output_text == text


def test_a_required_function_tool_returns_a_valid_call_and_its_output_continues(client, platform):
    r = create(client, platform, input="What is the weather in Paris?", tools=TOOLS, tool_choice="required",
               parallel_tool_calls=False, max_output_tokens=60)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), CITY)
    follow = create(client, platform, previous_response_id=r.id, tools=TOOLS,
                    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    assert follow.previous_response_id == r.id and follow.output
    items = client.responses.input_items.list(follow.id)
    assert [i.type for i in items.data] == ["function_call_output"]


def test_streamed_function_calls_send_the_argument_events(client, platform):
    events = list(create(client, platform, input="Weather in Rome?", tools=TOOLS, parallel_tool_calls=False,
                         tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    jsonschema.validate(json.loads(done.arguments), CITY)
    final = events[-1].response
    assert [o.type for o in final.output] == ["function_call"] and final.output[0].arguments == done.arguments


def test_text_format_json_schema_is_enforced_and_parsed(client, platform):
    parsed = client.responses.parse(model=platform.model, input="The capital of France, as JSON.", text_format=Capital,
                                    max_output_tokens=60, temperature=0)
    assert isinstance(parsed.output_parsed, Capital)


def test_previous_response_id_renders_the_history_so_the_prefix_cache_serves_it(client, platform):
    first = create(client, platform, input="My name is Ada. Say hello to me.")
    second = create(client, platform, input="What is my name?", previous_response_id=first.id)
    # the whole first turn (its input and output) reached the prompt, and came from the cache
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16


def test_store_false_stores_nothing(client, platform):
    r = create(client, platform, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        create(client, platform, input="Again", previous_response_id=r.id)


def test_a_deleted_response_is_gone(client, platform):
    r = create(client, platform, input="Hi")
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


@pytest.mark.parametrize("bad, status, param", [
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, 400, "tools[0].type"),
    ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"background": True}, 400, "background"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id"),
    ({"tool_choice": {"type": "web_search"}}, 400, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"temperature": 3}, 400, "temperature"),
    ({"input": []}, 400, "input"),
    ({"frobnicate": 1}, 400, "frobnicate"),
])
def test_bad_input_gets_the_envelope_naming_the_field(platform, bad, status, param):
    body = {"model": platform.model, "input": "Hi", "max_output_tokens": 4, **bad}
    r = httpx.post(platform.api_url + "/responses", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_accepted_fields_that_change_nothing(client, platform):
    r = create(client, platform, input="Hi", metadata={"k": "v"}, user="u1", service_tier="auto", truncation="disabled",
               include=["reasoning.encrypted_content"], reasoning={"effort": "low"}, prompt_cache_key="p",
               safety_identifier="s")
    assert r.metadata == {"k": "v"} and r.output_text


def test_unknown_ids_on_the_stored_routes_are_404(platform):
    for method in ("GET", "DELETE"):
        r = httpx.request(method, platform.api_url + "/responses/resp_missing", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    assert httpx.get(platform.api_url + "/responses/resp_missing/input_items", timeout=10).status_code == 404


@pytest.fixture
def shared_db(tmp_path) -> str:
    return str(tmp_path / "responses.sqlite3")


def _gateway(platform, request, db: str, keys: str = "") -> procs.Service:
    g = procs.gateway(platform.controller.url, "--responses-db", db)
    if keys:
        g.env["CHATSERVE_API_KEYS"] = keys  # keys by environment, never argv
    request.node.services = [*getattr(request.node, "services", []), g]
    g.start()
    g.wait(ok=procs.gateway_has_models)
    return g


def _sdk(g: procs.Service, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0)


def test_a_response_is_continued_on_another_gateway_and_after_a_restart(platform, request, shared_db):
    a, b = _gateway(platform, request, shared_db), _gateway(platform, request, shared_db)
    try:
        first = _sdk(a).responses.create(model=platform.model, input="Name a colour.", max_output_tokens=12,
                                         temperature=0)
        second = _sdk(b).responses.create(model=platform.model, input="Another?", previous_response_id=first.id,
                                          max_output_tokens=12, temperature=0)
        assert second.previous_response_id == first.id
        a.stop()
        b.stop()
        c = _gateway(platform, request, shared_db)  # a fresh process on the same file
        third = _sdk(c).responses.create(model=platform.model, input="And one more?", previous_response_id=second.id,
                                         max_output_tokens=12, temperature=0)
        assert third.usage.input_tokens > second.usage.input_tokens
        assert _sdk(c).responses.retrieve(first.id).output_text == first.output_text
        c.stop()
    finally:
        for g in (a, b):
            g.stop()


def test_a_key_sees_only_the_responses_made_with_it(platform, request, shared_db):
    g = _gateway(platform, request, shared_db, keys="key-alpha-1,key-beta-2")
    try:
        mine = _sdk(g, "key-alpha-1").responses.create(model=platform.model, input="Hi", max_output_tokens=8,
                                                       temperature=0)
        other = _sdk(g, "key-beta-2")
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model=platform.model, input="Hi", previous_response_id=mine.id, max_output_tokens=4)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(mine.id)
        assert _sdk(g, "key-alpha-1").responses.retrieve(mine.id).id == mine.id
    finally:
        g.stop()
