"""Schemathesis fuzzes the gateway from its own OpenAPI schema (boundary/negative "coverage" cases and
random "fuzzing" cases, bodies naming the served model): no 5xx, every response matches its documented
status codes, content types and schemas (errors: the OpenAI envelope)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs

pytestmark = pytest.mark.integration
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_gateway(platform, request) -> Iterator[procs.Service]:
    yield from procs.extra_gateway(platform, request, "--max-tokens-cap", "4")  # valid requests stay quick


def test_schemathesis_finds_no_server_error_or_schema_violation(fuzz_gateway, platform):
    st = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks", "CHATSERVE_FUZZ_MODEL": platform.model,
           "PYTHONPATH": str(procs.REPO)}
    # one worker: with two, hypothesis parses lambdas' source from two threads at once, and CPython 3.11's ast
    # fails that now and then ("AST constructor recursion depth mismatch", a runtime error of the tool's own)
    cmd = [str(st), "run", fuzz_gateway.url + "/openapi.json", "--checks", CHECKS, "--max-examples", "60",
           "--seed", "20261127", "--workers", "1", "--phases", "coverage,fuzzing", "--request-timeout", "120",
           "--no-color"]
    out = subprocess.run(cmd, cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=900)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert "passed" in out.stdout and "failure" not in out.stdout.split("SUMMARY")[-1], report


def random_schema(rng, depth: int = 0):  # type: ignore[no-untyped-def]
    """A random JSON value shaped like a schema: real keywords with odd values, unknown keys, nesting."""
    keys = ["type", "properties", "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern",
            "minLength", "maxLength", "minimum", "maximum", "format", "additionalProperties", "if", "not", "x-odd",
            "$defs", "minItems", "multipleOf", "patternProperties", "prefixItems"]
    leaves = [None, True, False, 0, -1, 2**70, 1.5, "", "string", "object", "integer", "#/$defs/a", "[a-", [], {},
              ["a", "a"], ["string", "null"]]
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(leaves)
    return {rng.choice(keys): random_schema(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_odd_tools_schemas_seeds_and_replayed_messages_never_get_a_5xx(platform):
    import random

    import httpx

    rng = random.Random(20261202)
    url = f"{platform.api_url}/chat/completions"
    replayed = {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "audio": None,
                "function_call": None, "tool_calls": None}
    bodies = [{"seed": s} for s in (2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30)]
    bodies += [{"messages": [{"role": "user", "content": "hi"}, replayed, {"role": "user", "content": "more"}]},
               {"messages": [{"role": "user", "content": "hi"}, {**replayed, "tool_calls": []}]},
               {"messages": [{"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "x"}]}]
    for _ in range(40):
        schema = random_schema(rng)
        choice = rng.choice(["auto", "required", None, {"type": "function", "function": {"name": "f"}}])
        bodies.append({"tools": [{"type": "function", "function": {"name": "f", "parameters": schema,
                                                                    "strict": rng.random() < 0.5}}],
                       "tool_choice": choice})
        bodies.append({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    with httpx.Client(timeout=120) as http:
        for body in bodies:
            full = {"model": platform.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **body}
            r = http.post(url, json=full)
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
