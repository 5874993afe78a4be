"""Mispredictions page: items the model gets wrong, and the training pairs behind each one."""

from __future__ import annotations

import numpy as np
import streamlit as st
from views import data
from views.actions import act
from views.cards import card_grid
from views.context import Context
from views.finetune import not_converged_notice

import ecif
from ecif.curation.review import actionable_rows
from ecif.tasks.trace import parse_confusion

RANKINGS = {"total effect (both roles)": "total", "positive role only (own caption)": "positive"}


def render(ctx: Context) -> None:
    st.header("Mispredictions")
    items = data.mispredictions(ctx.run)
    if items is None or not ctx.scored:
        st.info("Not available yet: the run has no mispredictions table (its scoring has not reached that stage).")
        return
    not_converged_notice(ctx.run)
    show_all = st.toggle("Show correct predictions too", key="mp_all")
    shown = (items if show_all else items[~items["correct"].astype(bool)]).sort_values(
        "loss", ascending=False, ignore_index=True)
    retrieval = "kind" in items.columns and (items["kind"] == "retrieval").any()
    st.caption(f"{int((~items['correct'].astype(bool)).sum())} of {len(items)} items mispredicted; worst first"
               + (". An item without a class is asked for its own caption among its split's captions "
                  "(retrieval): *label* is its caption, *predicted* the caption the model picks." if retrieval else ""))
    columns = ["uid", "kind", "label", "predicted", "prob_true", "prob_predicted", "loss", "caption", "split"]

    def item_picked() -> None:
        rows = st.session_state[table_key].selection.rows
        if rows:
            # Kept in the URL (?item=uid) so a traced misprediction can be shared and reloaded.
            st.query_params["item"] = str(shown["uid"].iloc[rows[0]])
            st.query_params.pop("confusion", None)
            st.session_state["mp_confusion"] = None

    # A new key clears the table's highlighted row when a confusion takes over (see _chosen_target).
    table_key = f"mp_table_{st.session_state.get('mp_table_version', 0)}_{show_all}"
    st.dataframe(shown[[c for c in columns if c in shown.columns]], key=table_key, on_select=item_picked,
                 selection_mode="single-row", hide_index=True, width="stretch")
    target = _chosen_target(ctx, items)
    if target is None:
        return
    uids, right = target
    top_k = right.slider("Pairs per side", 2, 40, 8, key="mp_k")
    ranking = right.radio(
        "Rank by", list(RANKINGS), horizontal=True, key="mp_rank_by",
        help="Total effect: the pairs whose removal would change this item's loss most, through both roles "
             "(ECIF). Positive role only: the pair's effect through its own image–caption link, which leaves out "
             "correct pairs that matter only as negatives in their batch (nothing to fix in those).")
    relative = right.toggle(
        "Relative score (RelatIF)", value=True, key="mp_relative",
        help="Divide each pair's effect by the size of its own parameter step, so that a few high-leverage "
             "pairs do not top every item. Off: the raw predicted change of this item's loss, which ranks "
             "mislabelled pairs (large steps) higher.")
    with st.spinner(data.ENGINE_SPINNER.format(name="trace")):
        found = ecif.trace(ctx.run, uids, top_k=int(top_k), relative=relative, rank_by=RANKINGS[ranking])
    whose = "this item's" if len(uids) == 1 else f"these {len(uids)} items' mean"
    st.caption(f"Bars: each pair's effect on **{whose}** loss if it were removed, through its own caption "
               "(pos) and as a negative in the softmax of its batch (neg); red = removing it would lower the "
               "loss (a culprit), green = raise it.")
    largest = np.nanmax(found[["influence_pos", "influence_neg"]].abs().to_numpy(), initial=0.0)
    scale = float(largest) if np.isfinite(largest) and largest > 0 else 1.0
    through = " through their own caption" if RANKINGS[ranking] == "positive" else ""
    for role, title in (("culprit", f"Culprits (removing them would lower {whose} loss{through})"),
                        ("supporter", f"Supporters (they help the model here{through})")):
        st.subheader(title)
        rows = found[(found["role"] == role) & found["row"].isin(ctx.table.index)]
        # The trace's own role split replaces the run-level one: the card is about this item.
        # The run-level harm rank would read as a rank in this list, so the cards leave it out.
        pairs = ctx.table.loc[rows["row"]].drop(columns="rank", errors="ignore").assign(
            **{column: rows[column].to_numpy() for column in ("score", "influence_pos", "influence_neg")})
        card_grid(ctx, pairs, key=f"trace_{role}", columns=4, scale=scale, extra_column="score")
        if role == "culprit":
            _drop_culprits(ctx, uids, rows["row"].tolist())


def _drop_culprits(ctx: Context, uids: list[str], rows: list[int]) -> None:
    """One action for the culprits shown, with the predicted effect on the traced items first."""
    pending = actionable_rows(ctx.table.loc[rows], "drop")
    with st.popover(f"Drop these culprits · {len(pending)} pairs", disabled=not pending):
        key = (tuple(uids), tuple(pending))
        # name, re-fine-tune?, button, how the answer was obtained
        methods = (("closed", False, "Predict the effect on the traced items", "Closed form"),
                   ("refit", True, "Verify by re-fine-tuning", "Re-fine-tuned"))
        for column, (name, refit, label, _) in zip(st.columns(2), methods):
            if column.button(label, key=f"mp_effect_{name}"):
                with st.spinner(data.ENGINE_SPINNER.format(name="predict_items")):
                    st.session_state[f"mp_outcome_{name}"] = (key, ecif.predict_items(ctx.run, uids, drop_rows=pending, refit=refit))
        for name, _, _, method in methods:
            stored = st.session_state.get(f"mp_outcome_{name}")
            if stored is None or stored[0] != key:
                continue
            effect = stored[1]
            right = effect["correct_before"].sum(), effect["correct_after"].sum()
            st.markdown(f"{method}: mean loss of the {plural(len(effect), 'traced item')} "
                        f"**{effect['loss_before'].mean():.3f} → {effect['loss_after'].mean():.3f}** nats; right "
                        f"**{right[0]} → {right[1]}** of {len(effect)}.")
        confirmed = st.checkbox(f"Drop these {len(pending)} pairs", key="mp_drop_confirm")
        if st.button(f"Drop {len(pending)} pairs", key="mp_drop_go", type="primary", disabled=not confirmed):
            act(ctx, "drop", pending)
            st.session_state.pop("mp_drop_confirm", None)
            st.rerun()


def _chosen_target(ctx: Context, items):
    """The item (``?item=uid``) or confusion (``?confusion=true:predicted``) to trace, drawn; ``(uids, column)``."""
    counts = ecif.confusions(ctx.run, items)
    if len(counts):
        labels = {f"{c.label}:{c.predicted}": f"{c.label} → {c.predicted} ({plural(c.mistakes, 'item')})"
                  for c in counts.itertuples()}

        def confusion_picked() -> None:
            # Kept in the URL (?confusion=true:predicted), like ?item, so it can be shared and reloaded.
            picked = st.session_state["mp_confusion"]
            if picked is None:
                st.query_params.pop("confusion", None)
            else:
                st.query_params["confusion"] = picked
                st.query_params.pop("item", None)
                st.session_state["mp_table_version"] = st.session_state.get("mp_table_version", 0) + 1

        current = st.query_params.get("confusion")
        if current is not None:
            st.query_params.pop("item", None)  # a link with both opens the confusion; clearing it must not revive the item
        st.session_state["mp_confusion"] = current if current in labels else None
        st.selectbox(
            "Or trace a confusion: every item of one class that the model calls another, together", [None, *labels],
            key="mp_confusion", on_change=confusion_picked, format_func=lambda key: "—" if key is None else labels[key],
            help="The culprits of these items' mean loss: the pairs behind the pattern rather than behind one item's quirks.")
    confusion = st.query_params.get("confusion")
    if confusion is not None:
        try:
            label, predicted = parse_confusion(confusion)
            uids = ecif.confusion_items(ctx.run, label, predicted, items)
        except ValueError as error:
            st.warning(str(error))
            return None
        st.markdown(f"**{plural(len(uids), 'item')} of class {label} predicted as {predicted}**, traced together (their mean loss)")
        thumbnails = st.columns(8)
        paths = items.set_index(items["uid"].astype(str)).loc[uids[:8], "filepath"]
        for column, path in zip(thumbnails, paths):
            column.image(path, width="stretch")
        return uids, st.container()
    chosen = items[items["uid"] == st.query_params.get("item")]
    if chosen.empty:
        st.caption("Select an item, or a confusion above, to see the training pairs that pushed the model to its answer.")
        return None
    item = chosen.iloc[0]
    left, right = st.columns([1, 3])
    left.image(item["filepath"], width="stretch")
    if item.get("kind") == "retrieval":
        right.markdown(f"**Caption:** {item['label']}  \n**The model picks:** {item['predicted']} "
                       f"({item['prob_predicted']:.2f}; its own caption {item['prob_true']:.2f})")
    else:
        right.markdown(f"**True:** {item['label']} · **predicted:** {item['predicted']} "
                       f"({item['prob_predicted']:.2f}; true class {item['prob_true']:.2f})")
    return [str(item["uid"])], right


def plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"
