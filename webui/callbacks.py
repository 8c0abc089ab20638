"""UI callbacks as plain functions (unit-tested without a browser).

History is Gradio's messages format: `[{"role": "user"|"assistant", "content": ...}]`; content may come
back from the browser as a string or as a list of parts, so `text_of` normalises it. Notices the UI adds
to the chat (errors, "oldest turns left out") start with ⚠ or ℹ: they are shown, never sent to the model
and never stored, so a message's stored position is its index among the other messages.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from webui.client import GatewayClient, Reply
from webui.store import Store, StoredMessage

History = list[dict[str, Any]]
NOTICE_MARKS = ("⚠", "ℹ")  # (drawn by common fonts; the emoji forms start with these too)
WINNERS = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}


@dataclass
class Limits:
    max_message_chars: int = 8000
    max_turns: int = 100


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


_MD_IMAGE = re.compile(r"!\[([^\]]*)\](\(|\[)")
_HTML_IMAGE = re.compile(r"<(img|image|picture|source|video|audio|iframe)\b", re.IGNORECASE)


def no_remote_images(text: str) -> str:
    """A model's reply as the chat shows it: Markdown images become links and image-like HTML tags text,
    so the browser fetches nothing a reply names (a prompt-injected reply could otherwise leak the chat
    through an image URL's query string). The link stays visible and clickable."""
    text = _MD_IMAGE.sub(lambda m: f"[image: {m.group(1) or 'link'}]{m.group(2)}", text)
    return _HTML_IMAGE.sub(lambda m: "&lt;" + m.group(1), text)


def is_notice(m: dict[str, Any]) -> bool:
    return m.get("role") == "assistant" and text_of(m.get("content")).startswith(NOTICE_MARKS)


def notice(text: str, mark: str = "⚠") -> dict[str, str]:
    return {"role": "assistant", "content": f"{mark} {text}"}


def conversation_messages(history: History) -> list[dict[str, str]]:
    """The real user/assistant messages of a displayed chat (notices and empty replies dropped)."""
    out = []
    for m in history or []:
        if m.get("role") not in ("user", "assistant") or is_notice(m):
            continue
        text = text_of(m.get("content"))
        if m["role"] == "assistant" and not text:
            continue
        out.append({"role": m["role"], "content": text})
    return out


def to_api_messages(history: History, system: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return msgs + conversation_messages(history)


def stored_position(history: History, index: int) -> int | None:
    """The stored position of the displayed message at `index` (None for a notice)."""
    if not 0 <= index < len(history) or is_notice(history[index]):
        return None
    return len(conversation_messages(history[:index]))


def add_user_message(message: str, history: History | None, limits: Limits) -> tuple[str, History]:
    """Append the user's message; on a broken limit keep the text in the box and say why in the chat."""
    history = list(history or [])
    while history and is_notice(history[-1]):  # an earlier error is answered by sending again
        history.pop()
    message = (message or "").strip()
    if not message:
        return "", history
    if len(message) > limits.max_message_chars:
        history.append(notice(f"Message too long ({len(message):,} characters; the limit is "
                              f"{limits.max_message_chars:,}). Shorten it and send again."))
        return message, history
    turns = sum(1 for m in conversation_messages(history) if m["role"] == "user")
    if turns >= limits.max_turns:
        history.append(notice(f"This chat has reached {limits.max_turns} turns, the limit. Start a new chat."))
        return message, history
    history.append({"role": "user", "content": message})
    return "", history


def error_text(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        try:
            msg = exc.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = str(exc)
        hint = {429: " The server is busy: try again in a moment.", 503: " No worker serves this model right now."}
        return f"⚠ Error {exc.status_code}: {msg}{hint.get(exc.status_code, '')}"
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError, OSError)):
        return "⚠ Lost the connection to the API gateway. Is it running? Send again to retry."
    return f"⚠ {type(exc).__name__}: {exc}"


# --- context -----------------------------------------------------------------------------------------------

TokenCounter = Callable[[list[dict[str, str]]], Awaitable[tuple[int, int]]]


@dataclass
class Fit:
    messages: list[dict[str, str]]
    max_tokens: int
    dropped_turns: int = 0
    context: int = 0


class DoesNotFit(Exception):
    pass


async def fit_context(count: TokenCounter, messages: list[dict[str, str]], max_tokens: int,
                      min_reply: int = 16) -> Fit:
    """Drop the oldest turns (never the system prompt, never the last user message) until the prompt
    and the reply fit the model's context; shrink `max_tokens` if only that makes it fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while True:
        n, context = await count(system + rest)
        if n + max_tokens <= context:
            return Fit(system + rest, max_tokens, dropped, context)
        # the oldest turn is a user message and the replies up to the next user message
        nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if nxt is None:
            if context - n >= min_reply:
                return Fit(system + rest, context - n, dropped, context)
            raise DoesNotFit(f"The message is too long for the model's context ({n:,} prompt tokens of "
                             f"{context:,}). Shorten it or start a new chat.")
        rest = rest[nxt:]
        dropped += 1


# --- chat --------------------------------------------------------------------------------------------------


@dataclass
class ChatParams:
    model: str
    system: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


def title_of(history: History) -> str:
    first = next((m["content"] for m in conversation_messages(history) if m["role"] == "user"), "New chat")
    first = " ".join(first.split())
    return first if len(first) <= 60 else first[:57] + "..."


CHECKPOINT_S = 1.0  # a streaming reply is stored this often: a UI killed mid-reply keeps what it had


def persist(store: Store, owner: str, conv_id: str | None, history: History, p: ChatParams,
            reply: Reply | None = None, mode: str = "chat", streaming: bool = False) -> str:
    """Store the displayed chat (creating the conversation on its first message); returns its id.

    `reply` carries the timings and usage of the last assistant message when it was just generated;
    `streaming`: it still is, so it is stored as what it has so far with finish reason `interrupted`, what
    stays if the UI dies before the reply ends.
    """
    msgs = conversation_messages(history)
    if conv_id is None:
        conv_id = store.create_conversation(owner, title=title_of(history), model=p.model, system_prompt=p.system,
                                            params=p.as_dict(), mode=mode)
    stored = [StoredMessage(m["role"], m["content"], model=p.model if m["role"] == "assistant" else None)
              for m in msgs]
    if reply is not None and stored and stored[-1].role == "assistant":
        stored[-1] = StoredMessage("assistant", stored[-1].content, p.model, reply.ttft_s, reply.duration_s,
                                   reply.prompt_tokens, reply.completion_tokens,
                                   "interrupted" if streaming else reply.finish_reason or "abort")
    fields: dict[str, Any] = {"model": p.model, "system_prompt": p.system, "params": p.as_dict()}
    if len(msgs) <= 2:
        fields["title"] = title_of(history)
    store.replace_messages(conv_id, owner, stored, **fields)
    return conv_id


async def stream_reply(client: GatewayClient, history: History, p: ChatParams,
                       reply: Reply) -> AsyncIterator[History]:
    """Stream the assistant's reply to the last user message into the history (trimming the context)."""
    history = list(history or [])
    if not history or history[-1].get("role") != "user":
        yield history
        return
    if not p.model:
        history.append(notice("No model selected (is a worker running?)."))
        yield history
        return
    messages = to_api_messages(history, p.system)
    max_tokens = int(p.max_tokens)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            fit = await fit_context(lambda m: client.count_tokens(p.model, m, http), messages, max_tokens)
        messages, max_tokens = fit.messages, fit.max_tokens
        if fit.dropped_turns:
            history.append(notice(f"This chat no longer fits the model's {fit.context:,}-token context: the oldest "
                                  f"{fit.dropped_turns} turn(s) were left out of the prompt (the system prompt is kept).",
                                  "ℹ"))
    except DoesNotFit as exc:
        history.append(notice(str(exc)))
        yield history
        return
    except (httpx.HTTPStatusError, httpx.TransportError, KeyError, ValueError):
        pass  # counting failed: send as is and let the request itself report what is wrong
    history.append({"role": "assistant", "content": ""})
    try:
        async for _ in client.stream_chat(p.model, messages, p.temperature, p.top_p, max_tokens, reply):
            history[-1] = {"role": "assistant", "content": no_remote_images(reply.text)}
            yield history
    except (openai.APIError, httpx.HTTPError, OSError) as exc:
        if reply.text:
            history[-1] = {"role": "assistant", "content": no_remote_images(reply.text)}
            history.append(notice(error_text(exc)[2:].strip()))
        else:
            history[-1] = {"role": "assistant", "content": error_text(exc)}
    yield history


async def respond(client: GatewayClient, store: Store, owner: str, conv_id: str | None, history: History,
                  p: ChatParams) -> AsyncIterator[tuple[History, str | None]]:
    """Stream a reply and store the chat: the user message before the model starts, the reply when it
    ends, is stopped (the generator is closed) or fails, so nothing typed or received is lost."""
    history = list(history or [])
    if conversation_messages(history):
        conv_id = await asyncio.to_thread(persist, store, owner, conv_id, history, p)
    reply = Reply()
    saved = None  # when the streaming reply was last stored: at its first text, then every CHECKPOINT_S
    # a checkpoint runs in a thread, which a Stop (the generator closed mid-await) does not stop: the final
    # write waits for one in progress and bars any later one, so "interrupted" never lands after "abort"
    guard, ended = threading.Lock(), [False]

    def checkpoint(conv: str | None, shown: History) -> str | None:
        with guard:
            return conv if ended[0] else persist(store, owner, conv, shown, p, reply, "chat", True)

    try:
        async for h in stream_reply(client, history, p, reply):
            history = h
            if reply.text and (saved is None or time.monotonic() - saved >= CHECKPOINT_S):
                conv_id = await asyncio.to_thread(checkpoint, conv_id, history)
                saved = time.monotonic()
            yield history, conv_id
    finally:
        with guard:
            ended[0] = True
            if conversation_messages(history):
                conv_id = persist(store, owner, conv_id, history, p, reply)
    yield history, conv_id


def regenerate_history(history: History | None) -> History:
    """Drop the last reply (and notices) so the last user message is answered again."""
    history = list(history or [])
    while history and history[-1].get("role") == "assistant":
        history.pop()
    return history


def edit_last(history: History | None) -> tuple[str, History]:
    """Take the last user message back into the input box, dropping it and what followed."""
    history = list(history or [])
    for i in range(len(history) - 1, -1, -1):
        if history[i].get("role") == "user":
            return text_of(history[i].get("content")), history[:i]
    return "", history


def load_chat(store: Store, owner: str, conv_id: str | None) -> tuple[History, str | None, ChatParams | None]:
    conv = store.get_conversation(conv_id, owner) if conv_id else None
    if conv is None:
        return [], None, None
    history = [{"role": m.role, "content": no_remote_images(m.content) if m.role == "assistant" else m.content}
               for m in conv.messages]
    params = conv.params or {}
    return history, conv.id, ChatParams(conv.model, conv.system_prompt, float(params.get("temperature", 0.7)),
                                        float(params.get("top_p", 1.0)), int(params.get("max_tokens", 512)))


def sidebar_choices(store: Store, owner: str) -> list[tuple[str, str]]:
    return [(title, cid) for cid, title in store.list_conversations(owner)]


def record_feedback(store: Store, owner: str, conv_id: str | None, history: History, index: int,
                    liked: bool | str) -> str:
    """Store a vote from the chatbot's feedback buttons; returns a line for the UI."""
    kind = {True: "upvote", False: "downvote"}.get(liked) if isinstance(liked, bool) else \
        ("flag" if str(liked).lower().startswith("flag") else None)
    pos = stored_position(history, index)
    if kind is None or conv_id is None or pos is None:
        return "Nothing to vote on."
    ok = store.vote(conv_id, pos, owner, kind)
    return f"Recorded your {kind}." if ok else "Only replies can be voted on."


async def model_choices(client: GatewayClient) -> tuple[list[str], str | None]:
    try:
        models = [m for m, _ in await client.models()]
    except (openai.APIError, OSError):
        return [], None
    return models, (models[0] if models else None)


# --- arena -------------------------------------------------------------------------------------------------


@dataclass
class Battle:
    models: list[str] = field(default_factory=list)  # [model_a, model_b] once the first message is sent
    anonymous: bool = True
    conversations: list[str | None] = field(default_factory=lambda: [None, None])
    voted: bool = False


def pick_models(served: list[str], anonymous: bool, chosen: tuple[str | None, str | None],
                rng: random.Random | None = None) -> list[str]:
    """Two models for a battle: a random distinct pair when anonymous, else the user's pick."""
    if anonymous:
        if len(set(served)) < 2:
            raise ValueError(f"The arena needs at least two models; the gateway serves {len(set(served))}.")
        return (rng or random.SystemRandom()).sample(sorted(set(served)), 2)
    a, b = chosen
    if not a or not b:
        raise ValueError("Pick a model for each side.")
    if a not in served or b not in served:
        raise ValueError("A picked model is no longer served; refresh the model list.")
    return [a, b]


async def arena_respond(client: GatewayClient, store: Store, owner: str, battle: Battle, histories: list[History],
                        params: list[ChatParams]) -> AsyncIterator[list[History]]:
    """Stream both sides' replies at once (each side yields as its tokens arrive), then store both chats."""
    queue: asyncio.Queue[tuple[int, History | None]] = asyncio.Queue()
    replies = [Reply(), Reply()]

    async def run(side: int) -> None:
        try:
            async for h in stream_reply(client, histories[side], params[side], replies[side]):
                await queue.put((side, h))
        finally:
            await queue.put((side, None))

    tasks = [asyncio.create_task(run(0)), asyncio.create_task(run(1))]
    current = [list(h) for h in histories]
    try:
        done = 0
        while done < 2:
            side, h = await queue.get()
            if h is None:
                done += 1
                continue
            current[side] = h
            yield [current[0], current[1]]
    finally:
        for t in tasks:
            t.cancel()
        for side in (0, 1):
            if conversation_messages(current[side]):
                battle.conversations[side] = persist(store, owner, battle.conversations[side], current[side],
                                                     params[side], replies[side], mode="arena")
    yield [current[0], current[1]]


def arena_vote(store: Store, owner: str, battle: Battle, histories: list[History], choice: str) -> str:
    """Record the vote; returns the line that reveals both models (or says why there was no vote)."""
    if battle.voted:
        return "You already voted in this battle. Start a new battle."
    if len(battle.models) != 2 or not all(any(m["role"] == "assistant" for m in conversation_messages(h))
                                          for h in histories):
        return "Chat with both models first, then vote."
    winner = WINNERS[choice]
    store.record_battle(owner, battle.models[0], battle.models[1], winner, battle.anonymous,
                        battle.conversations[0], battle.conversations[1])
    battle.voted = True
    return f"Vote recorded ({winner}). Model A: **{battle.models[0]}** · Model B: **{battle.models[1]}**"


# --- status ------------------------------------------------------------------------------------------------

STATUS_COLUMNS = ["worker", "address", "models", "queue", "running", "waiting", "KV cache used", "KV capacity (tokens)",
                  "output tok/s", "prefix hit rate", "last heartbeat (s)"]


def status_rows(status: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for w in status.get("workers", []):
        load = w.get("load", {})
        rows.append([w.get("worker_id", ""), w.get("address", ""), ", ".join(w.get("models", [])),
                     load.get("queue_length", 0), load.get("num_running", 0), load.get("num_waiting", 0),
                     f"{100 * load.get('kv_cache_usage', 0.0):.1f}%", load.get("kv_capacity_tokens", 0),
                     round(load.get("tokens_per_second", 0.0), 1), f"{100 * load.get('prefix_cache_hit_rate', 0.0):.0f}%",
                     round(w.get("last_heartbeat_age_s", 0.0), 1)])
    return rows
