"""UI callbacks as plain functions (unit-tested without a browser).

History is Gradio's messages format: `[{"role": "user"|"assistant", "content": ...}]`; content may come
back from the browser as a string or as a list of parts, so `text_of` normalises it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai

from webui.client import GatewayClient

History = list[dict[str, Any]]


def text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return str(content)


def to_api_messages(history: History, system: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant"):
            text = text_of(m.get("content"))
            if m["role"] == "assistant" and (not text or text.startswith("⚠️")):
                continue  # errors and empty replies are not part of the conversation
            msgs.append({"role": m["role"], "content": text})
    return msgs


def add_user_message(message: str, history: History | None, max_chars: int) -> tuple[str, History]:
    history = list(history or [])
    message = (message or "").strip()
    if not message:
        return "", history
    if len(message) > max_chars:
        history.append({"role": "assistant", "content": f"⚠️ Message too long ({len(message)} characters; the limit is {max_chars})."})
        return message, history
    history.append({"role": "user", "content": message})
    return "", history


def error_text(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        try:
            msg = exc.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = str(exc)
        return f"⚠️ Error {exc.status_code}: {msg}"
    if isinstance(exc, openai.APIConnectionError):
        return "⚠️ Cannot reach the API gateway. Is it running?"
    return f"⚠️ {type(exc).__name__}: {exc}"


async def respond(client: GatewayClient, history: History, model: str, system: str, temperature: float,
                  top_p: float, max_tokens: int) -> AsyncIterator[History]:
    """Stream the assistant's reply to the last user message into the history."""
    history = list(history or [])
    if not history or history[-1].get("role") != "user":
        yield history
        return
    if not model:
        history.append({"role": "assistant", "content": "⚠️ No model selected (is a worker running?)."})
        yield history
        return
    messages = to_api_messages(history, system)
    history.append({"role": "assistant", "content": ""})
    parts: list[str] = []
    try:
        async for delta in client.stream_chat(model, messages, temperature, top_p, int(max_tokens)):
            parts.append(delta)
            history[-1] = {"role": "assistant", "content": "".join(parts)}
            yield history
    except (openai.APIError, OSError) as exc:
        history[-1] = {"role": "assistant", "content": ("".join(parts) + "\n\n" if parts else "") + error_text(exc)}
    yield history


def regenerate_history(history: History | None) -> History:
    """Drop the last assistant reply so the last user message is answered again."""
    history = list(history or [])
    while history and history[-1].get("role") == "assistant":
        history.pop()
    return history


async def model_choices(client: GatewayClient) -> tuple[list[str], str | None]:
    try:
        models = await client.models()
    except (openai.APIError, OSError):
        return [], None
    return models, (models[0] if models else None)
