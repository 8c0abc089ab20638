"""/v1/responses: the Responses API (what `client.responses.create` and the OpenAI Agents SDK call).

A request becomes a chat request (instructions as the system message, the stored conversation of
`previous_response_id`, then the input items: messages, `function_call`, `function_call_output`), so
templates, tool calling, constrained decoding (`text.format`, `tool_choice`) and reasoning output are the
chat path's. The reply is built as typed events (`response.created` ... `response.completed`, each with its
`sequence_number`): streamed as server-sent events, or drained into the final `response` object. A
reasoning model's span becomes a `reasoning` item, text a `message` item, each call a `function_call`
item. With `store` (the default) the response, its input items and its conversation are saved
(response_store.py): a later request continues it by id, from any gateway on the same database.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse

from chatserve.gateway.chat import ChatService, _Tools
from chatserve.gateway.deps import SSE_HEADERS, Admit, Charge, auth, isolate_cache, limited, reserve_of
from chatserve.gateway.response_store import ResponseStore, StoredResponse, owner_of
from chatserve.gateway.streams import StartedStream, open_stream
from chatserve.http import validation_message, validation_param
from chatserve.protocol.chat import ChatCompletionRequest, ChatMessage
from chatserve.protocol.errors import BadRequestError, ChatServeError, NotFoundError
from chatserve.protocol.responses import (
    DeletedResponse,
    InputItemList,
    ResponseObject,
    ResponsesRequest,
    item_id,
    now_s,
)
from chatserve.tools.parsers import Parsed, ToolCallParser
from chatserve.tools.reasoning import ReasoningParser, Split

router = APIRouter()

HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                "computer", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom", "namespace")


@dataclass
class _Job:
    """A Responses request resolved to the chat request it runs as."""

    body: ResponsesRequest
    chat: ChatCompletionRequest
    owner: str
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]  # the stored conversation (previous_response_id's) and this input, as chat messages

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)


# --- input ---------------------------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or parts of text (input_text, output_text, refusal)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            out.append(str(part.get("text", "")))
        elif kind == "refusal":
            out.append(str(part.get("refusal", "")))
        else:
            raise BadRequestError(f"content part type {kind!r} is not supported by this server (text only)",
                                  param=f"{where}.content[{j}].type")
    return "".join(out)


def read_input(body: ResponsesRequest) -> tuple[list[ChatMessage], list[dict[str, Any]]]:
    """The input as chat messages, and as the input items `input_items` lists (each with an id)."""
    if isinstance(body.input, str):
        return [ChatMessage(role="user", content=body.input)], [
            {"id": item_id("msg"), "type": "message", "role": "user", "status": "completed",
             "content": [{"type": "input_text", "text": body.input}]}]
    messages: list[ChatMessage] = []
    items: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call_id -> function name, for the tool messages that answer them
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        stored = {k: v for k, v in item.items()}
        stored.setdefault("id", item_id({"message": "msg", "function_call": "fc"}.get(kind, "item")))
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequestError(f"{where}.role must be user, assistant, system or developer", param=f"{where}.role")
            messages.append(ChatMessage(role=role, content=_text_of(item.get("content"), where)))
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(item.get("arguments"), str):
                raise BadRequestError(f"{where} (function_call) needs call_id, name and arguments as strings",
                                      param=where)
            names[call_id] = name
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # one assistant turn: its text and its calls
                last.tool_calls = [*(last.tool_calls or []), call]  # type: ignore[list-item]
                messages[-1] = ChatMessage.model_validate(last.model_dump())
            else:
                messages.append(ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]}))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise BadRequestError(f"{where} (function_call_output) needs the call_id it answers",
                                      param=f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, where)
            messages.append(ChatMessage(role="tool", content=text, tool_call_id=call_id, name=names.get(call_id)))
        elif kind == "reasoning":
            pass  # an earlier reply's reasoning, handed back: templates do not replay it
        else:
            raise BadRequestError(f"input item type {kind!r} is not supported by this server", param=f"{where}.type")
        items.append(stored)
    if not messages:
        raise BadRequestError("input holds no message", param="input")
    return messages, items


def _chat_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Function tools and tool choice in the chat shape; hosted tools are refused by name."""
    tools = None
    if body.tools is not None:
        tools = []
        for i, t in enumerate(body.tools):
            kind = t.get("type")
            if kind != "function":
                what = f"the hosted tool {kind!r}" if kind in HOSTED_TOOLS else f"tool type {kind!r}"
                raise BadRequestError(f"{what} is not available on this server: only function tools are",
                                      param=f"tools[{i}].type")
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
            tools.append({"type": "function", "function": fn})
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise BadRequestError("tool_choice must be none, auto, required or {type: function, name}",
                                  param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise BadRequestError("text.format json_schema needs a schema", param="text.format.schema")
    spec = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


def _as_chat(body: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    tools, choice = _chat_tools(body)
    fields: dict[str, Any] = {
        "model": body.model, "messages": messages, "tools": tools, "tool_choice": choice,
        "parallel_tool_calls": body.parallel_tool_calls, "max_completion_tokens": body.max_output_tokens,
        "response_format": _response_format(body), "stream": bool(body.stream)}
    if body.temperature is not None:
        fields["temperature"] = body.temperature
    if body.top_p is not None:
        fields["top_p"] = body.top_p
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except pydantic.ValidationError as exc:
        errors = list(exc.errors())
        raise BadRequestError(validation_message(errors), param=validation_param(errors)) from None


# --- output --------------------------------------------------------------------------------------------


@dataclass
class _Builder:
    """The reply as the Responses API's events: output items opened and closed as the text arrives."""

    job: _Job
    rid: str
    created: int
    seq: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    open_kind: str = ""  # the item being written: "reasoning", "message" or ""

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def response(self, status: str, usage: dict[str, Any] | None = None,
                 incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.job.body
        text = "".join(p["text"] for it in self.output if it["type"] == "message" for p in it["content"])
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        obj = ResponseObject(
            id=self.rid, created_at=self.created, completed_at=now_s() if status != "in_progress" else None,
            status=status, model=b.model, output=self.output, output_text=text, instructions=b.instructions,  # type: ignore[arg-type]
            previous_response_id=b.previous_response_id, tools=b.tools or [], tool_choice=b.tool_choice or "auto",
            parallel_tool_calls=b.parallel_tool_calls is not False, temperature=b.temperature, top_p=b.top_p,
            max_output_tokens=b.max_output_tokens, text={"format": fmt}, store=b.store is not False,
            metadata=b.metadata or {}, user=b.user, truncation=b.truncation or "disabled",
            incomplete_details=incomplete, usage=usage)
        return obj.model_dump()

    def _open(self, kind: str) -> list[dict[str, Any]]:
        events = self._close()
        index = len(self.output)
        if kind == "reasoning":
            item: dict[str, Any] = {"id": item_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                                    "content": [{"type": "reasoning_text", "text": ""}]}
        else:
            item = {"id": item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.output.append(item)
        self.open_kind = kind
        part = dict(item["content"][0])
        empty = {**item, "content": []}
        events.append(self.event("response.output_item.added", output_index=index, item=empty))
        events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                 content_index=0, part=part))
        return events

    def _close(self) -> list[dict[str, Any]]:
        if not self.open_kind:
            return []
        index, item = len(self.output) - 1, self.output[-1]
        part = item["content"][0]
        item["status"] = "completed"
        if self.open_kind == "reasoning":
            done = self.event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"])
        else:
            done = self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"], logprobs=[])
        self.open_kind = ""
        return [done,
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=item)]

    def text(self, kind: str, delta: str) -> list[dict[str, Any]]:
        if not delta:
            return []
        events = self._open(kind) if self.open_kind != kind else []
        index, item = len(self.output) - 1, self.output[-1]
        item["content"][0]["text"] += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self.event(name, item_id=item["id"], output_index=index, content_index=0, delta=delta, **extra))
        return events

    def call(self, name: str, arguments: str, call_id: str) -> list[dict[str, Any]]:
        events = self._close()
        index = len(self.output)
        item = {"id": item_id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": "",
                "status": "in_progress"}
        self.output.append(item)
        events.append(self.event("response.output_item.added", output_index=index, item=dict(item)))
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=arguments))
        item["arguments"], item["status"] = arguments, "completed"
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=name, arguments=arguments))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self) -> list[dict[str, Any]]:
        return self._close()


def _usage(started: StartedStream) -> dict[str, Any]:
    u = started.usage()
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _output_message(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply's output items as the chat message the next turn renders (its text and its calls)."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in output if it["type"] == "function_call"]
    msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


class ResponsesService(ChatService):
    def __init__(self, *args: Any, store: ResponseStore | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.store = store

    async def resolve(self, body: ResponsesRequest, caller: str) -> _Job:
        owner = owner_of(caller)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            prev = await self.store.get(owner, body.previous_response_id) if self.store is not None else None
            if prev is None:
                raise NotFoundError(f"no stored response with id '{body.previous_response_id}'",
                                    param="previous_response_id")
            history = prev.conversation
        new, items = read_input(body)
        messages = [ChatMessage.model_validate(m) for m in history] + new
        if body.instructions:
            messages.insert(0, ChatMessage(role="system", content=body.instructions))
        convo = history + [m.model_dump(exclude_none=True) for m in new]
        return _Job(body, _as_chat(body, messages), owner, items, convo)

    async def events(self, job: _Job, charge: Charge | None = None) -> AsyncIterator[dict[str, Any]]:
        """Opens the worker stream (errors raise before any event), then the reply's events."""
        req, key, spec = self.to_generate(job.chat)
        started = await open_stream(self.upstream, job.chat.model, req, key, self.metrics, charge)
        tools = self._tools(job.chat, spec, started)
        return self._events(job, started, tools)

    async def _events(self, job: _Job, started: StartedStream, tools: _Tools | None) -> AsyncIterator[dict[str, Any]]:
        """The reply's events; a worker failing mid-reply ends a stream with an `error` event, and raises
        for a non-streaming request (its status kept)."""
        out = _Builder(job, item_id("resp"), now_s())
        yield out.event("response.created", response=out.response("in_progress"))
        yield out.event("response.in_progress", response=out.response("in_progress"))
        thinker = ReasoningParser(started.start.reasoning == "open") if started.start.reasoning else None
        parser: ToolCallParser | None = tools.parser() if tools is not None else None
        finish = None
        try:
            async for chunk in started.rest():
                split = thinker.feed(chunk.text, final=chunk.finish_reason is not None) if thinker is not None \
                    else Split(content=chunk.text)
                for ev in out.text("reasoning", split.reasoning):
                    yield ev
                parsed = parser.feed(split.content) if parser is not None else Parsed(split.content)
                if chunk.finish_reason and parser is not None:
                    rest_p = parser.finish()
                    parsed = Parsed(parsed.content + rest_p.content, parsed.calls + rest_p.calls)
                content = parsed.content
                if out.open_kind != "message" and not content.strip():
                    content = ""  # whitespace between items opens no message
                for ev in out.text("message", content):
                    yield ev
                for c in parsed.calls:
                    for ev in out.call(c.name, c.arguments, c.id):
                        yield ev
                if chunk.finish_reason:
                    finish = chunk.finish_reason
        except ChatServeError as exc:
            if not job.stream:
                raise
            yield out.event("error", code=str(exc.code), message=exc.message, param=exc.param)
            return
        for ev in out.finish():
            yield ev
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        final = out.response("incomplete" if incomplete else "completed", _usage(started), incomplete)
        if job.body.store is not False and self.store is not None:
            await self.store.put(job.owner, StoredResponse(final, job.input_items,
                                                           job.history + _output_message(out.output)))
        # a reply cut by max_output_tokens ends with response.completed too (status "incomplete"), as vLLM's
        # does: the SDK's stream helpers and the Agents SDK take their final response from that event alone
        yield out.event("response.completed", response=final)

    async def complete(self, job: _Job, charge: Charge | None = None) -> dict[str, Any]:  # type: ignore[override]
        final: dict[str, Any] | None = None
        async for ev in await self.events(job, charge):
            if ev["type"] == "response.completed":
                final = ev["response"]
        assert final is not None
        return final

    async def stream(self, job: _Job, charge: Charge | None = None) -> AsyncIterator[str]:  # type: ignore[override]
        events = await self.events(job, charge)

        async def sse() -> AsyncIterator[str]:
            async for ev in events:
                yield f"event: {ev['type']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n"
        return sse()


def _service(request: Request) -> ResponsesService:
    return request.app.state.responses


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request, admit: Admit = Depends(limited),
                          caller: str = Depends(auth)) -> Any:
    service = _service(request)
    job = await service.resolve(body, caller)
    isolate_cache(request, job.chat, caller)
    charge = admit(reserve_of(job.chat, request.app.state.settings.max_tokens_cap))
    try:
        if job.stream:
            return StreamingResponse(await service.stream(job, charge), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await service.complete(job, charge)
    except BaseException:
        charge(0)
        raise


async def _stored(request: Request, response_id: str, caller: str) -> StoredResponse:
    store = _service(request).store
    found = await store.get(owner_of(caller), response_id) if store is not None else None
    if found is None:
        raise NotFoundError(f"no stored response with id '{response_id}'", param="response_id")
    return found


ResponseId = Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(request: Request, response_id: str = ResponseId, caller: str = Depends(auth)) -> Any:
    return (await _stored(request, response_id, caller)).response


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(request: Request, response_id: str = ResponseId, caller: str = Depends(auth)) -> DeletedResponse:
    store = _service(request).store
    if store is None or not await store.delete(owner_of(caller), response_id):
        raise NotFoundError(f"no stored response with id '{response_id}'", param="response_id")
    return DeletedResponse(id=response_id)


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList)
async def input_items(request: Request, response_id: str = ResponseId, caller: str = Depends(auth),
                      order: str = Query("desc", pattern="^(asc|desc)$"), limit: int = Query(20, ge=1, le=100),
                      after: str | None = None) -> InputItemList:
    items = list((await _stored(request, response_id, caller)).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [it.get("id") for it in items]
        if after not in ids:
            raise BadRequestError(f"no input item with id '{after}' in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return InputItemList(data=page, first_id=page[0].get("id") if page else None,
                         last_id=page[-1].get("id") if page else None, has_more=len(items) > limit)
