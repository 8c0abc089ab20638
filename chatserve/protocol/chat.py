"""/v1/chat/completions: messages (with tool calls and tool results), tools and tool choice, responses
and stream chunks.

A message replayed from an earlier response (`resp.choices[0].message.model_dump()`, or its JSON) carries
response-only fields (`refusal`, `annotations`, `audio`, `function_call`, `tool_calls`) as null or empty:
they are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatserve.protocol.internal import Message
from chatserve.protocol.openai import (
    ChoiceLogprobs,
    FinishReason,
    GenerationFields,
    Usage,
    refuse_unless_null,
)

# --- messages ---------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class RefusalPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    function_call: FunctionCall | None = None  # assistant, legacy
    # response-only fields of a replayed message: accepted and ignored
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    reasoning_content: str | None = None  # vLLM's name for a reasoning model's thoughts
    reasoning: str | None = None

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: Any) -> Any:
        return refuse_unless_null(value, "audio in messages")

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs the function's name")
        if self.role not in ("assistant",) and (self.tool_calls or self.function_call):
            raise ValueError("only assistant messages carry tool_calls or function_call")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)

    def plain(self) -> dict[str, str]:
        """`{role, content}` with text content; `developer` is the newer name of `system`."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        return {"role": role, "content": self.text()}

    def to_internal(self) -> Message:
        msg = Message(**self.plain())  # type: ignore[arg-type]
        calls = list(self.tool_calls or [])
        if self.function_call is not None:
            calls.append(ToolCall(id=f"call_{self.function_call.name}", function=self.function_call))
        if calls:
            msg.tool_calls = [{"id": c.id, "type": "function",
                               "function": {"name": c.function.name, "arguments": c.function.arguments}}
                              for c in calls]
        if self.role == "tool":
            msg.tool_call_id = self.tool_call_id
            msg.name = self.name
        elif self.role == "function":
            msg.tool_call_id, msg.name = f"call_{self.name}", self.name
        return msg


# --- tools ----------------------------------------------------------------------------------------------


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


RESERVED_TEMPLATE_KWARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt",
                            "continue_final_message", "tokenize", "return_dict", "chat_template", "tokenizer"}


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=128)  # legacy form of tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy form of tool_choice
    # accepted and ignored: text is the only modality, the model does not reason, predictions change speed
    modalities: list[Literal["text"]] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    prediction: dict[str, Any] | None = None
    # refused unless null: each would change what is generated
    audio: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    # extension: name a conversation template instead of the tokenizer's own
    chat_template: str | None = None
    # prefill and templates (vLLM's names): the last assistant message continued instead of answered
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # the reply's content starts with the continued final assistant message
    chat_template_kwargs: dict[str, Any] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _prefill(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: set add_generation_prompt "
                             "to false with it")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        reserved = sorted(set(self.chat_template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}: they are request fields")
        return self

    def prefilled(self) -> str:
        """What `echo` puts before the reply: the final assistant message when it is continued."""
        if not self.echo or self.messages[-1].role != "assistant" or self.add_generation_prompt:
            return ""
        return self.messages[-1].text()

    @field_validator("audio", "web_search_options", "verbosity")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        return refuse_unless_null(value, info.field_name)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    @property
    def legacy_functions(self) -> bool:
        return self.functions is not None or self.function_call is not None


# --- responses ------------------------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # a reasoning model's <think> span (vLLM's and DeepSeek's name; `reasoning` the newer), sent when there is one
    reasoning_content: str | None = Field(None, exclude_if=lambda v: v is None)
    reasoning: str | None = Field(None, exclude_if=lambda v: v is None)
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    # vLLM's extension, sent when asked for
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = Field(None, exclude_if=lambda v: v is None)


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    function_call: DeltaFunction | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def arguments_object(arguments: str) -> Any:
    """A call's arguments for a chat template (templates write them with `tojson`): the parsed object, or the
    text as it is when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
