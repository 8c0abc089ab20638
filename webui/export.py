"""Conversations out of the store: one chat as Markdown or JSON, all chats as ShareGPT JSON.

ShareGPT is the format Vicuna was fine-tuned on: `[{"id", "conversations": [{"from": "human"|"gpt", "value"}]}]`
(the system prompt, when set, as a top-level "system" field, as FastChat's and most trainers' loaders
accept). `chatserve export --format sharegpt [--output FILE] [--database URL]` writes all stored chats.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from webui.store import Conversation, Store

SHAREGPT_ROLE = {"user": "human", "assistant": "gpt"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def to_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id, "title": conv.title, "model": conv.model, "mode": conv.mode,
        "system_prompt": conv.system_prompt, "params": conv.params,
        "created_at": _iso(conv.created_at), "updated_at": _iso(conv.updated_at),
        "messages": [{k: v for k, v in {
            "role": m.role, "content": m.content, "model": m.model, "ttft_s": m.ttft_s, "duration_s": m.duration_s,
            "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
            "finish_reason": m.finish_reason}.items() if v is not None} for m in conv.messages],
    }


def to_markdown(conv: Conversation) -> str:
    out = [f"# {conv.title}", "", f"- model: `{conv.model}`", f"- started: {_iso(conv.created_at)}", ""]
    if conv.system_prompt:
        out += ["## System", "", conv.system_prompt, ""]
    for m in conv.messages:
        out += [f"## {'User' if m.role == 'user' else 'Assistant'}", "", m.content, ""]
    return "\n".join(out)


def to_sharegpt(conv: Conversation) -> dict[str, Any] | None:
    """One ShareGPT record; None for a chat without a complete user -> assistant exchange."""
    turns = [{"from": SHAREGPT_ROLE[m.role], "value": m.content} for m in conv.messages
             if m.role in SHAREGPT_ROLE and m.content]
    while turns and turns[-1]["from"] != "gpt":  # a trailing unanswered message is not training data
        turns.pop()
    if not turns or turns[0]["from"] != "human":
        return None
    record: dict[str, Any] = {"id": conv.id, "model": conv.model, "conversations": turns}
    if conv.system_prompt:
        record["system"] = conv.system_prompt
    return record


def sharegpt(store: Store) -> list[dict[str, Any]]:
    return [r for r in (to_sharegpt(c) for c in store.all_conversations()) if r is not None]


def main(argv: Sequence[str] | None = None) -> None:
    from chatserve.settings import WebUISettings

    p = argparse.ArgumentParser(prog="chatserve export", description="write all stored chats as ShareGPT JSON")
    p.add_argument("--format", choices=["sharegpt"], default="sharegpt")
    p.add_argument("--output", "-o", default="-", help="file to write ('-' = stdout)")
    p.add_argument("--database", default=None,
                   help=f"SQLite file or SQLAlchemy URL (env CHATSERVE_DATABASE; default {WebUISettings.database})")
    a = p.parse_args(list(argv or []))
    database = a.database or WebUISettings.from_args([]).database
    store = Store(database)
    try:
        records = sharegpt(store)
        text = json.dumps(records, ensure_ascii=False, indent=2)
    finally:
        store.close()
    if a.output == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"wrote {len(records)} conversations to {a.output}", file=sys.stderr)
