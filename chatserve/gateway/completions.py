"""/v1/completions: text completions (several prompts in one request, echo, logprobs), streamed or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from chatserve.gateway.deps import Admit, Charge, auth, generation, limited, streaming
from chatserve.gateway.sse import sse_data
from chatserve.gateway.streams import (
    SYSTEM_FINGERPRINT,
    Service,
    StartedStream,
    _Choice,
    check_response_format,
    collect,
    open_stream,
    relay,
    resolve_max_tokens,
)
from chatserve.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from chatserve.protocol.errors import BadRequestError
from chatserve.protocol.internal import GenerateChunk, GenerateRequest
from chatserve.protocol.openai import Usage, new_id, now

router = APIRouter()


@router.post("/v1/completions", response_model=None, responses=streaming(CompletionResponse))
async def completions(body: CompletionRequest, request: Request, admit: Admit = Depends(limited),
                      caller: str = Depends(auth)) -> Any:
    return await generation(request, request.app.state.completions, body, admit, caller)


class CompletionService(Service):
    def to_generate(self, body: CompletionRequest, prompt: str | list[int]) -> GenerateRequest:
        # OpenAI's legacy default for completions is 16 tokens
        requested = body.max_tokens if body.max_tokens is not None else min(16, self.cap)
        max_tokens, _ = resolve_max_tokens(requested, self.cap)
        check_response_format(body.response_format)
        return GenerateRequest(
            request_id=new_id("cmpl"), prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=prompt if isinstance(prompt, list) else None, echo=body.echo,
            params=body.to_sampling_params(max_tokens, body.logprobs), n=body.n)

    def _prompts(self, body: CompletionRequest) -> list[str | list[int]]:
        prompts = body.prompts()
        if not prompts:
            raise BadRequestError("prompt must not be empty", param="prompt")
        if len(prompts) * body.n > 64:
            raise BadRequestError("at most 64 prompts x n per request", param="prompt")
        return prompts

    async def complete(self, body: CompletionRequest, charge: Charge | None = None) -> CompletionResponse:
        prompts = self._prompts(body)

        async def one(prompt: str | list[int]) -> tuple[StartedStream, list[_Choice]]:
            started = await open_stream(self.upstream, body.model, self.to_generate(body, prompt), None,
                                        self.metrics, charge)
            return started, await collect(started, body.n)

        rid, choices, usage = new_id("cmpl"), [], Usage()
        # all prompts are in the engine's batch at once; the first failure cancels the others
        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        for p_index, (started, parts) in enumerate(results):
            echo = (started.start.prompt_text or "") if body.echo else ""
            for i, c in enumerate(parts):
                choices.append(CompletionChoice(index=p_index * body.n + i, text=echo + "".join(c.text),
                                                finish_reason=c.finish or "stop",  # type: ignore[arg-type]
                                                logprobs=_completion_logprobs(c.logprobs) if body.logprobs is not None else None))
            u = started.usage()
            usage = Usage.of(usage.prompt_tokens + u.prompt_tokens, usage.completion_tokens + u.completion_tokens,
                             usage.prompt_tokens_details.cached_tokens + u.prompt_tokens_details.cached_tokens)
        return CompletionResponse(id=rid, created=now(), model=body.model, system_fingerprint=SYSTEM_FINGERPRINT,
                                  choices=choices, usage=usage)

    async def stream(self, body: CompletionRequest, charge: Charge | None = None) -> AsyncIterator[str]:
        prompts = self._prompts(body)
        if len(prompts) != 1:
            raise BadRequestError("streaming supports one prompt per request", param="prompt")
        req = self.to_generate(body, prompts[0])
        started = await open_stream(self.upstream, body.model, req, None, self.metrics, charge)
        return self._events(body, req.request_id, started)

    async def _events(self, body: CompletionRequest, rid: str, started: StartedStream) -> AsyncIterator[str]:
        created = now()

        def chunk_of(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse_data(CompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                               system_fingerprint=SYSTEM_FINGERPRINT, usage=usage))

        if body.echo and started.start.prompt_text:
            for i in range(body.n):
                yield chunk_of([CompletionChoice(index=i, text=started.start.prompt_text)])
        def delta(chunk: GenerateChunk) -> str | None:
            if not (chunk.text or chunk.finish_reason):
                return None
            lp = _completion_logprobs(chunk.logprobs or []) if body.logprobs is not None else None
            return chunk_of([CompletionChoice(index=chunk.index, text=chunk.text, finish_reason=chunk.finish_reason,
                                              logprobs=lp)])

        async for event in relay(started, delta, lambda u: chunk_of([], u), body.include_usage()):
            yield event


def _completion_logprobs(items: list[Any]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t: v for t, v in lp.top} if lp.top else None)
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out

