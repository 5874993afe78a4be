"""The sidebar's queue counts, filters and sort order, which define the view every page shows.

Every widget is bound to a query parameter (``bind="query-params"``), so a reload or a shared link
shows the same view.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st
from views.cards import STATUS_ICONS
from views.context import Context

from ecif.curation.review import STATUSES, Filters, apply_filters, queue_counts, score_columns, sort_table

FILTER_KEYS = ("status", "q", "corrupted", "split")
RANGE_PREFIX = "r_"


def _range_key(column: str) -> str:
    return f"{RANGE_PREFIX}{column}"


def first_page() -> None:
    """A changed filter or order starts the grid again at its first page.

    Set, not deleted: a deleted bound widget would be re-initialised from the old ``?page=``.
    """
    st.session_state["page"] = st.session_state["grid_page"] = 1


def clear_filters(table: pd.DataFrame) -> None:
    """Reset every filter widget (its bound query parameter follows) and the map selection."""
    for key in (*FILTER_KEYS, *(_range_key(c) for c in score_columns(table))):
        st.session_state.pop(key, None)
    st.session_state.pop("map_rows", None)
    first_page()


def _score_ranges(table: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """One range slider per score column; the ranges narrowed from the full one."""
    ranges: dict[str, tuple[float, float]] = {}
    for column in score_columns(table):
        low, high = float(table[column].min()), float(table[column].max())
        if low == high:
            continue
        chosen = st.slider(column, low, high, (low, high), step=(high - low) / 200,
                           key=_range_key(column), bind="query-params", format="%.3g",
                           on_change=first_page)
        if tuple(chosen) != (low, high):
            ranges[column] = (float(chosen[0]), float(chosen[1]))
    return ranges


def sidebar_filters(ctx: Context) -> None:
    """Filters, sort and queue counts in the sidebar; sets ``ctx.filters`` and ``ctx.view``."""
    table = ctx.table
    assert table is not None
    with st.sidebar:
        counts = queue_counts(table)
        st.progress(counts["reviewed_fraction"],
                    text=f"Reviewed {counts['reviewed']} of {counts['total']}")
        st.caption(" · ".join(f"{STATUS_ICONS[s]} {s} {counts[s]}" for s in STATUSES))
        st.subheader("Filters")
        statuses = st.multiselect("Status", STATUSES, key="status", bind="query-params",
                                  on_change=first_page)
        text = st.text_input("Caption contains", key="q", bind="query-params", on_change=first_page)
        corrupted = None
        if "corrupted" in table.columns:
            choice = st.segmented_control("Known corrupted", ["yes", "no"], key="corrupted",
                                          bind="query-params", on_change=first_page)
            corrupted = None if choice is None else choice == "yes"
        splits: list[str] = []
        if "split" in table.columns and table["split"].nunique() > 1:
            splits = st.multiselect("Split", sorted(table["split"].unique()), key="split",
                                    bind="query-params", on_change=first_page)
        with st.expander("Score ranges"):
            ranges = _score_ranges(table)
        sortable = [*score_columns(table), *(c for c in ("rank", "row") if c in table.columns)]
        sort_by = st.selectbox("Sort by", sortable, key="sort", bind="query-params", on_change=first_page,
                               help="Suspicious end first (most harmful for influence).")
        st.caption("`misalignment` (the default) finds wrong captions; `influence` ranks what to remove to "
                   "lower this model's loss on your trusted data.")
        reverse = st.toggle("Reverse order", key="reverse", bind="query-params", on_change=first_page)
        selection = st.session_state.get("map_rows")
        ctx.filters = Filters(ranges=ranges, statuses=list(statuses), splits=list(splits),
                              text=text or "", corrupted=corrupted, rows=selection)
        ctx.sort_by, ctx.reverse = sort_by, reverse
        view = apply_filters(table, ctx.filters)
        default_order = sort_table(view, sort_by)
        ctx.view = default_order.iloc[::-1] if reverse else default_order
        if selection is not None:
            st.info(f"Map selection: {len(selection)} pairs (wins over the filters)")
        st.markdown(f"**{len(ctx.view)}** of {len(table)} pairs match")
        st.button("Clear filters", key="clear_filters", on_click=clear_filters, args=(table,),
                  disabled=ctx.filters.is_empty())
