"""How the heads were fine-tuned: the chosen penalty δ, its sweep, and a loud notice when the
heads are not a well-conditioned minimiser (every score is then unreliable)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ecif.run import Run


def not_converged_notice(run: Run) -> None:
    """An error box above any score when the fine-tuning report says the heads are not a minimiser."""
    warning = run.unconverged_warning()
    if warning:
        st.error(warning[0].upper() + warning[1:])


def summary(run: Run) -> None:
    """The chosen δ, the fine-tuning checks and (for δ = auto) every grid point tried."""
    report = run.finetune_report()
    if report is None:
        return
    from ecif.finetune import sweep_verdict  # imports torch: only once a run has been fine-tuned
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
            rows.append({
                "δ": point["delta"],
                "held-out loss": point.get("selection_loss"),
                "gradient norm": point.get("gradient_norm"),
                "smallest eigenvalue": point.get("smallest_hessian_eigenvalue"),
                "verdict": sweep_verdict(point, selection["delta"]),
            })
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                     column_config={"gradient norm": st.column_config.NumberColumn(format="%.1e")})
        if selection.get("note"):
            st.caption(selection["note"])
