"""Mispredictions page: items the model gets wrong, and the training pairs behind each one."""

from __future__ import annotations

import streamlit as st

from ecif.run import MISPREDICTIONS_FILE

from views.common import ENGINE_SPINNER, Context, card_grid, engine_call, read_frame


def render(ctx: Context) -> None:
    st.header("Mispredictions")
    items = read_frame(ctx.run, MISPREDICTIONS_FILE)
    if items is None or not ctx.scored:
        st.info("Not available yet: the run has no mispredictions table (it needs labels).")
        return
    show_all = st.toggle("Show correct predictions too", key="mp_all")
    shown = (items if show_all else items[~items["correct"].astype(bool)]).sort_values(
        "loss", ascending=False, ignore_index=True)
    st.caption(f"{int((~items['correct'].astype(bool)).sum())} of {len(items)} items mispredicted; "
               "worst first")
    columns = ["uid", "label", "predicted", "prob_true", "prob_predicted", "loss", "caption", "split"]
    picked = st.dataframe(shown[[c for c in columns if c in shown.columns]], key="mp_table",
                          on_select="rerun", selection_mode="single-row", hide_index=True,
                          width="stretch")
    if picked.selection.rows:
        # Kept in the URL (?item=uid) so a traced misprediction can be shared and reloaded.
        st.query_params["item"] = str(shown["uid"].iloc[picked.selection.rows[0]])
    chosen = items[items["uid"] == st.query_params.get("item")]
    if chosen.empty:
        st.caption("Select an item to see the training pairs that pushed the model to its answer.")
        return
    item = chosen.iloc[0]
    left, right = st.columns([1, 3])
    left.image(item["filepath"], width="stretch")
    right.markdown(f"**True:** {item['label']} · **predicted:** {item['predicted']} "
                   f"({item['prob_predicted']:.2f}; true class {item['prob_true']:.2f})")
    top_k = right.slider("Pairs per side", 2, 40, 8, key="mp_k")
    trace = engine_call("trace")
    if trace is None:
        st.warning("The engine's `ecif.trace` is not available in this installation.")
        return
    with st.spinner(ENGINE_SPINNER.format(name="trace")):
        found = trace(ctx.run, str(item["uid"]), top_k=int(top_k), relative=True)
    for role, title in (("culprit", "Culprits (removing them would lower this item's loss)"),
                        ("supporter", "Supporters (they help the model here)")):
        st.subheader(title)
        rows = found[(found["role"] == role) & found["row"].isin(ctx.table.index)]
        pairs = ctx.table.loc[rows["row"]].assign(relative_influence=rows["relative_influence"].to_numpy())
        card_grid(ctx, pairs, key=f"trace_{role}", columns=4, extra_column="relative_influence")
