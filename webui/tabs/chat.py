"""The Chat tab: a sidebar of this user's stored chats (open, rename, delete, export), the streaming
chat with stop, regenerate, edit and votes, the parameters; and the UI's HTTP API (one reply to a chat)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui import callbacks, export
from webui.callbacks import ChatParams, History
from webui.client import Reply
from webui.tabs import Context, owner_of

FEEDBACK = ("Like", "Dislike", "Flag")


@dataclass
class ChatTab:
    """What the other tabs and the page use of this one."""

    model: Any
    system: Any
    temperature: Any
    top_p: Any
    max_tokens: Any
    after: dict[str, Any]  # refreshes the sidebar after a change
    ensure_uid: Any
    refresh_models: Any
    chat_api: Any


def build(ctx: Context) -> ChatTab:
    client, store, limits, export_dir = ctx.client, ctx.store, ctx.limits, ctx.export_dir
    uid, conv_id = ctx.uid, ctx.conv_id

    def ensure_uid(uid: str | None) -> str:
        return uid or uuid.uuid4().hex

    async def refresh_models(current: str | None = None) -> Any:
        choices, first = await callbacks.model_choices(client)
        return gr.update(choices=choices, value=current if current in choices else first)

    def sidebar(uid: str, conv_id: str | None, request: gr.Request) -> tuple[Any, Any]:
        choices = callbacks.sidebar_choices(store, owner_of(uid, request))
        title = next((t for t, c in choices if c == conv_id), None)
        return gr.update(choices=choices, value=conv_id), gr.update() if title is None else title

    def submit(message: str, history: History) -> tuple[str, History]:
        return callbacks.add_user_message(message, history, limits)

    async def bot(uid: str, conv_id: str | None, history: History, model: str, system: str, temperature: float,
                  top_p: float, max_tokens: int, request: gr.Request):  # type: ignore[no-untyped-def]
        p = ChatParams(model or "", system or "", float(temperature), float(top_p), int(max_tokens))
        async for h, cid in callbacks.respond(client, store, owner_of(uid, request), conv_id, history, p):
            yield h, cid

    def open_chat(uid: str, conv_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        history, cid, p = callbacks.load_chat(store, owner_of(uid, request), conv_id)
        if p is None:
            return [], None, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), ""
        title = next((t for t, c in callbacks.sidebar_choices(store, owner_of(uid, request)) if c == cid), "")
        return history, cid, gr.update(value=p.model), p.system, p.temperature, p.top_p, p.max_tokens, title

    def new_chat() -> tuple[History, None, str, Any]:
        return [], None, "", gr.update(value=None)

    def clear_chat(uid: str, conv_id: str | None, request: gr.Request) -> History:
        if conv_id:
            store.replace_messages(conv_id, owner_of(uid, request), [])
        return []

    def rename_chat(uid: str, conv_id: str | None, title: str, request: gr.Request) -> str:
        title = " ".join((title or "").split())[:200]
        if not conv_id:
            return "Send a message first: there is no stored chat to rename."
        if not title:
            return "A title cannot be empty."
        store.update_conversation(conv_id, owner_of(uid, request), title=title)
        return f"Renamed to “{title}”."

    def delete_chat(uid: str, conv_id: str | None, request: gr.Request) -> tuple[History, None, str, str]:
        if conv_id:
            store.delete_conversation(conv_id, owner_of(uid, request))
        return [], None, "", "Chat deleted." if conv_id else "Nothing to delete."

    def vote(uid: str, conv_id: str | None, history: History, data: gr.LikeData, request: gr.Request) -> str:
        index = data.index if isinstance(data.index, int) else data.index[0]
        return callbacks.record_feedback(store, owner_of(uid, request), conv_id, history, index, data.liked)

    def export_chat(fmt: str):  # type: ignore[no-untyped-def]
        def run(uid: str, conv_id: str | None, request: gr.Request) -> Any:
            conv = store.get_conversation(conv_id, owner_of(uid, request)) if conv_id else None
            if conv is None:
                return gr.update(value=None, visible=False), "Send a message first: there is nothing to export."
            path = export_dir / f"chat-{conv.id}.{'md' if fmt == 'markdown' else 'json'}"
            text = export.to_markdown(conv) if fmt == "markdown" else json.dumps(export.to_json(conv), indent=2,
                                                                                  ensure_ascii=False)
            path.write_text(text, encoding="utf-8")
            return gr.update(value=str(path), visible=True), f"Exported as {fmt}."
        return run

    async def chat_api(message: str, history_json: str = "[]", model: str = "", system: str = "",
                       temperature: float = 0.0, max_tokens: int = 256) -> str:
        """Reply to `message` after the turns in `history_json` (a JSON list of {role, content})."""
        try:
            history = [m for m in json.loads(history_json or "[]") if isinstance(m, dict)]
        except ValueError:
            return "⚠ history_json is not a JSON list of {role, content} messages."
        _, history = callbacks.add_user_message(message, history, limits)
        if not model:
            _, model = await callbacks.model_choices(client)
        p = ChatParams(model or "", system, float(temperature), 1.0, int(max_tokens))
        out = history
        async for h in callbacks.stream_reply(client, history, p, Reply()):
            out = h
        return callbacks.text_of(out[-1].get("content")) if out else ""

    with gr.Tab("Chat", id="chat", elem_id="tab_chat"):
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                new_btn = gr.Button("New chat", elem_id="new_chat")
                history_list = gr.Radio(label="Your chats", choices=[], elem_id="history")
                title = gr.Textbox(label="Title", elem_id="title", max_lines=1)
                with gr.Row():
                    rename_btn = gr.Button("Rename", elem_id="rename", size="sm")
                    delete_btn = gr.Button("Delete", elem_id="delete", size="sm", variant="stop")
                with gr.Row():
                    export_md = gr.Button("Export .md", elem_id="export_md", size="sm")
                    export_js = gr.Button("Export .json", elem_id="export_json", size="sm")
                export_file = gr.File(label="Download", elem_id="export_file", visible=False, interactive=False)
            with gr.Column(scale=4):
                with gr.Row():
                    model = gr.Dropdown(label="Model", choices=[], interactive=True, elem_id="model", scale=4)
                    refresh = gr.Button("Refresh models", scale=1, elem_id="refresh")
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480, feedback_options=FEEDBACK,
                                     sanitize_html=True, buttons=["copy"])
                with gr.Row():
                    box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                     elem_id="input")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", scale=1, elem_id="stop")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    edit = gr.Button("Edit last message", elem_id="edit")
                    clear = gr.Button("Clear", elem_id="clear")
                info = gr.Markdown(elem_id="info")
                with gr.Accordion("Parameters", open=False, elem_id="params"):
                    system = gr.Textbox(label="System prompt", lines=2, elem_id="system")
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top_p")
                    max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens",
                                           elem_id="max_tokens")

        params = [uid, conv_id, chatbot, model, system, temperature, top_p, max_tokens]
    after = dict(fn=sidebar, inputs=[uid, conv_id], outputs=[history_list, title], queue=False)
    ev1 = box.submit(submit, [box, chatbot], [box, chatbot], queue=False).then(bot, params, [chatbot, conv_id])
    ev1.then(**after)
    ev2 = send.click(submit, [box, chatbot], [box, chatbot], queue=False).then(bot, params, [chatbot, conv_id])
    ev2.then(**after)
    ev3 = regenerate.click(callbacks.regenerate_history, chatbot, chatbot, queue=False).then(
        bot, params, [chatbot, conv_id])
    stop.click(None, None, None, cancels=[ev1, ev2, ev3])
    edit.click(callbacks.edit_last, chatbot, [box, chatbot], queue=False)
    clear.click(clear_chat, [uid, conv_id], chatbot, queue=False)
    new_btn.click(new_chat, None, [chatbot, conv_id, title, history_list], queue=False)
    chatbot.clear(new_chat, None, [chatbot, conv_id, title, history_list], queue=False)
    history_list.input(open_chat, [uid, history_list],
                       [chatbot, conv_id, model, system, temperature, top_p, max_tokens, title], queue=False)
    rename_btn.click(rename_chat, [uid, conv_id, title], info, queue=False).then(**after)
    delete_btn.click(delete_chat, [uid, conv_id], [chatbot, conv_id, title, info], queue=False).then(**after)
    chatbot.like(vote, [uid, conv_id, chatbot], info, queue=False)
    export_md.click(export_chat("markdown"), [uid, conv_id], [export_file, info], queue=False)
    export_js.click(export_chat("json"), [uid, conv_id], [export_file, info], queue=False)
    refresh.click(refresh_models, model, model)
    return ChatTab(model, system, temperature, top_p, max_tokens, after, ensure_uid, refresh_models, chat_api)
