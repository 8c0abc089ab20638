"""Server-sent events encoding: `data: <json>\n\n`, the final `data: [DONE]`, and error events."""

from __future__ import annotations

import json

from pydantic import BaseModel

from chatserve.protocol.errors import ChatServeError


def sse_data(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


def sse_json(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def sse_error(err: ChatServeError) -> str:
    return f"data: {json.dumps(err.to_dict())}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"
