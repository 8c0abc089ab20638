"""The Gradio web UI: `build_demo(settings)` and `main(argv)`. A client of the gateway's API only.

Tabs: Chat (sidebar of stored chats, streaming, stop, regenerate, edit, votes, export), Arena (two models
side by side, anonymous or named, votes), Leaderboard (Elo and Bradley-Terry from the votes), Status (the
workers behind the gateway, live). Conversations and votes live in the `Store` (SQLite by default).
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from matplotlib.figure import Figure

from chatserve.http import setup_logging
from chatserve.settings import WebUISettings
from webui import callbacks, export, ratings
from webui.auth import Logins, add_user, read_auth_file
from webui.callbacks import Battle, ChatParams, History
from webui.client import GatewayClient, Reply
from webui.store import Store

log = logging.getLogger("chatserve.webui")
FEEDBACK = ("Like", "Dislike", "Flag")
LEADERBOARD_COLUMNS = ["rank", "model", "Bradley-Terry", "95% CI", "online Elo", "battles", "win rate"]


def masked_url(url: Any) -> str:
    """A database URL fit for a log line: its password, if any, as ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: say nothing of it
        return "<database>"


def owner_of(uid: str | None, request: gr.Request | None) -> str:
    """Whose history this is: the logged-in user, else this browser's id (kept in its localStorage)."""
    user = getattr(request, "username", None) if request is not None else None
    return f"user:{user}" if user else f"browser:{uid or 'anonymous'}"


def winrate_figure(battles: list[ratings.Battle]) -> Figure | None:
    models, m = ratings.win_matrix(battles)
    if not models:
        return None
    fig = Figure(figsize=(1.6 + 1.1 * len(models), 1.2 + 0.9 * len(models)), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("model B")
    ax.set_ylabel("model A")
    ax.set_title("share of battles A won against B")
    for i in range(len(models)):
        for j in range(len(models)):
            if m[i, j] == m[i, j]:  # not NaN
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def build_demo(settings: WebUISettings, store: Store | None = None) -> gr.Blocks:
    client = GatewayClient(settings.api_url, settings.api_key)
    store = store or Store(settings.database)
    limits = callbacks.Limits(settings.max_message_chars, settings.max_turns)
    export_dir = Path(tempfile.mkdtemp(prefix="chatserve-export-"))

    # --- chat ---------------------------------------------------------------------------------------------

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

    # --- arena --------------------------------------------------------------------------------------------

    async def arena_submit(message: str, ha: History, hb: History, battle: Battle | None, mode: str,
                           a: str | None, b: str | None) -> tuple[Any, ...]:
        battle = battle or Battle()
        if battle.voted:
            return message, ha, hb, battle, "This battle is over: start a new battle.", gr.update(), gr.update()
        if not battle.models:
            try:
                served = [m for m, _ in await client.models()]
            except Exception as exc:  # noqa: BLE001 - any failure is shown, the page never hangs
                return message, ha, hb, battle, callbacks.error_text(exc), gr.update(), gr.update()
            if settings.arena_models:
                served = [m for m in served if m in settings.arena_models]
            try:
                battle.models = callbacks.pick_models(served, mode == "Anonymous", (a, b))
            except ValueError as exc:
                return message, ha, hb, battle, f"⚠ {exc}", gr.update(), gr.update()
            battle.anonymous = mode == "Anonymous"
        text, ha = callbacks.add_user_message(message, ha, limits)
        _, hb = callbacks.add_user_message(message, hb, limits)
        names = ("Model A", "Model B") if battle.anonymous else \
            (f"Model A: {battle.models[0]}", f"Model B: {battle.models[1]}")
        return text, ha, hb, battle, "", f"### {names[0]}", f"### {names[1]}"

    async def arena_bot(uid: str, battle: Battle | None, ha: History, hb: History, system: str, temperature: float,
                        top_p: float, max_tokens: int, request: gr.Request):  # type: ignore[no-untyped-def]
        if battle is None or len(battle.models) != 2 or battle.voted:
            yield ha, hb
            return
        params = [ChatParams(m, system or "", float(temperature), float(top_p), int(max_tokens)) for m in battle.models]
        async for pair in callbacks.arena_respond(client, store, owner_of(uid, request), battle, [ha, hb], params):
            yield pair[0], pair[1]

    def arena_vote(choice: str):  # type: ignore[no-untyped-def]
        def run(uid: str, battle: Battle | None, ha: History, hb: History, request: gr.Request) -> tuple[Any, ...]:
            battle = battle or Battle()
            line = callbacks.arena_vote(store, owner_of(uid, request), battle, [ha, hb], choice)
            if not battle.voted or len(battle.models) != 2:
                return line, gr.update(), gr.update()
            return line, f"### Model A: {battle.models[0]}", f"### Model B: {battle.models[1]}"
        return run

    def new_battle() -> tuple[Any, ...]:
        return Battle(), [], [], "", "### Model A", "### Model B", ""

    def arena_mode(mode: str) -> Any:
        return gr.update(visible=mode == "Named")

    # --- leaderboard and status ---------------------------------------------------------------------------

    def leaderboard() -> tuple[Any, Figure | None, str]:
        battles = store.battles()
        rows = [[r.rank, r.model, round(r.bt), f"{r.ci_low:.0f} – {r.ci_high:.0f}", round(r.elo, 1), r.battles,
                 f"{100 * r.win_rate:.0f}%"] for r in ratings.leaderboard(battles)]
        summary = f"{len(battles)} battles between {len(rows)} models." if battles else "No battles yet."
        return gr.update(value=rows, headers=LEADERBOARD_COLUMNS), winrate_figure(battles), summary

    async def status() -> tuple[Any, str]:
        try:
            st = await client.status()
        except Exception as exc:  # noqa: BLE001 - shown in the tab
            return gr.update(value=[]), callbacks.error_text(exc)
        rows = callbacks.status_rows(st)
        return gr.update(value=rows, headers=callbacks.STATUS_COLUMNS), (
            f"{len(rows)} worker(s); models: {', '.join(st.get('models', [])) or 'none'}")

    # --- HTTP API of the UI (gradio_client, health checks): one reply to a chat ------------------------------

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

    # --- layout -------------------------------------------------------------------------------------------

    with gr.Blocks(title="chatserve") as demo:
        uid = gr.BrowserState(None, storage_key="chatserve-user")
        conv_id = gr.State(None)
        battle = gr.State(None)
        gr.Markdown("## chatserve")
        with gr.Tabs():
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
                        chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480, feedback_options=FEEDBACK, sanitize_html=True,
                                             buttons=["copy"])
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
            with gr.Tab("Arena", id="arena", elem_id="tab_arena"):
                gr.Markdown("Two models answer the same messages. In anonymous mode their names show after you vote.")
                arena_mode_radio = gr.Radio(["Anonymous", "Named"], value="Anonymous", label="Mode",
                                            elem_id="arena_mode")
                with gr.Row(visible=False) as pick_row:
                    model_a = gr.Dropdown(label="Model A", choices=[], elem_id="arena_model_a")
                    model_b = gr.Dropdown(label="Model B", choices=[], elem_id="arena_model_b")
                with gr.Row():
                    with gr.Column():
                        name_a = gr.Markdown("### Model A", elem_id="arena_name_a")
                        chat_a = gr.Chatbot(elem_id="arena_a", height=380, show_label=False, sanitize_html=True)
                    with gr.Column():
                        name_b = gr.Markdown("### Model B", elem_id="arena_name_b")
                        chat_b = gr.Chatbot(elem_id="arena_b", height=380, show_label=False, sanitize_html=True)
                with gr.Row():
                    arena_box = gr.Textbox(placeholder="Ask both models", show_label=False, scale=6,
                                           elem_id="arena_input")
                    arena_send = gr.Button("Send", variant="primary", scale=1, elem_id="arena_send")
                    arena_stop = gr.Button("Stop", scale=1, elem_id="arena_stop")
                with gr.Row():
                    vote_a = gr.Button("A is better", elem_id="vote_a")
                    vote_b = gr.Button("B is better", elem_id="vote_b")
                    vote_tie = gr.Button("Tie", elem_id="vote_tie")
                    vote_bad = gr.Button("Both are bad", elem_id="vote_bothbad")
                arena_result = gr.Markdown(elem_id="arena_result")
                new_battle_btn = gr.Button("New battle", elem_id="new_battle")
            with gr.Tab("Leaderboard", id="leaderboard", elem_id="tab_leaderboard") as lb_tab:
                lb_summary = gr.Markdown(elem_id="lb_summary")
                lb_table = gr.Dataframe(headers=LEADERBOARD_COLUMNS, interactive=False, elem_id="leaderboard")
                lb_plot = gr.Plot(label="Win rate", elem_id="winrate")
                lb_refresh = gr.Button("Refresh", elem_id="lb_refresh")
            with gr.Tab("Status", id="status", elem_id="tab_status") as status_tab:
                status_line = gr.Markdown(elem_id="status_line")
                workers = gr.Dataframe(headers=callbacks.STATUS_COLUMNS, interactive=False, elem_id="workers")
                timer = gr.Timer(2.0)

        # chat events
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

        # arena events
        arena_inputs = [arena_box, chat_a, chat_b, battle, arena_mode_radio, model_a, model_b]
        arena_outputs = [arena_box, chat_a, chat_b, battle, arena_result, name_a, name_b]
        bot_inputs = [uid, battle, chat_a, chat_b, system, temperature, top_p, max_tokens]
        ev4 = arena_box.submit(arena_submit, arena_inputs, arena_outputs).then(arena_bot, bot_inputs, [chat_a, chat_b])
        ev5 = arena_send.click(arena_submit, arena_inputs, arena_outputs).then(arena_bot, bot_inputs, [chat_a, chat_b])
        arena_stop.click(None, None, None, cancels=[ev4, ev5])
        for btn, choice in ((vote_a, "a"), (vote_b, "b"), (vote_tie, "tie"), (vote_bad, "bothbad")):
            btn.click(arena_vote(choice), [uid, battle, chat_a, chat_b], [arena_result, name_a, name_b], queue=False)
        for trigger in (new_battle_btn.click, chat_a.clear, chat_b.clear):
            trigger(new_battle, None, [battle, chat_a, chat_b, arena_result, name_a, name_b, arena_box], queue=False)
        arena_mode_radio.change(arena_mode, arena_mode_radio, pick_row, queue=False)

        async def arena_models() -> tuple[Any, Any]:
            choices, _ = await callbacks.model_choices(client)
            return (gr.update(choices=choices, value=choices[0] if choices else None),
                    gr.update(choices=choices, value=choices[-1] if choices else None))

        # leaderboard, status, page load
        lb_tab.select(leaderboard, None, [lb_table, lb_plot, lb_summary])
        lb_refresh.click(leaderboard, None, [lb_table, lb_plot, lb_summary])
        status_tab.select(status, None, [workers, status_line])
        timer.tick(status, None, [workers, status_line], show_progress="hidden")
        demo.load(ensure_uid, uid, uid, queue=False).then(**after)
        demo.load(refresh_models, None, model)
        demo.load(arena_models, None, [model_a, model_b])
        gr.api(chat_api, api_name="chat")
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
                                                    auth_message="Log in to chatserve" if auth else None)
