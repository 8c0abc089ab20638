"""Tool calling and structured outputs through the real openai SDK and LangChain, against the embedded
model: constrained decoding makes even a 135M model return calls and JSON that validate; the field policy
and every bad input of the issue."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
               "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": TIME_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


class Capital(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


@pytest.fixture(scope="module")
def client(platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)


def chat(client, platform, messages=ASK, **kw):
    kw.setdefault("max_tokens", 80)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=platform.model, messages=messages, **kw)


def check_calls(calls, names=("get_weather", "get_time")) -> None:
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def collect_stream(stream):
    """Deltas accumulated as the SDK's users do: tool call fragments joined per index."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_call_round_trip_non_stream(client, platform, choice):
    r = chat(client, platform, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
    check_calls(msg.tool_calls, ["get_time"] if isinstance(choice, dict) else ("get_weather", "get_time"))
    call = msg.tool_calls[0]
    # the tool's result goes back; the model answers (or calls again); the call and result reach the prompt
    history = ASK + [msg.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    final = chat(client, platform, history, tools=TOOLS, max_tokens=30)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result reached the prompt: it grew by more than the result's few tokens
    assert final.usage.prompt_tokens > r.usage.prompt_tokens + 15


def test_forced_call_round_trip_stream(client, platform):
    stream = chat(client, platform, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True)
    content, calls, finish = collect_stream(stream)
    assert finish == "tool_calls" and len(calls) == 1 and not content
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] in SCHEMAS
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])
    # the same request without streaming gives the same call (greedy)
    r = chat(client, platform, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    c = r.choices[0].message.tool_calls[0]
    assert (c.function.name, c.function.arguments) == (calls[0]["name"], calls[0]["arguments"])


def test_parallel_calls_are_each_valid_and_indexed(client, platform):
    r = chat(client, platform, tools=TOOLS, tool_choice="required", max_tokens=200)
    check_calls(r.choices[0].message.tool_calls)
    _, calls, _ = collect_stream(chat(client, platform, tools=TOOLS, tool_choice="required", max_tokens=200,
                                      stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert len({c["id"] for c in calls}) == len(calls)


def test_auto_with_a_strict_tool_gives_text_or_a_valid_call(client, platform):
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    for seed in range(3):
        r = chat(client, platform, tools=strict, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=60)
        msg = r.choices[0].message
        if msg.tool_calls:
            check_calls(msg.tool_calls)
        assert "<tool_call>" not in (msg.content or "") or r.choices[0].finish_reason == "length"


def test_auto_without_strict_is_free_text(client, platform):
    r = chat(client, platform, [{"role": "user", "content": "What is the capital of France?"}], tools=TOOLS)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "Paris" in (r.choices[0].message.content or "")


def test_sdk_parse_returns_the_pydantic_object(client, platform):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=platform.model, messages=[{"role": "user", "content": "Which city is the capital of France?"}],
              response_format=Capital, max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Capital)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_validates(client, platform, stream):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                                               "tags": {"type": "array", "items": {"enum": ["cute", "fast"]},
                                                        "maxItems": 2}},
              "required": ["name", "legs", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema, "strict": True}}
    for seed in range(2):
        r = chat(client, platform, [{"role": "user", "content": "Describe a cat."}], response_format=fmt,
                 temperature=1.0, seed=seed, max_tokens=100, stream=stream)
        text = collect_stream(r)[0] if stream else r.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_on_text_completions(client, platform):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 16}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.completions.create(model=platform.model, prompt="The capital of France is", max_tokens=40,
                                  temperature=0, extra_body={"response_format": {
                                      "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_langchain_bind_tools_and_structured_output(platform):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=platform.api_url, api_key="unused", model=platform.model, temperature=0,
                     max_tokens=80, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)
    chunks = list(llm.bind_tools([get_weather], tool_choice="any").stream("What is the weather in Paris?"))
    acc = chunks[0]
    for c in chunks[1:]:
        acc = acc + c
    assert [c["name"] for c in acc.tool_calls] and all(c["name"] == "get_weather" for c in acc.tool_calls)
    assert llm.bind_tools([get_weather]).invoke("Say hello.").content  # auto: a text reply
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Capital, method=method).invoke("Which city is the capital of France?")
        assert isinstance(out, Capital)
    assert isinstance(llm.with_structured_output(Capital).invoke("Capital of Italy?"), Capital)  # the default


def test_legacy_functions_map_onto_tools(client, platform):
    r = chat(client, platform, functions=[t["function"] for t in TOOLS], function_call={"name": "get_weather"})
    assert r.choices[0].finish_reason == "function_call"
    jsonschema.validate(json.loads(r.choices[0].message.function_call.arguments), WEATHER_PARAMS)
    assert r.choices[0].message.tool_calls is None


def test_fields_clients_send_on_every_call_are_accepted(client, platform):
    r = chat(client, platform, [{"role": "user", "content": "Say hi."}], tools=[], tool_choice="none", store=True,
             metadata={"team": "a"}, service_tier="auto", parallel_tool_calls=True, user="u1", max_tokens=8,
             stream_options=None, extra_body={"modalities": ["text"], "prompt_cache_key": "k", "safety_identifier": "s",
                                              "reasoning_effort": "low", "prediction": None})
    assert r.choices[0].message.content
    r = chat(client, platform, [{"role": "user", "content": "Say hi."}], tools=TOOLS, tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_a_replayed_model_dump_history_is_accepted(client, platform):
    first = chat(client, platform, [{"role": "user", "content": "Say hi."}], max_tokens=8)
    dumped = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call", "tool_calls"} <= set(dumped)
    history = [{"role": "user", "content": "Say hi."}, dumped, {"role": "user", "content": "Again."}]
    assert chat(client, platform, history, max_tokens=8).choices[0].message.content is not None
    as_json = json.loads(first.model_dump_json())["choices"][0]["message"]
    r = httpx.post(f"{platform.api_url}/chat/completions", json={
        "model": platform.model, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi."}, as_json,
                                                              {"role": "user", "content": "Again."}]})
    assert r.status_code == 200, r.text


def test_a_length_cut_inside_a_character_ends_on_the_last_whole_one(client, platform):
    ids = httpx.post(f"{platform.gateway.url}/tokenize", json={"model": platform.model, "prompt": "你"}).json()["tokens"]
    first_byte = ids[-2]  # "你" is two tokens: its first UTF-8 bytes, then the last byte
    kw = dict(max_tokens=1, logit_bias={str(first_byte): 100})
    r = chat(client, platform, [{"role": "user", "content": "Say something in Chinese."}], **kw)
    assert r.choices[0].finish_reason == "length" and "\ufffd" not in r.choices[0].message.content
    content, _, finish = collect_stream(chat(client, platform, [{"role": "user", "content": "Say something."}],
                                             stream=True, **kw))
    assert finish == "length" and "\ufffd" not in content


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}]}, "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minLength": "ten"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"functions": [TOOLS[0]["function"]], "tools": TOOLS}, "functions"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities.1"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_tool_and_format_inputs_are_400_naming_the_field(platform, body, param):
    r = httpx.post(f"{platform.api_url}/chat/completions",
                   json={"model": platform.model, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].startswith(param), err
    assert err["type"] == "BadRequestError" and err["message"]
