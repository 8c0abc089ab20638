"""Constrained decoding in the engine (llguidance grammars): sampled output of a tiny random model always
follows the grammar, in the step-at-a-time mode and in the GPU's running-ahead mode (masks computed after
the step is queued), and unconstrained neighbours in the same batch get exactly what they get alone."""

from __future__ import annotations

import json

import jsonschema
import pytest

from chatserve.protocol.sampling import SamplingParams
from chatserve.tools.formats import FORMATS
from chatserve.tools.grammar import json_schema_grammar, tool_grammar
from chatserve.tools.parsers import parse_all
from tests.engine.conftest import byte_bpe_tokenizer, engine_for, prompts_for
from worker.engine.engine import LLMEngine

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "unit": {"enum": ["celsius", "fahrenheit"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "properties": {"query": {"type": "string", "maxLength": 16}}, "required": ["query"],
             "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


def make_engine(hf_model, tokenizer, overlap: bool) -> LLMEngine:
    base = engine_for(hf_model, block_size=8, budget=256, overlap=overlap)
    engine = LLMEngine(base.runner, tokenizer, max_num_seqs=16, max_batched_tokens=256)
    engine.overlap = overlap
    engine.eos_ids = (tokenizer.eos_token_id,)
    return engine


def texts(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, tuple[str, str]]:
    for rid, p, params in requests:
        engine.add_request(rid, p, params)
    out: dict[str, tuple[str, str]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            text, _ = out.get(o.request_id, ("", ""))
            out[o.request_id] = (text + o.text, o.finish_reason or "")
    return out


@pytest.mark.parametrize("overlap", [False, True], ids=["step-at-a-time", "running-ahead"])
def test_sampled_json_follows_the_schema_and_neighbours_are_untouched(hf_model, tokenizer, overlap):
    grammar = json_schema_grammar(SCHEMA)
    ps = prompts_for(8, seed=3)
    free = [(f"free{i}", p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for i, p in enumerate(ps[:4])]
    alone = texts(make_engine(hf_model, tokenizer, overlap), free)
    guided = [(f"json{i}", p, SamplingParams(max_tokens=200, temperature=1.0, seed=i, grammar=grammar))
              for i, p in enumerate(ps[4:])]
    mixed = texts(make_engine(hf_model, tokenizer, overlap), free + guided)
    for rid, _, _ in free:
        assert mixed[rid] == alone[rid]
    for rid, _, _ in guided:
        text, reason = mixed[rid]
        assert reason == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
@pytest.mark.parametrize("choice", ["required", {"name": "search"}])
def test_required_and_named_tool_choices_force_a_valid_call(hf_model, tokenizer, fmt, choice):
    grammar = tool_grammar(FORMATS[fmt], TOOLS, choice, parallel=False)
    engine = make_engine(hf_model, tokenizer, overlap=True)
    reqs = [(f"t{i}", p, SamplingParams(max_tokens=200, temperature=1.0, seed=i, grammar=grammar))
            for i, p in enumerate(prompts_for(4, seed=9))]
    for rid, (text, reason) in texts(engine, reqs).items():
        parsed = parse_all(FORMATS[fmt], {"get_weather", "search"}, text)
        assert reason == "stop" and len(parsed.calls) == 1 and not parsed.content.strip(), text
        call = parsed.calls[0]
        if isinstance(choice, dict):
            assert call.name == "search"
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
        jsonschema.validate(json.loads(call.arguments), schema)


def test_auto_with_a_strict_tool_is_text_or_a_valid_call(hf_model, tokenizer):
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    grammar = tool_grammar(FORMATS["hermes"], strict, "auto", parallel=True)
    engine = make_engine(hf_model, tokenizer, overlap=False)
    reqs = [(f"a{i}", p, SamplingParams(max_tokens=120, temperature=1.0, seed=i, grammar=grammar))
            for i, p in enumerate(prompts_for(6, seed=4))]
    for text, reason in texts(engine, reqs).values():
        parsed = parse_all(FORMATS["hermes"], {"get_weather", "search"}, text)
        if "<tool_call>" in text and reason == "stop":  # a call began: the grammar saw it through
            assert parsed.calls and "<tool_call>" not in parsed.content, text
        for call in parsed.calls:
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
            jsonschema.validate(json.loads(call.arguments), schema)
    assert tool_grammar(FORMATS["hermes"], TOOLS, "auto", parallel=True) is None  # not strict: free
