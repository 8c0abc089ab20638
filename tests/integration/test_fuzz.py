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
    cmd = [str(st), "run", fuzz_gateway.url + "/openapi.json", "--checks", CHECKS, "--max-examples", "60",
           "--seed", "20261127", "--workers", "2", "--phases", "coverage,fuzzing", "--request-timeout", "120",
           "--no-color"]
    out = subprocess.run(cmd, cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=900)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert "passed" in out.stdout and "failure" not in out.stdout.split("SUMMARY")[-1], report
