"""The Gradio web UI: `build_demo(settings)` and `main(argv)`. A client of the gateway's API only.

Each tab is a module of `webui.tabs` that lays out its components and wires its callbacks. Tabs: Chat (sidebar of stored chats, streaming, stop, regenerate, edit, votes, export), Arena (two models
side by side, anonymous or named, votes), Leaderboard (Elo and Bradley-Terry from the votes), Status (the
workers behind the gateway, live). Conversations and votes live in the `Store` (SQLite by default).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from chatserve.http import setup_logging
from chatserve.settings import WebUISettings
from webui import callbacks
from webui.auth import ClientAddress, Logins, add_user, read_auth_file
from webui.client import GatewayClient
from webui.store import Store
from webui.tabs import Context
from webui.tabs import arena as tabs_arena
from webui.tabs import chat as tabs_chat
from webui.tabs import leaderboard as tabs_leaderboard
from webui.tabs import status as tabs_status

log = logging.getLogger("chatserve.webui")


def masked_url(url: Any) -> str:
    """A database URL fit for a log line: its password, if any, as ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: say nothing of it
        return "<database>"


def build_demo(settings: WebUISettings, store: Store | None = None) -> gr.Blocks:
    client = GatewayClient(settings.api_url, settings.api_key)
    store = store or Store(settings.database)
    limits = callbacks.Limits(settings.max_message_chars, settings.max_turns)
    export_dir = Path(tempfile.mkdtemp(prefix="chatserve-export-"))
    with gr.Blocks(title="chatserve") as demo:
        ctx = Context(settings, client, store, limits, export_dir, uid=gr.BrowserState(None, storage_key="chatserve-user"),
                      conv_id=gr.State(None), battle=gr.State(None))
        gr.Markdown("## chatserve")
        with gr.Tabs():
            chat = tabs_chat.build(ctx)
            arena_load, arena_pickers = tabs_arena.build(ctx, chat)
            tabs_leaderboard.build(ctx)
            tabs_status.build(ctx)
        demo.load(chat.ensure_uid, ctx.uid, ctx.uid, queue=False).then(**chat.after)
        demo.load(chat.refresh_models, None, chat.model)
        demo.load(arena_load, None, arena_pickers)
        gr.api(chat.chat_api, api_name="chat")
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    if argv and list(argv)[:1] == ["add-user"]:
        add_user(list(argv)[1:])
        return
    settings = WebUISettings.from_args(argv, prog="chatserve webui")
    setup_logging(settings.log_level)
    store = Store(settings.database)
    log.info("conversations stored in %s", masked_url(store.url))
    demo = build_demo(settings, store)
    auth = None
    if settings.auth_file:
        auth = Logins(read_auth_file(settings.auth_file))
    demo.queue(default_concurrency_limit=32).launch(server_name=settings.host, server_port=settings.port,
                                                    show_error=True, share=False, quiet=True, auth=auth,
                                                    auth_message="Log in to chatserve" if auth else None,
                                                    app_kwargs={"middleware": [Middleware(ClientAddress)]})
