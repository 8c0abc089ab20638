"""/v1/responses: the Responses API's request, and the response object as the official SDK parses it.

Input items are kept as dicts here and read one by one by the gateway (chatserve/gateway/responses.py),
which names the item and field of anything it cannot serve: the SDK sends fields of newer item shapes
(`phase`, `caller`, `status`, `id`) that change nothing and are ignored. Fields that change what is
generated and that the server does not have (`background`, `conversation`, `prompt`, hosted tools,
`top_logprobs`) are refused with a 400 naming them; the rest (`store`'s companions `metadata`, `user`,
`service_tier`, `include`, `truncation`, `reasoning`, ...) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chatserve.protocol.openai import refuse_unless_null


def item_id(prefix: str) -> str:
    """OpenAI's id shape: `resp_…`, `msg_…`, `fc_…`, `rs_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted: it names a length, it sets none


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None  # accepted: no obfuscation padding is sent


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=200)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    store: bool | None = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # accepted and ignored: they do not change what is generated
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=256)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None  # effort / summary: a reasoning model here thinks as it was trained
    max_tool_calls: int | None = Field(None, ge=1)  # calls are made by the client; one reply holds its own few
    # refused unless null: each would change what is generated or how
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    context_management: Any = None

    @field_validator("conversation", "prompt", "context_management")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        return refuse_unless_null(value, info.field_name)

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported by this server")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("top_logprobs is not supported on /v1/responses; /v1/chat/completions has logprobs")
        return value


def now_s() -> int:
    return int(time.time())


class ResponseObject(BaseModel):
    """The `response` object; output items are dicts in the SDK's shapes (message, function_call, reasoning)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]] = Field(default_factory=list)
    output_text: str = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    truncation: str = "disabled"
    incomplete_details: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
