"""The Arena tab: two models answer the same messages side by side, anonymous (names shown after the vote)
or named; votes go to the store, battles to the leaderboard."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui import callbacks
from webui.callbacks import Battle, ChatParams, History
from webui.tabs import Context, owner_of
from webui.tabs.chat import ChatTab


def build(ctx: Context, chat: ChatTab) -> tuple[Any, list[Any]]:
    """Lays out the tab; returns its page-load callback (the model pickers' choices) and its outputs."""
    settings, client, store, limits = ctx.settings, ctx.client, ctx.store, ctx.limits
    uid, battle = ctx.uid, ctx.battle
    system, temperature, top_p, max_tokens = chat.system, chat.temperature, chat.top_p, chat.max_tokens

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
    return arena_models, [model_a, model_b]
