"""Schemathesis hooks (loaded with SCHEMATHESIS_HOOKS=tests.fuzz.hooks): generated bodies name the served
model, so fuzzing reaches the workers instead of stopping at 404 for random model names."""

from __future__ import annotations

import os

import schemathesis


@schemathesis.hook
def map_body(ctx, body):  # type: ignore[no-untyped-def]
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = os.environ["CHATSERVE_FUZZ_MODEL"]
    return body
