"""/v1/chat/completions: messages to a worker, tool calls out of its text, streamed or not.

With tools, each choice's text goes through the tool-call parser of the format the worker named in its
stream's start event (chatserve/tools/parsers.py): content deltas as they are certain, then each call as
one chunk with its index, id and name and one with its arguments (the official SDK's stream helpers and
LangChain concatenate `arguments` fragments per index). The legacy `functions` / `function_call` fields
take the same path and answer in the legacy shape (`message.function_call`, finish_reason
`function_call`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request

from chatserve.gateway.deps import Admit, Charge, auth, generation, limited, streaming
from chatserve.gateway.logprobs import vllm_prompt
from chatserve.gateway.sse import sse_data, sse_json
from chatserve.gateway.streams import (
    SYSTEM_FINGERPRINT,
    Service,
    StartedStream,
    check_response_format,
    collect,
    conversation_key,
    open_stream,
    relay,
    resolve_max_tokens,
)
from chatserve.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTool,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from chatserve.protocol.errors import BadRequestError
from chatserve.protocol.internal import GenerateChunk, GenerateRequest, ToolSpec
from chatserve.protocol.openai import ChoiceLogprobs, TokenLogprob, TopLogprob, Usage, new_id, now
from chatserve.tools.formats import DEFAULT_FORMAT, FORMATS, ToolFormat
from chatserve.tools.grammar import check_schema
from chatserve.tools.parsers import Parsed, ParsedCall, ToolCallParser, parse_all
from chatserve.tools.reasoning import ReasoningParser, Split
from chatserve.tools.reasoning import parse as parse_reasoning

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, responses=streaming(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request, admit: Admit = Depends(limited),
                           caller: str = Depends(auth)) -> Any:
    return await generation(request, request.app.state.chat, body, admit, caller)


def tool_spec(body: ChatCompletionRequest) -> ToolSpec | None:
    """The request's tools and tool choice, checked (400 naming the field), or None for a reply without
    tools (`tools` absent or empty, `tool_choice: "none"`)."""
    tools, choice, parallel = body.tools, body.tool_choice, body.parallel_tool_calls
    tools_param, choice_param = "tools", "tool_choice"
    if body.legacy_functions:
        if body.tools is not None or body.tool_choice is not None:
            raise BadRequestError("use tools and tool_choice, or the legacy functions and function_call, not both",
                                  param="functions")
        tools = [ChatTool(type="function", function=f) for f in body.functions or []]
        fc = body.function_call
        choice = fc if isinstance(fc, str) or fc is None else NamedToolChoice(type="function", function=fc)
        parallel, tools_param, choice_param = False, "functions", "function_call"
    names = [t.function.name for t in tools or []]
    if not tools:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            raise BadRequestError(f"{choice_param} asks for a tool call, but no tools are given", param=choice_param)
        return None
    if choice == "none":
        return None
    if len(set(names)) != len(names):
        raise BadRequestError("tool names must be unique", param=tools_param)
    for i, t in enumerate(tools):
        if t.function.parameters is not None:
            where = f"tools[{i}].function.parameters" if tools_param == "tools" else f"functions[{i}].parameters"
            check_schema(t.function.parameters, where)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise BadRequestError(f"{choice_param} names the function '{choice.function.name}', which is not "
                                  f"among the {tools_param}", param=choice_param)
        spec_choice: Any = {"name": choice.function.name}
    else:
        spec_choice = choice or "auto"
    return ToolSpec(tools=[t.model_dump(exclude_none=True) for t in tools], choice=spec_choice,
                    parallel=parallel is not False)


def _chat_logprobs(chunk: GenerateChunk) -> ChoiceLogprobs | None:
    if chunk.logprobs is None:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                     top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top])
        for lp in chunk.logprobs])


@dataclass
class _Tools:
    """A request's tool calling as its response is built: the parsers (one per choice) and the shape."""

    spec: ToolSpec
    fmt: ToolFormat
    legacy: bool

    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.spec.tools}

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.fmt, self.names())

    def finish_reason(self, reason: str | None, calls: int) -> str:
        if calls and reason in (None, "stop"):
            return "function_call" if self.legacy else "tool_calls"
        return reason or "stop"

    def message(self, parsed: Parsed) -> AssistantMessage:
        content = parsed.content.strip() if parsed.calls else parsed.content
        msg = AssistantMessage(content=content or (None if parsed.calls else ""))
        if parsed.calls and self.legacy:
            msg.function_call = FunctionCall(name=parsed.calls[0].name, arguments=parsed.calls[0].arguments)
        elif parsed.calls:
            msg.tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                              for c in parsed.calls]
        return msg

    def call_deltas(self, call: ParsedCall, index: int) -> list[DeltaMessage]:
        """A call as the two deltas clients accumulate: index, id and name, then the arguments."""
        if self.legacy:
            return [DeltaMessage(function_call=DeltaFunction(name=call.name, arguments="")),
                    DeltaMessage(function_call=DeltaFunction(arguments=call.arguments))]
        return [DeltaMessage(tool_calls=[DeltaToolCall(index=index, id=call.id, type="function",
                                                       function=DeltaFunction(name=call.name, arguments=""))]),
                DeltaMessage(tool_calls=[DeltaToolCall(index=index, function=DeltaFunction(arguments=call.arguments))])]


class ChatService(Service):
    def to_generate(self, body: ChatCompletionRequest) -> tuple[GenerateRequest, str | None, ToolSpec | None]:
        messages = [m.to_internal() for m in body.messages]
        spec = tool_spec(body)
        check_response_format(body.response_format)
        if body.legacy_functions and body.n > 1:
            raise BadRequestError("the legacy functions field takes n = 1", param="n")
        max_tokens, unset = resolve_max_tokens(body.requested_max_tokens(), self.cap)
        params = body.to_sampling_params(max_tokens, body.requested_logprobs())
        params.prompt_logprobs = body.prompt_logprobs
        req = GenerateRequest(request_id=new_id("chatcmpl"), messages=messages, chat_template=body.chat_template,
                              tools=spec, params=params, n=body.n, max_tokens_unset=unset,
                              add_generation_prompt=body.add_generation_prompt,
                              continue_final_message=body.continue_final_message,
                              chat_template_kwargs=body.chat_template_kwargs)
        return req, conversation_key(body.model, messages), spec

    def _tools(self, body: ChatCompletionRequest, spec: ToolSpec | None, started: StartedStream) -> _Tools | None:
        if spec is None:
            return None
        fmt = FORMATS.get(started.start.tool_format or DEFAULT_FORMAT, FORMATS[DEFAULT_FORMAT])
        return _Tools(spec, fmt, body.legacy_functions)

    async def complete(self, body: ChatCompletionRequest, charge: Charge | None = None) -> ChatCompletionResponse:
        req, key, spec = self.to_generate(body)
        started = await open_stream(self.upstream, body.model, req, key, self.metrics, charge)
        tools = self._tools(body, spec, started)
        choices = await collect(started, body.n)
        out = []
        for i, c in enumerate(choices):
            lp = None
            if body.logprobs:
                lp = _chat_logprobs(GenerateChunk(kind="delta", logprobs=c.logprobs))
            split = Split(content="".join(c.text))
            if started.start.reasoning is not None:
                split = parse_reasoning(split.content, started.start.reasoning == "open")
            if tools is None:
                message, finish = AssistantMessage(content=split.content), c.finish or "stop"
            else:
                parsed = parse_all(tools.fmt, tools.names(), split.content)
                message, finish = tools.message(parsed), tools.finish_reason(c.finish, len(parsed.calls))
            if split.reasoning:
                message.reasoning_content = message.reasoning = split.reasoning
            if body.prefilled():
                message.content = body.prefilled() + (message.content or "")
            out.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=lp))  # type: ignore[arg-type]
        usage = started.usage()
        prompt_lp = choices[0].prompt_logprobs if body.prompt_logprobs is not None else None
        return ChatCompletionResponse(id=req.request_id, created=now(), model=body.model,
                                      system_fingerprint=SYSTEM_FINGERPRINT, choices=out, usage=usage,
                                      prompt_logprobs=vllm_prompt(prompt_lp, body.prompt_logprobs or 0)
                                      if prompt_lp is not None else None)

    async def stream(self, body: ChatCompletionRequest, charge: Charge | None = None) -> AsyncIterator[str]:
        """Opens the worker stream first (errors raise before any byte is sent), then yields SSE events."""
        req, key, spec = self.to_generate(body)
        started = await open_stream(self.upstream, body.model, req, key, self.metrics, charge)
        return self._events(body, req.request_id, started, self._tools(body, spec, started))

    async def _events(self, body: ChatCompletionRequest, rid: str, started: StartedStream,
                      tools: _Tools | None) -> AsyncIterator[str]:
        created = now()

        def chunk_of(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse_data(ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices,
                                                system_fingerprint=SYSTEM_FINGERPRINT, usage=usage))

        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}

        def delta(chunk: GenerateChunk) -> str | None:
            if not (chunk.text or chunk.finish_reason or chunk.logprobs):
                return None
            if chunk.logprobs:
                return chunk_of([ChatChunkChoice(index=chunk.index, delta=DeltaMessage(content=chunk.text or None),
                                                 finish_reason=chunk.finish_reason, logprobs=_chat_logprobs(chunk))])
            # hot path: the same wire format as ChatCompletionChunk, built without pydantic
            choice: dict = {"index": chunk.index, "delta": {"content": chunk.text} if chunk.text else {}}
            if chunk.finish_reason:
                choice["finish_reason"] = chunk.finish_reason
            return sse_json({**head, "choices": [choice]})

        parsers = [tools.parser() for _ in range(body.n)] if tools is not None else []
        calls = [0] * body.n

        def tool_delta(chunk: GenerateChunk) -> str | None:
            assert tools is not None
            i, parser = chunk.index, parsers[chunk.index]
            parsed = parser.feed(chunk.text) if chunk.text else Parsed()
            if chunk.finish_reason:
                rest = parser.finish()
                parsed = Parsed(parsed.content + rest.content, parsed.calls + rest.calls)
            events = []
            if parsed.content or chunk.logprobs:
                events.append(chunk_of([ChatChunkChoice(index=i, delta=DeltaMessage(content=parsed.content or None),
                                                        logprobs=_chat_logprobs(chunk))]))
            for call in parsed.calls:
                if tools.legacy and calls[i]:
                    break  # the legacy shape holds one call
                events += [chunk_of([ChatChunkChoice(index=i, delta=d)]) for d in tools.call_deltas(call, calls[i])]
                calls[i] += 1
            if chunk.finish_reason:
                finish = tools.finish_reason(chunk.finish_reason, calls[i])
                events.append(chunk_of([ChatChunkChoice(index=i, delta=DeltaMessage(),
                                                        finish_reason=finish)]))  # type: ignore[arg-type]
            return "".join(events) or None

        content_of = tool_delta if tools is not None else delta
        thinkers = [ReasoningParser(started.start.reasoning == "open") for _ in range(body.n)] \
            if started.start.reasoning is not None else []

        def render(chunk: GenerateChunk) -> str | None:
            """A reasoning model's text is split first: its reasoning as `reasoning_content` deltas, the rest
            on to the content (and tool-call) rendering."""
            if not thinkers and chunk.prompt_logprobs is None:
                return content_of(chunk)
            events = []
            if chunk.prompt_logprobs is not None and body.prompt_logprobs is not None:
                events.append(sse_json({**head, "choices": [], "prompt_logprobs": vllm_prompt(
                    chunk.prompt_logprobs, body.prompt_logprobs)}))
            if thinkers:
                split = thinkers[chunk.index].feed(chunk.text, final=chunk.finish_reason is not None)
                if split.reasoning:
                    events.append(chunk_of([ChatChunkChoice(index=chunk.index, delta=DeltaMessage(
                        reasoning_content=split.reasoning, reasoning=split.reasoning))]))
                chunk = chunk.model_copy(update={"text": split.content})
            events.append(content_of(chunk) or "")
            return "".join(events) or None

        for i in range(body.n):
            yield chunk_of([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=body.prefilled()))])
        async for event in relay(started, render, lambda u: chunk_of([], u), body.include_usage()):
            yield event
