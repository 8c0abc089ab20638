"""Tool-call formats: prompts written for templates without tools (golden, from each format's
documentation), and the parsers on recorded model outputs, whole and streamed in arbitrary pieces;
malformed output comes back as text, never as an exception."""

from __future__ import annotations

import json
import random

import pytest

from chatserve.tools.formats import FORMATS, detect_format, template_takes_tools
from chatserve.tools.parsers import ToolCallParser, parse_all
from worker.prompting import for_template, written_out

NAMES = {"get_weather", "search"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# (format, recorded output, expected content, expected calls as (name, arguments))
RECORDED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": {"query": "Rome"}}\n</tool_call>', "Let me look.",
     [("get_weather", {"city": "Paris"}), ("search", {"query": "Rome"})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>', "",
     [("get_weather", {"city": "Oslo"})]),  # arguments written as a JSON string
    ("hermes", "Paris is sunny, a < b and 2 > 1.", "Paris is sunny, a < b and 2 > 1.", []),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "search", "parameters": '
                    '{"query": "x"}}', "", [("get_weather", {"city": "Paris"}), ("search", {"query": "x"})]),
    ("llama3_json", 'The JSON {"name": "x"} is not a call.', 'The JSON {"name": "x"} is not a call.', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "search", '
                '"arguments": {"query": "y"}}]', "", [("get_weather", {"city": "Paris"}), ("search", {"query": "y"})]),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [("get_weather", {"city": "Paris"})]),
]

MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": '),  # cut off
    ("hermes", '<tool_call>\n{"name": "unknown_fn", "arguments": {}}\n</tool_call>'),  # not a tool of the request
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>"),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Par'),
    ("mistral", "[TOOL_CALLS][1, 2, 3]"),
    ("mistral", "[TOOL_CALLS]"),
]


def streamed(fmt: str, text: str, seed: int):
    rng = random.Random(seed)
    p = ToolCallParser(FORMATS[fmt], NAMES)
    content, calls, at = "", [], 0
    while at < len(text):
        step = rng.randint(1, 7)
        out = p.feed(text[at:at + step])
        content, calls, at = content + out.content, calls + out.calls, at + step
    out = p.finish()
    return content + out.content, calls + out.calls


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED)
def test_recorded_outputs_parse_whole_and_streamed(fmt, text, content, calls):
    parsed = parse_all(FORMATS[fmt], NAMES, text)
    assert parsed.content.strip() == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert all(c.id.startswith("call_") for c in parsed.calls)
    for seed in range(5):
        s_content, s_calls = streamed(fmt, text, seed)
        assert s_content.strip() == content and [(c.name, json.loads(c.arguments)) for c in s_calls] == calls


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_malformed_calls_come_back_as_text(fmt, text):
    parsed = parse_all(FORMATS[fmt], NAMES, text)
    assert parsed.calls == [] and parsed.content == text
    assert streamed(fmt, text, 1) == (text, [])


def test_no_prefix_of_any_output_makes_a_parser_throw():
    rng = random.Random(0)
    for fmt, text, _, _ in RECORDED + [(f, t, "", []) for f, t in MALFORMED]:
        for cut in range(len(text) + 1):
            parse_all(FORMATS[fmt], NAMES, text[:cut])
        noisy = "".join(rng.choice('{}[]"<>\\:, tool_call/\n') for _ in range(200))
        parse_all(FORMATS[fmt], NAMES, noisy)


def test_content_streams_before_the_call_is_decided():
    p = ToolCallParser(FORMATS["hermes"], NAMES)
    assert p.feed("Sure, checking").content == "Sure, checking"
    assert p.feed(" now <tool").content == " now "  # '<tool' may open a call: held back
    out = p.feed('_call>\n{"name": "search", "arguments": {"query": "q"}}\n</tool_call>')
    assert out.content == "" and [c.name for c in out.calls] == ["search"]


def test_hermes_prompt_golden():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_2"}]
    out = written_out(msgs, [WEATHER], FORMATS["hermes"])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"


def test_llama3_and_mistral_prompts_golden():
    calls = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]
    llama = written_out([{"role": "user", "content": "hi"}] + calls, [WEATHER], FORMATS["llama3_json"])
    assert llama[0]["content"].startswith("Given the following functions, please respond with a JSON for a function call")
    assert llama[2]["content"] == '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    mistral = written_out([{"role": "user", "content": "hi"}] + calls + [{"role": "tool", "content": "warm"}],
                          [WEATHER], FORMATS["mistral"])
    assert mistral[0]["content"] == "[AVAILABLE_TOOLS]" + json.dumps([WEATHER]) + "[/AVAILABLE_TOOLS]"
    assert mistral[2]["content"] == '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert mistral[3]["content"] == '[TOOL_RESULTS]{"content": "warm"}[/TOOL_RESULTS]'


def test_templates_that_take_tools_get_them_as_objects():
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}],
        "tool_call_id": None, "name": None}, {"role": "tool", "content": "warm", "tool_call_id": "c1", "name": None}]
    assert for_template(msgs) == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "warm", "tool_call_id": "c1"}]
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert detect_format("... <tool_call> ...") == "hermes"
    assert detect_format("{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect_format("[AVAILABLE_TOOLS]") == "mistral"
    assert detect_format(None, "vicuna-7b") == "hermes"


def test_a_template_that_takes_tools_renders_them_itself():
    from tests.engine.conftest import byte_bpe_tokenizer
    from worker.prompting import PromptRenderer

    tok = byte_bpe_tokenizer()
    tok.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}[{{ m.role }}]{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "<tool_call>{{ c.function.name }}:{{ c.function.arguments.city }}</tool_call>{% endfor %}"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    r = PromptRenderer(tok, "m")
    assert r.native_tools and r.tool_format.name == "hermes"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "warm", "tool_call_id": "c1"}]
    text = r.render(msgs, tools=[WEATHER]).text
    assert text == ("<tools>get_weather;</tools>[user]hi[assistant]<tool_call>get_weather:Rome</tool_call>"
                    "[tool]warm[assistant]")
