"""The Leaderboard tab: Bradley-Terry ratings with bootstrap intervals, online Elo, battle counts, win
rates, and the pairwise win-rate matrix as a plot."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from matplotlib.figure import Figure

from webui import ratings
from webui.tabs import Context

log = logging.getLogger("chatserve.webui")
LEADERBOARD_COLUMNS = ["rank", "model", "Bradley-Terry", "95% CI", "online Elo", "battles", "win rate"]


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


def build(ctx: Context) -> None:
    store = ctx.store

    def leaderboard() -> tuple[Any, Figure | None, str]:
        battles = store.battles()
        rows = [[r.rank, r.model, round(r.bt), f"{r.ci_low:.0f} – {r.ci_high:.0f}", round(r.elo, 1), r.battles,
                 f"{100 * r.win_rate:.0f}%"] for r in ratings.leaderboard(battles)]
        summary = f"{len(battles)} battles between {len(rows)} models." if battles else "No battles yet."
        return gr.update(value=rows, headers=LEADERBOARD_COLUMNS), winrate_figure(battles), summary

    with gr.Tab("Leaderboard", id="leaderboard", elem_id="tab_leaderboard") as lb_tab:
        lb_summary = gr.Markdown(elem_id="lb_summary")
        lb_table = gr.Dataframe(headers=LEADERBOARD_COLUMNS, interactive=False, elem_id="leaderboard")
        lb_plot = gr.Plot(label="Win rate", elem_id="winrate")
        lb_refresh = gr.Button("Refresh", elem_id="lb_refresh")
    lb_tab.select(leaderboard, None, [lb_table, lb_plot, lb_summary])
    lb_refresh.click(leaderboard, None, [lb_table, lb_plot, lb_summary])
