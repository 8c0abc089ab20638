"""The web UI's client of the gateway (the official openai SDK for /v1, httpx for /tokenize and /status).

The UI never renders prompts itself: it sends messages, the worker renders them, so the UI and the API
can never disagree about templates.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai


@dataclass
class Reply:
    """What one streamed reply produced, with its timings and usage (stored with the message)."""

    text: str = ""
    started: float = field(default_factory=time.monotonic)
    ttft_s: float | None = None
    duration_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


@dataclass
class GatewayClient:
    api_url: str
    api_key: str = ""

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.api_url, api_key=self.api_key or "none", max_retries=0, timeout=600)

    @property
    def root(self) -> str:
        url = self.api_url.rstrip("/")
        return url.removesuffix("/v1")

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def models(self) -> list[tuple[str, int | None]]:
        """(id, max_model_len) of every served model."""
        client = self._client()
        try:
            return [(m.id, getattr(m, "max_model_len", None)) for m in (await client.models.list()).data]
        finally:
            await client.close()

    async def count_tokens(self, model: str, messages: list[dict[str, str]],
                           http: httpx.AsyncClient | None = None) -> tuple[int, int]:
        """(prompt tokens as the worker renders them, the model's context length). Pass `http` to reuse one
        connection over several counts (trimming a long chat counts once per dropped turn)."""
        if http is None:
            async with httpx.AsyncClient(timeout=30) as own:
                return await self.count_tokens(model, messages, own)
        r = await http.post(f"{self.root}/tokenize", headers=self._headers(), json={"model": model, "messages": messages})
        r.raise_for_status()
        body = r.json()
        return int(body["count"]), int(body["max_model_len"])

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{self.root}/status", headers=self._headers())
            r.raise_for_status()
            return r.json()

    async def stream_chat(self, model: str, messages: list[dict[str, str]], temperature: float, top_p: float,
                          max_tokens: int, reply: Reply | None = None) -> AsyncIterator[str]:
        """Yield text deltas; `reply` (if given) collects timings, usage and the finish reason.

        Closing the iterator (Stop in the UI) closes the HTTP stream, which aborts the request in the engine.
        """
        reply = reply if reply is not None else Reply()
        client = self._client()
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, temperature=temperature,  # type: ignore[arg-type]
                top_p=top_p, max_tokens=max_tokens, stream_options={"include_usage": True})
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        reply.prompt_tokens = chunk.usage.prompt_tokens
                        reply.completion_tokens = chunk.usage.completion_tokens
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.finish_reason:
                        reply.finish_reason = choice.finish_reason
                    if choice.delta.content:
                        if reply.ttft_s is None:
                            reply.ttft_s = time.monotonic() - reply.started
                        reply.text += choice.delta.content
                        yield choice.delta.content
        finally:
            reply.duration_s = time.monotonic() - reply.started
            await client.close()
