"""The web UI's client of the gateway's /v1 API (the official openai SDK, async).

The UI never renders prompts itself: it sends messages, the worker renders them, so the UI and the API
can never disagree about templates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai


@dataclass
class GatewayClient:
    api_url: str
    api_key: str = ""

    def _client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.api_url, api_key=self.api_key or "none", max_retries=0, timeout=600)

    async def models(self) -> list[str]:
        client = self._client()
        try:
            return [m.id for m in (await client.models.list()).data]
        finally:
            await client.close()

    async def stream_chat(self, model: str, messages: list[dict[str, str]], temperature: float, top_p: float,
                          max_tokens: int) -> AsyncIterator[str]:
        client = self._client()
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, temperature=temperature,  # type: ignore[arg-type]
                top_p=top_p, max_tokens=max_tokens)
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        finally:
            await client.close()
