"""Review page: the ranked grid of pairs, bulk actions, and the per-pair detail view (``?uid=``)."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from views.actions import act, open_pair, undo
from views.cards import STATUS_ICONS, card_grid, harm_bar, influence_scale, readable
from views.context import Context
from views.data import neighbour_index
from views.filters import first_page
from views.finetune import not_converged_notice

from ecif.curation.review import actionable_rows, adjacent_row, score_summary
from ecif.index.neighbours import NeighbourIndex, suggest_caption
from ecif.influence.columns import MISALIGNMENT

KEYS = {
    "a": "accept", "d": "drop", "e": "relabel with the text in the box",
    "s": "relabel with the suggested caption", "j / →": "next pair", "k / ←": "previous pair",
    "u": "undo your last decision", "Esc": "back to the grid", "n / p": "next / previous page (grid)",
    "h or ?": "this help",
}
# `?` cannot be a Streamlit shortcut (only letters, digits and named keys), so a tiny script maps it
# to the help button; it ignores keys typed into text fields, like Streamlit's own shortcuts.
_QUESTION_MARK = """<script>
if (!window.__ecifHelpKey) {
  window.__ecifHelpKey = true;
  window.parent.document.addEventListener('keydown', (event) => {
    const tag = (event.target.tagName || '').toLowerCase();
    if (event.key !== '?' || tag === 'input' || tag === 'textarea' || event.target.isContentEditable) return;
    const button = window.parent.document.querySelector('.st-key-help_keys button');
    if (button) { button.click(); }
  });
}
</script>"""


@st.dialog("Keyboard shortcuts")
def _help() -> None:
    st.table(pd.DataFrame({"key": list(KEYS), "does": list(KEYS.values())}).set_index("key"))
    st.caption("Keys never fire while you type in a text box.")


def render(ctx: Context) -> None:
    if not ctx.scored:
        st.header("Review")
        status = ctx.manager.status(ctx.run.directory) or {}
        if status.get("state") == "running":
            st.info("Scoring this run in the background: data, features, fine-tuning, curvature, then the "
                    "scores of every pair. The ranked pairs appear here when it finishes (about a minute and a half "
                    "for the built-in demo); the current stage and its progress are in the sidebar.")
        else:
            st.info("This run has no scores yet. Start scoring from the sidebar, or start a run on the "
                    "Load page.")
        return
    not_converged_notice(ctx.run)
    top = st.columns([6, 1, 1])
    top[1].button("Undo", key="undo", shortcut="u", on_click=undo, args=(ctx,), width="stretch")
    if top[2].button("Keys (h)", key="help_keys", shortcut="h", width="stretch"):
        _help()
    st.html(_QUESTION_MARK, unsafe_allow_javascript=True)
    uid = st.query_params.get("uid")
    if uid is not None and uid in set(ctx.table["uid"]):
        detail(ctx, int(ctx.table.index[ctx.table["uid"] == uid][0]))
    else:
        grid(ctx)


# ---------------------------------------------------------------------------- grid
def _bulk(ctx: Context) -> None:
    """Bulk action on what the grid shows (the map selection when there is one): count first,
    then an explicit confirmation."""
    source = "map selection" if ctx.filters.rows is not None else "current filter"
    with st.popover(f"Bulk action · {len(ctx.view)} pairs", disabled=ctx.view.empty):
        action = st.radio("Action", ["accept", "drop", "restore"], horizontal=True, key="bulk_action")
        rows = actionable_rows(ctx.view, action)
        st.caption(f"{len(rows)} of the {len(ctx.view)} pairs of the {source} would change.")
        confirmed = st.checkbox(f"Apply **{action}** to these {len(rows)} pairs", key="bulk_confirm")
        if st.button(f"{action.capitalize()} {len(rows)} pairs", key="bulk_go", type="primary",
                     disabled=not (confirmed and rows)):
            act(ctx, action, rows)
            st.session_state.pop("bulk_confirm", None)
            st.rerun()


ORDER_TITLES = {MISALIGNMENT: "most likely misaligned first", "influence": "most harmful first"}


def grid(ctx: Context) -> None:
    order = ORDER_TITLES.get(ctx.sort_by, f"by {ctx.sort_by}")
    st.header(f"Review · {order if not ctx.reverse else f'{order}, reversed'}")
    controls = st.columns([2, 2, 2, 3])
    per_page = controls[0].selectbox("Per page", [12, 24, 48, 96], index=1, key="per_page",
                                     bind="query-params")
    columns = controls[1].slider("Cards per row", 2, 8, 4, key="cols", bind="query-params")
    with controls[2]:
        st.write("")
        _bulk(ctx)
    with controls[3]:
        st.write("")
        st.button("🗑️ Dropped bin", key="open_bin", on_click=_show_bin,
                  help="Show dropped pairs (restore them from their cards or in bulk).")
    view = ctx.view
    pages = max(1, -(-len(view) // per_page))
    page = st.pagination(pages, key="page", bind="query-params") if pages > 1 else 1
    page = min(page, pages)
    st.session_state["grid_page"] = page
    nav = st.columns([1, 1, 8])
    nav[0].button("◀ page", key="prev_page", shortcut="p", disabled=page <= 1,
                  on_click=_set_page, args=(page - 1,))
    nav[1].button("page ▶", key="next_page", shortcut="n", disabled=page >= pages,
                  on_click=_set_page, args=(page + 1,))
    if view.empty:
        st.info("No pair matches the filters.")
        return
    card_grid(ctx, view.iloc[(page - 1) * per_page : page * per_page], key="grid", columns=columns)


def _set_page(page: int) -> None:
    # The pagination widget is not rendered in the detail view, so Streamlit forgets its value;
    # "grid_page" remembers it for the way back.
    st.session_state["page"] = st.session_state["grid_page"] = page


def _show_bin() -> None:
    st.session_state["status"] = ["dropped"]
    first_page()


# ---------------------------------------------------------------------------- detail
def _go(uid: str | None) -> None:
    if uid is None:
        st.query_params.pop("uid", None)
        if st.session_state.get("grid_page", 1) > 1:
            st.session_state["page"] = st.session_state["grid_page"]
    else:
        open_pair(uid)


def _decide_and_advance(ctx: Context, action: str, row: int, caption: str | None, next_uid: str | None) -> None:
    act(ctx, action, [row], None if caption is None else [caption])
    if st.session_state.get("advance", True) and next_uid is not None and "flash_error" not in st.session_state:
        open_pair(next_uid)


def detail(ctx: Context, row: int) -> None:
    table, pair = ctx.table, ctx.table.loc[row]
    before = adjacent_row(ctx.table, ctx.view, row, ctx.sort_by, ctx.reverse, -1)
    after = adjacent_row(ctx.table, ctx.view, row, ctx.sort_by, ctx.reverse, +1)

    def uid_of(neighbour: int | None) -> str | None:
        return None if neighbour is None else str(table.at[neighbour, "uid"])

    nav = st.columns([1, 1, 1, 5])
    nav[0].button("◀ Grid", key="back", shortcut="escape", on_click=_go, args=(None,))
    nav[1].button("← Prev", key="prev", shortcut="k", disabled=before is None, on_click=_go,
                  args=(uid_of(before),))
    nav[2].button("Next →", key="next", shortcut="j", disabled=after is None, on_click=_go,
                  args=(uid_of(after),))
    nav[3].toggle("Next pair after a decision", value=True, key="advance")

    image_column, info_column = st.columns([2, 3])
    with image_column:
        st.image(pair["filepath"], width="stretch")
        st.caption(f"`{pair['uid']}` · row {row} · {pair['filepath']}")
    with info_column:
        status = pair["status"]
        st.subheader(f"#{int(pair['rank'])} · {STATUS_ICONS[status]} {status}" if "rank" in pair
                     else f"{STATUS_ICONS[status]} {status}")
        st.markdown(f"**Caption:** {pair['caption']}")
        if pair["scored_caption"] != pair["caption"]:
            st.caption(f"Scored caption: {pair['scored_caption']}")
        if "influence_pos" in pair:
            st.html(harm_bar(float(pair["influence_pos"]), float(pair["influence_neg"]),
                             influence_scale(table)))
        if "suggested_action" in pair:
            st.markdown(f"Suggested action from the scores: **{pair['suggested_action']}**")
        index = neighbour_index(ctx.run)
        suggestion, evidence = suggest_caption(ctx.run, row, k=8, index=index,
                                               exclude_rows=ctx.dropped_rows, captions=table["caption"])
        next_uid = uid_of(after)
        buttons = st.columns(4)
        buttons[0].button("Accept (a)", key="accept", shortcut="a", type="primary", width="stretch",
                          on_click=_decide_and_advance, args=(ctx, "accept", row, None, next_uid))
        if status == "dropped":
            buttons[1].button("Restore", key="restore", width="stretch", on_click=_decide_and_advance,
                              args=(ctx, "restore", row, None, None))
        else:
            buttons[1].button("Drop (d)", key="drop", shortcut="d", width="stretch",
                              on_click=_decide_and_advance, args=(ctx, "drop", row, None, next_uid))
        buttons[2].button("Suggested (s)", key="use_suggestion", shortcut="s", width="stretch",
                          disabled=suggestion is None, on_click=_decide_and_advance,
                          args=(ctx, "relabel", row, suggestion, next_uid),
                          help=f"Relabel to: {suggestion}" if suggestion else "No neighbour caption differs")
        new_caption = st.text_input("New caption", value=suggestion or pair["caption"],
                                    key=f"caption_{row}")
        buttons[3].button("Relabel (e)", key="relabel", shortcut="e", width="stretch",
                          on_click=_decide_and_advance, args=(ctx, "relabel", row, new_caption, next_uid))
        st.markdown(f"Suggested caption: **{suggestion or '—'}** (from the captions of its image neighbours)")
        scores_column, fields_column = st.columns(2)
        scores_column.dataframe(readable(pd.Series(score_summary(pair), name="score")), width="stretch")
        fields = pair.drop(labels=[*score_summary(pair), "filepath", "row", "uid"], errors="ignore")
        fields_column.dataframe(fields.astype(str).rename("value").to_frame(), width="stretch")
        with st.expander("Why this suggestion"):
            st.dataframe(evidence, hide_index=True, width="stretch")
    _neighbours(ctx, row, index)


def _neighbours(ctx: Context, row: int, index: NeighbourIndex) -> None:
    st.subheader("Similar pairs")
    settings = st.columns([1, 1, 4])
    k = settings[0].number_input("k", 1, 48, 8, key="nn_k")
    least = settings[1].toggle("Least similar", key="nn_least")
    for tab, by in zip(st.tabs(["By image", "By caption"]), ("image", "text")):
        with tab:
            found = index.similar(row, k=int(k), by=by, least=least, exclude_rows=ctx.dropped_rows)
            pairs = ctx.table.loc[found["row"]].assign(similarity=found["similarity"].to_numpy())
            card_grid(ctx, pairs, key=f"nn_{by}", columns=4, extra_column="similarity")
