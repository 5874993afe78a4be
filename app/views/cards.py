"""Pairs drawn as cards (thumbnail, rank and status, caption, harm bar, decision buttons) and the
number formatting the pages share."""

from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd
import streamlit as st
from views.actions import act, open_pair
from views.context import Context
from views.data import thumbnail_b64

from ecif.curation.units import si_format
from ecif.influence.columns import MISALIGNMENT

STATUS_ICONS = {"pending": "⏳", "accepted": "✅", "relabelled": "✏️", "dropped": "🗑️"}
#: Cards per row above which a card's buttons take two lines ("Open" no longer fits beside ✓ and ✗
#: at 1400 px with the sidebar open).
STACK_ABOVE = 5
CARD_BUTTONS = "card_buttons_"
#: Card buttons with a narrow side padding, so a glyph still fits at 8 cards per row.
CARD_CSS = (f"<style>[class*='st-key-{CARD_BUTTONS}'] button {{padding-left:4px;padding-right:4px;"
            "min-width:0}</style>")


def harm_bar(pos: float, neg: float, scale: float) -> str:
    """HTML bar of the positive-role and negative-role influence (red = harmful, green = helpful)."""
    def part(label: str, value: float) -> str:
        width = 0 if scale <= 0 else min(abs(value) / scale, 1.0) * 100
        colour = "#d62728" if value < 0 else "#2ca02c"
        return (f"<div style='display:flex;align-items:center;gap:4px;font-size:11px'>"
                f"<span style='width:26px;color:#666'>{label}</span>"
                f"<div style='flex:1;background:#eee;height:7px;border-radius:3px'>"
                f"<div style='width:{width:.0f}%;background:{colour};height:7px;border-radius:3px'></div>"
                f"</div><span style='width:52px;text-align:right'>{si_format(value, signed=True)}</span></div>")
    return part("pos", pos) + part("neg", neg)


def readable(frame: pd.DataFrame | pd.Series, columns: Sequence[str] | None = None):
    """``frame`` for ``st.dataframe`` with its number ``columns`` (default: all numeric ones) written by
    :func:`~ecif.curation.units.si_format` (``−200µ``, not ``-0.000``); the values, and so sorting,
    stay numbers."""
    frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
    if columns is None:
        columns = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    return frame.style.format(si_format, subset=list(columns))


def influence_scale(table: pd.DataFrame) -> float:
    """The largest role magnitude in the run, so bars are comparable across cards."""
    columns = [c for c in ("influence_pos", "influence_neg") if c in table.columns]
    return float(table[columns].abs().to_numpy().max()) if columns else 1.0


def pair_card(ctx: Context, pair: pd.Series, key: str, scale: float,
              extra: str | None = None, actions: bool = True, stacked: bool = False) -> None:
    """One pair as a card: thumbnail, rank and status, caption, harm bar, decision buttons
    (in one row, or ``stacked`` in two for narrow cards)."""
    row = int(pair["row"])
    status = pair.get("status", "pending")
    rank = f"harm #{int(pair['rank'])}" if "rank" in pair and pair["rank"] == pair["rank"] else ""
    if MISALIGNMENT in pair and pair[MISALIGNMENT] == pair[MISALIGNMENT]:
        rank += f" · misaligned {float(pair[MISALIGNMENT]):+.1f}σ"
    caption = html.escape(str(pair["caption"]))
    if "scored_caption" in pair and pair["scored_caption"] != pair["caption"]:
        caption = f"<s>{html.escape(str(pair['scored_caption']))}</s> → {caption}"
    bar = (harm_bar(float(pair["influence_pos"]), float(pair["influence_neg"]), scale)
           if "influence_pos" in pair else "")
    image = thumbnail_b64(ctx.run, row, pair["filepath"])
    with st.container(border=True):
        # One HTML block per card (image inlined): a 24-card page is then ~24 elements, not ~120,
        # which is what keeps the grid fast in the browser.
        st.html(f"<img src='data:image/jpeg;base64,{image}'"
                f" style='width:100%;aspect-ratio:1;object-fit:contain;border-radius:6px'>"
                f"<div style='margin:4px 0'><b>{rank}</b> {STATUS_ICONS.get(status, '')} {status}"
                f"{' · ' + html.escape(extra) if extra else ''}</div>"
                f"<div class='ecif-caption' style='margin-bottom:4px'>{caption}</div>{bar}")
        if not actions:
            return
        buttons = st.container(key=f"{CARD_BUTTONS}{key}_{row}")  # compact padding: CARD_CSS
        if stacked:  # narrow cards: "Open" on its own line, the two decisions below it
            left, (middle, right) = buttons.container(), buttons.columns(2, gap="small")
        else:  # "Open" gets the room its word needs; the decisions are single glyphs
            left, middle, right = buttons.columns([2, 1, 1], gap="small")
        left.button("Open", key=f"{key}_open_{row}", on_click=open_pair, args=(str(pair["uid"]),),
                    width="stretch", help="Detail view: full image, all scores, caption suggestion, "
                                          "similar pairs (Esc returns to the grid)")
        middle.button("✓", key=f"{key}_acc_{row}", help="Accept", on_click=act,
                      args=(ctx, "accept", [row]), width="stretch")
        if status == "dropped":
            right.button("↩", key=f"{key}_res_{row}", help="Restore from the bin", on_click=act,
                         args=(ctx, "restore", [row]), width="stretch")
        else:
            right.button("✗", key=f"{key}_drop_{row}", help="Drop (to the bin)", on_click=act,
                         args=(ctx, "drop", [row]), width="stretch")


def card_grid(ctx: Context, pairs: pd.DataFrame, key: str, columns: int = 4,
              extra_column: str | None = None, actions: bool = True, scale: float | None = None) -> None:
    """Cards laid out ``columns`` per row; ``scale``: the bars' full width (default: the run's largest role)."""
    if scale is None:
        scale = influence_scale(ctx.table) if ctx.table is not None else 1.0
    if actions:
        st.html(CARD_CSS)  # style only: takes no room on the page
    for start in range(0, len(pairs), columns):
        cells = st.columns(columns)
        for cell, (_, pair) in zip(cells, pairs.iloc[start : start + columns].iterrows()):
            with cell:
                extra = (None if extra_column is None
                         else f"{extra_column} {si_format(pair[extra_column], signed=True)}")
                pair_card(ctx, pair, key, scale, extra=extra, actions=actions,
                          stacked=columns > STACK_ABOVE)
