"""The Gradio web UI: `build_demo(settings)` and `main(argv)`. A client of the gateway's /v1 only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from chatserve.http import setup_logging
from chatserve.settings import WebUISettings
from webui import callbacks
from webui.client import GatewayClient


def build_demo(settings: WebUISettings) -> gr.Blocks:
    client = GatewayClient(settings.api_url, settings.api_key)

    async def refresh_models() -> Any:
        choices, value = await callbacks.model_choices(client)
        return gr.update(choices=choices, value=value)

    def submit(message: str, history: callbacks.History) -> tuple[str, callbacks.History]:
        return callbacks.add_user_message(message, history, settings.max_message_chars)

    async def bot(history: callbacks.History, model: str, system: str, temperature: float, top_p: float,
                  max_tokens: int):  # type: ignore[no-untyped-def]
        async for h in callbacks.respond(client, history, model, system, temperature, top_p, max_tokens):
            yield h

    with gr.Blocks(title="chatserve") as demo:
        gr.Markdown("## chatserve")
        with gr.Row():
            model = gr.Dropdown(label="Model", choices=[], interactive=True, elem_id="model", scale=4)
            refresh = gr.Button("↻ Refresh models", scale=1, elem_id="refresh")
        chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480)
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6, elem_id="input")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", scale=1, elem_id="stop")
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("New chat", elem_id="clear")
        with gr.Accordion("Parameters", open=False, elem_id="params"):
            system = gr.Textbox(label="System prompt", lines=2, elem_id="system")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")

        params = [chatbot, model, system, temperature, top_p, max_tokens]
        ev1 = box.submit(submit, [box, chatbot], [box, chatbot], queue=False).then(bot, params, chatbot)
        ev2 = send.click(submit, [box, chatbot], [box, chatbot], queue=False).then(bot, params, chatbot)
        ev3 = regenerate.click(callbacks.regenerate_history, chatbot, chatbot, queue=False).then(bot, params, chatbot)
        stop.click(None, None, None, cancels=[ev1, ev2, ev3])
        clear.click(lambda: [], None, chatbot, queue=False)
        refresh.click(refresh_models, None, model)
        demo.load(refresh_models, None, model)
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    settings = WebUISettings.from_args(argv, prog="chatserve webui")
    setup_logging(settings.log_level)
    demo = build_demo(settings)
    demo.queue(default_concurrency_limit=32).launch(server_name=settings.host, server_port=settings.port,
                                                    show_error=True, share=False, quiet=True)
