"""/v1/embeddings: mean-pooled, normalised hidden states from a worker, shortened to `dimensions`."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request

from chatserve.gateway.deps import Admit, limited, worker_call
from chatserve.protocol.embeddings import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from chatserve.protocol.errors import BadRequestError
from chatserve.protocol.internal import EmbedResponse

MAX_EMBEDDING_INPUTS = 2048
router = APIRouter()


def encode_embedding(b64: str, dimensions: int | None, encoding_format: str) -> list[float] | str:
    """A worker's base64 float32 vector, shortened to `dimensions` (and normalised again) if asked."""
    if dimensions is None and encoding_format == "base64":
        return b64
    vec = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    if dimensions is not None:
        vec = vec[:dimensions]
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
    if encoding_format == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode()
    return vec.tolist()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, admit: Admit = Depends(limited)) -> EmbeddingResponse:
    charge = admit(0)
    inputs = body.inputs()
    if not inputs or any(len(x) == 0 for x in inputs):
        raise BadRequestError("input must be a non-empty string, or a non-empty list of non-empty strings "
                              "or token-id lists", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise BadRequestError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    reply = await worker_call(request, body.model, "/embed", {"inputs": inputs}, timeout=600.0)
    out = EmbedResponse(**reply)
    if body.dimensions is not None and body.dimensions > out.dim:
        raise BadRequestError(f"dimensions must be at most {out.dim} for this model", param="dimensions")
    request.app.state.metrics.prompt_tokens.labels(body.model).inc(out.prompt_tokens)
    charge(out.prompt_tokens)
    data = [EmbeddingData(index=i, embedding=encode_embedding(e, body.dimensions, body.encoding_format))
            for i, e in enumerate(out.embeddings)]
    usage = EmbeddingUsage(prompt_tokens=out.prompt_tokens, total_tokens=out.prompt_tokens)
    return EmbeddingResponse(data=data, model=body.model, usage=usage)
