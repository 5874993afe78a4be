"""Plots page: score histogram, embedding map (its selection filters the Review grid), and how well
each score finds the known-corrupted pairs."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st
from views.context import Context

from ecif.curation.review import score_columns
from ecif.index.projection import embedding_map
from ecif.tasks.detect import SUSPICION, detection_report, precision_recall


def _select_rows(rows: list[int]) -> None:
    st.session_state["map_rows"] = rows


def render(ctx: Context) -> None:
    st.header("Plots")
    if not ctx.scored:
        st.info("Available once the run is scored.")
        return
    table, view = ctx.table, ctx.view
    columns = score_columns(table)
    left, right = st.columns(2)
    column = left.selectbox("Score", columns, key="plot_score")
    colour = right.selectbox("Histogram colour", ["status", *(["corrupted"] if "corrupted" in table else [])],
                             key="plot_colour")
    st.plotly_chart(px.histogram(view, x=column, color=colour, nbins=60, barmode="overlay",
                                 title=f"{column} over the {len(view)} pairs in view"),
                    key="histogram")

    st.subheader("Embedding map")
    by = st.radio("Embeddings", ["image", "text"], horizontal=True, key="map_by")
    points = embedding_map(ctx.run, by).merge(view, on="row")
    figure = px.scatter(points, x="x", y="y", color=column, hover_data=["uid", "caption"],
                        custom_data=["row"], render_mode="webgl",
                        # Suspicious end in red whichever way the score points.
                        color_continuous_scale="RdYlGn_r" if SUSPICION[column] > 0 else "RdYlGn")
    figure.update_layout(dragmode="lasso", height=560)
    chosen = st.plotly_chart(figure, key="map", on_select="rerun", selection_mode=("box", "lasso"))
    rows = [int(p["customdata"][0]) for p in (chosen.selection.points if chosen else [])]
    if rows:
        left, right = st.columns(2)
        left.button(f"Review these {len(rows)} pairs", key="map_apply", type="primary",
                    on_click=_select_rows, args=(rows,))
        right.page_link(ctx.pages["review"], label="Go to Review")
    st.caption("Box or lasso a region; the selection then filters the Review grid, bulk actions and "
               "“this view” exports until cleared in the sidebar.")

    truth = table["corrupted"].astype(bool) if "corrupted" in table.columns else None
    if truth is None or truth.all() or not truth.any():
        return  # only data with planted (known) corruption has a ground truth to measure against
    st.subheader("Finding the known-corrupted pairs")
    st.dataframe(detection_report(table), hide_index=True, width="stretch")
    curves = pd.concat([precision_recall(table, c) for c in columns], ignore_index=True)
    st.plotly_chart(px.line(curves, x="recall", y="precision", color="score",
                            title="Precision / recall of each score, most suspicious first"), key="pr")
