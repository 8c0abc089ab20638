"""The web UI's context trimming against the real gateway and the worker's own tokenizer and template."""

from __future__ import annotations

import asyncio

from webui import callbacks
from webui.callbacks import ChatParams
from webui.client import GatewayClient, Reply


def run_reply(client: GatewayClient, history, params: ChatParams) -> tuple[list, Reply]:
    reply = Reply()

    async def go():
        out = history
        async for h in callbacks.stream_reply(client, history, params, reply):
            out = h
        return out

    return asyncio.run(go()), reply


def test_a_chat_longer_than_the_context_drops_its_oldest_turns(platform):
    client = GatewayClient(platform.api_url)
    filler = " ".join(f"word{i}" for i in range(220))  # ~450 tokens per message
    history = []
    for turn in range(5):
        history += [{"role": "user", "content": f"Turn {turn}: {filler}"},
                    {"role": "assistant", "content": f"Noted turn {turn}. {filler}"}]
    history.append({"role": "user", "content": "What is the capital of France?"})
    params = ChatParams(platform.model, "You are a helpful assistant.", 0.0, 1.0, 64)
    full, context = asyncio.run(client.count_tokens(platform.model, callbacks.to_api_messages(history, params.system)))
    assert full > context  # the chat really does not fit
    out, reply = run_reply(client, history, params)
    notices = [m["content"] for m in out if callbacks.is_notice(m)]
    assert len(notices) == 1 and notices[0].startswith("ℹ") and f"{context:,}-token context" in notices[0]
    assert out[-1]["role"] == "assistant" and out[-1]["content"] and not callbacks.is_notice(out[-1])
    assert reply.finish_reason in ("stop", "length")
    assert reply.prompt_tokens + 64 <= context
    # only whole old turns went: what was sent still starts with the system prompt and a user turn
    kept, _ = asyncio.run(client.count_tokens(platform.model, [{"role": "system", "content": params.system},
                                                               {"role": "user", "content": "x"}]))
    assert reply.prompt_tokens > kept


def test_a_single_message_too_long_for_the_context_is_refused_in_the_chat(platform):
    client = GatewayClient(platform.api_url)
    history = [{"role": "user", "content": " ".join(f"word{i}" for i in range(1500))}]
    out, reply = run_reply(client, history, ChatParams(platform.model, "", 0.0, 1.0, 64))
    assert out[-1]["content"].startswith("⚠") and "too long for the model's context" in out[-1]["content"]
    assert reply.completion_tokens is None  # nothing was sent to the model
