import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from chatserve.gateway.sse import sse_data, sse_done, sse_error
from chatserve.http import install_error_handlers
from chatserve.protocol.chat import ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, DeltaMessage
from chatserve.protocol.completions import CompletionRequest
from chatserve.protocol.errors import (
    ContextLengthError,
    NotFoundError,
    OverloadedError,
    ServiceUnavailableError,
    error_from_envelope,
)
from chatserve.protocol.internal import GenerateChunk, GenerateRequest, Message


def test_chat_request_converts_to_sampling_params():
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                stop="###", seed=7, max_completion_tokens=12, top_k=5)
    p = req.to_sampling_params(req.requested_max_tokens() or 0)
    assert (p.max_tokens, p.temperature, p.stop, p.seed, p.top_k, p.greedy) == (12, 0, ["###"], 7, 5, True)


def test_text_parts_and_developer_role_become_plain_messages():
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert [m.plain() for m in req.messages] == [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "ab"}]


@pytest.mark.parametrize("field,value", [("temperature", 3), ("top_p", 0), ("n", 0), ("max_tokens", 0),
                                         ("presence_penalty", 5), ("stop", ["a"] * 5),
                                         ("seed", 2**64), ("audio", {"voice": "alloy"}),
                                         ("modalities", ["audio"]), ("web_search_options", {})])
def test_chat_request_refuses_bad_or_unsupported_fields(field, value):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **{field: value})


def test_completion_prompt_forms_normalise():
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]


def test_internal_messages_round_trip():
    req = GenerateRequest(request_id="r", messages=[Message(role="user", content="hi")])
    assert GenerateRequest(**json.loads(req.model_dump_json())) == req
    chunk = GenerateChunk(kind="delta", text="é", token_ids=[5], finish_reason="stop")
    assert GenerateChunk(**json.loads(chunk.model_dump_json(exclude_defaults=True))) == chunk


def test_sse_encoding():
    chunk = ChatCompletionChunk(id="c", created=1, model="m",
                                choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content="hi"))])
    line = sse_data(chunk)
    assert line.startswith("data: ") and line.endswith("\n\n")
    assert json.loads(line[6:])["choices"][0]["delta"] == {"content": "hi"}
    assert sse_done() == "data: [DONE]\n\n"
    err = json.loads(sse_error(ServiceUnavailableError("gone"))[6:])
    assert err["error"]["type"] == "ServiceUnavailableError" and err["error"]["code"] == 503


def test_envelope_round_trip_keeps_class_and_param():
    err = error_from_envelope(404, NotFoundError("no such model", param="model").to_dict())
    assert isinstance(err, NotFoundError) and err.param == "model"
    assert isinstance(error_from_envelope(429, {"error": {"message": "x"}}), OverloadedError)
    assert error_from_envelope(502, "garbage").status_code == 500


def _app() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/chat")
    async def chat(body: ChatCompletionRequest) -> dict:
        return {"ok": True}

    @app.get("/ctx")
    async def ctx() -> dict:
        raise ContextLengthError("too long", param="messages")

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internal detail at 10.1.2.3")

    return TestClient(app, raise_server_exceptions=False)


def test_error_mapping_uses_openai_envelope_and_status():
    c = _app()
    r = c.post("/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = c.post("/chat", json={"model": "m", "messages": [], "temperature": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("messages", "temperature")
    r = c.get("/ctx")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = c.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = c.get("/boom")
    assert r.status_code == 500 and "10.1.2.3" not in r.text and "Traceback" not in r.text


def test_fast_chunk_encoding_matches_the_pydantic_wire_format():
    from worker.app import encode_chunk, to_chunk
    from worker.engine.engine import SeqOutput

    out = SeqOutput("r", 1, "hé", [5, 6], True, "stop", 10, 2, 4)
    fast = json.loads(encode_chunk(out, None))
    slow = json.loads(to_chunk(out, None).model_dump_json(exclude_defaults=True))
    assert GenerateChunk(**fast) == GenerateChunk(**slow)
