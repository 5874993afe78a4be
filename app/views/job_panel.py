"""The sidebar panel of the open run's background scoring job: stage, progress, cancel, resume."""

from __future__ import annotations

import streamlit as st
from views.context import Context, start_job


def progress_panel(ctx: Context) -> None:
    """Stage, progress bar and cancel button of the background job, polled from ``job.json``.

    The fragment polls only while the job runs; when it ends, one full rerun loads the results and
    the next script run renders the panel without ``run_every``, so polling stops.
    """
    status = ctx.manager.status(ctx.run.directory)
    if error := st.session_state.pop("job_error", None):
        st.sidebar.error(error)
    if status is None:
        return
    was_running = status.get("state") == "running"

    @st.fragment(run_every=1.0 if was_running else None)
    def panel() -> None:
        now = ctx.manager.status(ctx.run.directory) or status
        state = now.get("state")
        if state == "running":
            done, total = int(now.get("done", 0)), int(now.get("total", 0))
            st.caption(f"Scoring · **{now.get('stage')}** {done}/{total or '?'}")
            st.progress(min(done / total, 1.0) if total else 0.0)
            st.button("Cancel", key="cancel_job", on_click=ctx.manager.cancel,
                      args=(ctx.run.directory,), help="Stops after the current step; cached stages are kept.")
        elif was_running:
            st.rerun(scope="app")
        elif state == "done":
            st.caption(f"Scoring finished {now.get('finished', '')}")
        else:
            message = now.get("error") or f"stopped during {now.get('stage')}"
            st.warning(f"Scoring {state}: {message}")
            st.button("Resume scoring", key="resume_job", on_click=start_job, args=(ctx,),
                      help="Starts again; finished stages are loaded from the run folder.")

    with st.sidebar:
        panel()
