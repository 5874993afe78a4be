"""How the heads were fine-tuned: the chosen penalty δ, its sweep, and a loud notice when the
heads are not a well-conditioned minimiser (every score is then unreliable)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ecif.run import Run


def not_converged_notice(run: Run) -> None:
    """An error box above any score when the fine-tuning report says the heads are not a minimiser."""
    report = run.finetune_report()
    if report is None or report.get("converged", True):
        return
    st.error("The fine-tuned heads are not a well-conditioned minimum, so these influence scores are "
             "unreliable: " + " ".join(report.get("warnings", [])))


def summary(run: Run) -> None:
    """The chosen δ, the fine-tuning checks and (for δ = auto) every grid point tried."""
    report = run.finetune_report()
    if report is None:
        return
    selection = report.get("delta_selection")
    how = (f"chosen on {selection['selection_pairs']} held-out trusted pairs (influence is measured on the rest)"
           if selection else "as set")
    st.markdown(f"**Penalty δ = {report['delta']:g}**, {how} · gradient norm {report['gradient_norm']:.1e} · "
                f"smallest Hessian eigenvalue {report.get('smallest_hessian_eigenvalue_note') or format(report['smallest_hessian_eigenvalue'], '.3g')} · "
                f"{'converged' if report['converged'] else 'NOT converged'}")
    not_converged_notice(run)
    if selection:
        rows = []
        for point in selection["sweep"]:
            tried = "skipped" not in point
            rows.append({
                "δ": point["delta"],
                "held-out loss": point.get("selection_loss"),
                "gradient norm": point.get("gradient_norm"),
                "smallest eigenvalue": point.get("smallest_hessian_eigenvalue"),
                "verdict": ("chosen" if point["delta"] == selection["delta"] else
                            "eligible" if tried and point["converged"] else
                            "not a well-conditioned minimum" if tried else f"not tried: {point['skipped']}"),
            })
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                     column_config={"gradient norm": st.column_config.NumberColumn(format="%.1e")})
        if selection.get("note"):
            st.caption(selection["note"])
