"""Messages of the internal plane: worker <-> controller, gateway <-> controller, gateway <-> worker.

A worker streams `GenerateChunk`s as newline-delimited JSON; each chunk carries *delta* text (never
cumulative text to re-slice, the cause of FastChat's repeated/dropped characters, #2433/#1190).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatserve.protocol.sampling import SamplingParams

# --- worker <-> controller -------------------------------------------------------------------------------


class WorkerLoad(BaseModel):
    """Live load a worker reports with each heartbeat (and that the gateway refreshes per dispatch)."""

    queue_length: int = 0  # waiting + running requests
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    kv_capacity_tokens: int = 0
    tokens_per_second: float = 0.0  # recent output throughput
    prefix_cache_hit_rate: float = 0.0


class WorkerRegistration(BaseModel):
    worker_id: str = Field(min_length=1, max_length=200)
    address: str = Field(min_length=1, max_length=500)  # base URL the gateway uses, e.g. http://10.0.0.5:21002
    models: list[str] = Field(min_length=1)
    context_length: int = Field(ge=1)
    load: WorkerLoad = Field(default_factory=WorkerLoad)


class Heartbeat(BaseModel):
    worker_id: str
    load: WorkerLoad = Field(default_factory=WorkerLoad)


class HeartbeatAck(BaseModel):
    known: bool  # False: the controller does not know this worker (e.g. it restarted): register again


class Deregistration(BaseModel):
    worker_id: str


class WorkerView(BaseModel):
    worker_id: str
    address: str
    models: list[str]
    context_length: int
    load: WorkerLoad
    last_heartbeat_age_s: float
    inflight: int = 0  # dispatches since the last heartbeat the worker has not yet reported


class ControllerStatus(BaseModel):
    workers: list[WorkerView]
    models: list[str]


class DispatchRequest(BaseModel):
    model: str
    prefix_key: str | None = None  # hash of the conversation's history (affinity for multi-turn chats)
    exclude: list[str] = Field(default_factory=list)  # worker ids that already failed this request


class DispatchResponse(BaseModel):
    worker_id: str
    address: str
    context_length: int


class DispatchBatch(BaseModel):
    """Dispatches that reached the gateway together, decided in one controller call (in order)."""

    requests: list[DispatchRequest]


class DispatchOutcome(BaseModel):
    worker: DispatchResponse | None = None
    status: int = 200  # else the HTTP status the single /dispatch would have answered, with its envelope
    error: dict[str, Any] | None = None


class DispatchBatchResponse(BaseModel):
    results: list[DispatchOutcome]


class ModelInfo(BaseModel):
    name: str
    context_length: int
    num_workers: int


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


# --- gateway <-> worker ----------------------------------------------------------------------------------


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[dict[str, Any]] | None = None  # assistant: [{id, type, function: {name, arguments}}]
    tool_call_id: str | None = None  # tool: the call it answers
    name: str | None = None  # tool: the function's name


class ToolSpec(BaseModel):
    """The tools of a chat request, as the worker renders them and constrains decoding to them."""

    tools: list[dict[str, Any]]  # [{type: "function", function: {name, description, parameters, strict}}]
    choice: Literal["auto", "required"] | dict[str, str] = "auto"  # or {"name": ...}
    parallel: bool = True


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    messages: list[Message] | None = None  # chat: the worker renders them
    prompt: str | None = None  # completion: raw text
    prompt_token_ids: list[int] | None = None  # completion: raw token ids
    chat_template: str | None = None
    tools: ToolSpec | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # chat prefill: the last (assistant) message is continued
    chat_template_kwargs: dict[str, Any] | None = None  # to the tokenizer's chat template (enable_thinking)
    echo: bool = False
    params: SamplingParams = Field(default_factory=SamplingParams)
    n: int = Field(1, ge=1, le=16)
    max_tokens_unset: bool = False  # the client gave no max_tokens: fill the rest of the context


class TokenLogprobInfo(BaseModel):
    token: str
    logprob: float | None  # None: a prompt's first token (nothing precedes it)
    top: list[tuple[str, float]] = Field(default_factory=list)
    token_id: int | None = None  # prompt logprobs: the token's id, its rank, the ids of the top tokens
    rank: int | None = None
    top_ids: list[int] | None = None


class GenerateChunk(BaseModel):
    """One event of a worker's stream. `kind` discriminates."""

    kind: Literal["start", "delta", "error", "ping"]  # ping: a keepalive while nothing else is sent
    index: int = 0  # which of the n sequences
    text: str = ""  # delta text (never cumulative)
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprobInfo] | None = None
    prompt_logprobs: list[TokenLogprobInfo] | None = None  # every prompt token, with the first delta
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    tool_format: str | None = None  # start event of a request with tools: the format its calls are written in
    reasoning: Literal["open", "closed"] | None = None  # start event, a reasoning model: does the reply begin
    # inside a <think> span ("open") or may it open one ("closed")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_text: str | None = None  # for echo
    error: dict | None = None  # an error envelope's inner object, for kind="error"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    prompt: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[str] | list[list[int]] = Field(min_length=1)


class EmbedResponse(BaseModel):
    embeddings: list[str]  # base64 of little-endian float32 vectors (mean-pooled, L2-normalised)
    dim: int
    prompt_tokens: int
