"""What-if page: what the current decisions will do to the model, before and after retraining.

Three engine calls, shown side by side against the same "before": the closed-form prediction
(``ecif.predict_edit``, about a second), the Newton edit that writes an edited checkpoint
(``ecif.apply_edit``, exported with the manifest) and the ground truth by re-fitting
(``ecif.verify_by_refit``, slower).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st
from views.context import Context
from views.data import ENGINE_SPINNER
from views.finetune import not_converged_notice

import ecif
from ecif.curation.review import edit_spec

CALLS = {  # result slot -> (column title, button label, help)
    "predicted": ("predicted (no retraining)", "Predict the effect", "Closed-form ECIF estimate; about a second."),
    "edited": ("edited model (measured)", "Apply edit",
               "Newton steps on the reduced objective; writes RUN/edited/model.safetensors, which the "
               "next export includes."),
    "refit": ("re-fitted (measured)", "Verify by refit",
              "Re-fine-tunes the heads without the dropped pairs (slower) to check the prediction."),
}


def _engine(slot: str) -> Callable[..., ecif.EditResult]:
    """The library function that fills a result slot."""
    return {"predicted": ecif.predict_edit, "edited": ecif.apply_edit, "refit": ecif.verify_by_refit}[slot]


def _run(ctx: Context, slot: str) -> None:
    engine = _engine(slot)
    drop, relabel = edit_spec(ctx.store.current_state())
    with st.spinner(ENGINE_SPINNER.format(name=engine.__name__)):
        try:
            st.session_state[f"whatif_{slot}"] = engine(ctx.run, drop, relabel)
        except Exception as error:  # shown to the curator; the engine's message says what is wrong
            st.session_state[f"whatif_{slot}"] = f"{type(error).__name__}: {error}"


def comparison(results: dict[str, Any]) -> pd.DataFrame:
    """One row per metric: ``before`` (from the first result), then each result's ``after``."""
    columns: dict[str, dict[str, float]] = {}
    for slot, result in results.items():
        if "before" not in columns:
            columns["before"] = dataclasses.asdict(result.before)
        columns[CALLS[slot][0]] = dataclasses.asdict(result.after)
    return pd.DataFrame(columns)


def render(ctx: Context) -> None:
    st.header("What-if")
    if not ctx.scored:
        st.info("Available once the run is scored.")
        return
    not_converged_notice(ctx.run)
    drop, relabel = edit_spec(ctx.store.current_state())
    st.markdown(f"Current decisions: **{len(drop)}** pairs dropped, **{len(relabel)}** relabelled.")
    buttons = st.columns(len(CALLS))
    for column, (slot, (_, label, help_text)) in zip(buttons, CALLS.items()):
        if column.button(label, key=f"whatif_go_{slot}", help=help_text,
                         type="primary" if slot == "predicted" else "secondary"):
            _run(ctx, slot)
    results = {slot: st.session_state.get(f"whatif_{slot}") for slot in CALLS}
    for slot, result in results.items():
        if isinstance(result, str):
            st.warning(f"{CALLS[slot][0]}: {result}")
    finished = {slot: r for slot, r in results.items() if r is not None and not isinstance(r, str)}
    if not finished:
        st.caption("Run a prediction to compare the model before and after your decisions.")
        return
    st.dataframe(comparison(finished), width="stretch")
    st.caption(" · ".join(f"{CALLS[s][0]}: {r.method}, {r.dropped} dropped, {r.relabelled} relabelled, "
                          f"{r.seconds:.1f} s" for s, r in finished.items()))
    if (edited := finished.get("edited")) is not None and edited.checkpoint:
        st.success(f"Edited checkpoint: `{edited.checkpoint}` (included in the next export)")
