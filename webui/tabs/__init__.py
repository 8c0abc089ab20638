"""The web UI's tabs, one module each: `chat`, `arena`, `leaderboard`, `status` (the login is Gradio's own
page, checked by `webui.auth`). Each `build(ctx)` lays out its tab's components and wires their callbacks;
`webui.app.build_demo` puts the tabs together. `Context` is what they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from chatserve.settings import WebUISettings
from webui import callbacks
from webui.client import GatewayClient
from webui.store import Store


@dataclass
class Context:
    settings: WebUISettings
    client: GatewayClient
    store: Store
    limits: callbacks.Limits
    export_dir: Path
    uid: Any  # gr.BrowserState: this browser's id
    conv_id: Any  # gr.State: the open chat
    battle: Any  # gr.State: the arena's battle


def owner_of(uid: str | None, request: gr.Request | None) -> str:
    """Whose history this is: the logged-in user, else this browser's id (kept in its localStorage)."""
    user = getattr(request, "username", None) if request is not None else None
    return f"user:{user}" if user else f"browser:{uid or 'anonymous'}"
