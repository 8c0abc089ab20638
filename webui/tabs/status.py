"""The Status tab: the workers behind the gateway (numbered, without addresses unless the gateway runs
with --show-topology), their models, queues, KV-cache use and throughput, refreshed every 2 s."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui import callbacks
from webui.tabs import Context


def build(ctx: Context) -> None:
    client = ctx.client

    async def status() -> tuple[Any, str]:
        try:
            st = await client.status()
        except Exception as exc:  # noqa: BLE001 - shown in the tab
            return gr.update(value=[]), callbacks.error_text(exc)
        rows = callbacks.status_rows(st)
        return gr.update(value=rows, headers=callbacks.STATUS_COLUMNS), (
            f"{len(rows)} worker(s); models: {', '.join(st.get('models', [])) or 'none'}")

    with gr.Tab("Status", id="status", elem_id="tab_status") as status_tab:
        status_line = gr.Markdown(elem_id="status_line")
        workers = gr.Dataframe(headers=callbacks.STATUS_COLUMNS, interactive=False, elem_id="workers")
        timer = gr.Timer(2.0)
    status_tab.select(status, None, [workers, status_line])
    timer.tick(status, None, [workers, status_line], show_progress="hidden")
