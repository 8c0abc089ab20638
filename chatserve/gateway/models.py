"""/v1/models and the tokenizer routes (/tokenize, /detokenize, vLLM's names)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from chatserve.gateway.deps import auth, worker_call
from chatserve.protocol.errors import NotFoundError
from chatserve.protocol.internal import DetokenizeRequest, TokenizeRequest
from chatserve.protocol.openai import ModelCard, ModelList

router = APIRouter(dependencies=[Depends(auth)])


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    models = await request.app.state.upstream.models()
    return ModelList(data=[ModelCard(id=m.name, max_model_len=m.context_length) for m in models.models])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    models = await request.app.state.upstream.models()
    for m in models.models:
        if m.name == model_id:
            return ModelCard(id=m.name, max_model_len=m.context_length)
    raise NotFoundError(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    return await worker_call(request, body.model, "/tokenize", body.model_dump(exclude_none=True))


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    return await worker_call(request, body.model, "/detokenize", body.model_dump())
