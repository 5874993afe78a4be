"""The curator's actions as button callbacks: record a decision, undo, open a pair; and the
one-time message that reports the outcome on the next script run."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st
from views.context import Context

from ecif.curation.review import decide


def act(ctx: Context, action: str, rows: Sequence[int], new_captions: Sequence[str] | None = None) -> None:
    """Record a decision (button callback); the message shows on the next script run."""
    if not rows:
        return
    try:
        decide(ctx.store, ctx.table, action, list(rows), new_captions)
        st.session_state["flash"] = f"{action}: {len(rows)} pair{'s' * (len(rows) != 1)}"
    except ValueError as error:
        st.session_state["flash_error"] = str(error)


def undo(ctx: Context) -> None:
    reverted = ctx.store.undo()
    st.session_state["flash"] = f"undone: {len(reverted)} decision(s)" if reverted else "nothing to undo"


def flash() -> None:
    """Show (once) the outcome of the last action."""
    if message := st.session_state.pop("flash", None):
        st.toast(message)
    if error := st.session_state.pop("flash_error", None):
        st.error(error)


def open_pair(uid: str) -> None:
    """Open the detail view of ``uid`` (a shareable ``?uid=`` URL)."""
    st.query_params["uid"] = uid
