"""/v1/completions: text completions (several prompts in one request, echo, logprobs), streamed or not.

Scoring (lm-evaluation-harness's `local-completions`): `echo` with `logprobs` gives an entry for every
prompt token and then every generated one, from the prefill pass itself; `max_tokens: 0` scores the prompt
alone (the worker samples one token, which is dropped here). `prompt_logprobs` is vLLM's extension.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from chatserve.gateway.deps import Admit, Charge, auth, generation, limited, streaming
from chatserve.gateway.logprobs import end_offset, legacy, vllm_prompt
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
        if requested == 0 and body.scored_prompt() is None:
            raise BadRequestError("max_tokens 0 scores the prompt only: it needs echo with logprobs, or "
                                  "prompt_logprobs", param="max_tokens")
        max_tokens, _ = resolve_max_tokens(max(requested, 1), self.cap)
        check_response_format(body.response_format)
        params = body.to_sampling_params(max_tokens, body.logprobs)
        params.prompt_logprobs = body.scored_prompt()
        return GenerateRequest(
            request_id=new_id("cmpl"), prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=prompt if isinstance(prompt, list) else None, echo=body.echo,
            params=params, n=body.n)

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
        scores_only = body.max_tokens == 0
        for p_index, (started, parts) in enumerate(results):
            echo = (started.start.prompt_text or "") if body.echo else ""
            for i, c in enumerate(parts):
                if scores_only:
                    c.text, c.logprobs, c.finish = [], [], "length"
                choices.append(self._choice(body, p_index * body.n + i, echo + "".join(c.text), c.finish or "stop",
                                            c.prompt_logprobs, c.logprobs))
            u = started.usage()
            completion = 0 if scores_only else u.completion_tokens
            usage = Usage.of(usage.prompt_tokens + u.prompt_tokens, usage.completion_tokens + completion,
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

        scored = body.scored_prompt() is not None
        echo_text = (started.start.prompt_text or "") if body.echo else ""
        if echo_text and not scored:
            for i in range(body.n):
                yield chunk_of([CompletionChoice(index=i, text=echo_text)])
        # a scored prompt's entries come with its first delta: the echo is sent then, with them
        offsets = [0] * body.n  # where each choice's next text_offset starts
        scores_only = body.max_tokens == 0

        def sent(choice: CompletionChoice) -> str:
            offsets[choice.index] = end_offset(choice.logprobs, offsets[choice.index])
            return chunk_of([choice])

        def delta(chunk: GenerateChunk) -> str | None:
            events = []
            if chunk.prompt_logprobs is not None:
                events.append(sent(self._choice(body, chunk.index, echo_text, None, chunk.prompt_logprobs, [],
                                                offsets[chunk.index])))
            if scores_only:
                chunk = GenerateChunk(kind="delta", index=chunk.index, finish_reason=chunk.finish_reason and "length")
            if chunk.text or chunk.finish_reason:
                events.append(sent(self._choice(body, chunk.index, chunk.text, chunk.finish_reason, None,
                                                chunk.logprobs or [], offsets[chunk.index])))
            return "".join(events) or None

        async for event in relay(started, delta, lambda u: chunk_of([], u), body.include_usage()):
            yield event

    @staticmethod
    def _choice(body: CompletionRequest, index: int, text: str, finish: str | None, prompt: list[Any] | None,
                generated: list[Any], offset: int = 0) -> CompletionChoice:
        """A choice (or a stream chunk's): with `echo` and `logprobs`, the prompt's entries first; text
        offsets count on from `offset` (where a stream's entries sent before end)."""
        lp = None
        if body.logprobs is not None:
            lp = legacy(generated, legacy(prompt or [] if body.echo else [], start=offset), start=offset)
        pl = vllm_prompt(prompt, body.prompt_logprobs) if prompt is not None and body.prompt_logprobs is not None else None
        return CompletionChoice(index=index, text=text, finish_reason=finish,  # type: ignore[arg-type]
                                logprobs=lp, prompt_logprobs=pl)

