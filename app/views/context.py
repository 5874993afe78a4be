"""What every page receives: the :class:`Context` of one script run (the open run, its decisions
and scores, the curator's view of them), and the session's choice of run and its scoring job.

``main.py`` builds the context once per script run with :func:`build_context`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from views import data

from ecif.config import RunConfig
from ecif.curation.review import Filters, open_store, review_table
from ecif.curation.store import DecisionStore
from ecif.influence.columns import MISALIGNMENT
from ecif.jobs.launch import recorded_config
from ecif.jobs.manager import JobManager
from ecif.run import Run


@dataclass
class Context:
    """What one script run knows about the open run and the curator's view of it."""

    run: Run
    manager: JobManager
    store: DecisionStore
    table: pd.DataFrame | None = None  # scores + status + current caption (None until scored)
    view: pd.DataFrame | None = None  # ``table`` filtered and sorted as the sidebar says
    filters: Filters = field(default_factory=Filters)
    sort_by: str = MISALIGNMENT
    reverse: bool = False
    pages: dict[str, Any] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.table is not None

    @property
    def dropped_rows(self) -> list[int]:
        return [] if self.table is None else self.table.index[self.table["status"] == "dropped"].tolist()

    def refresh(self) -> None:
        """Load the scores (cached) and fold in the current decisions."""
        scores = data.scores(self.run)
        self.table = None if scores is None else review_table(scores, self.store.current_state())


def session_id() -> str:
    """A per-browser-session id: it scopes undo and is stored with every decision."""
    if "session_id" not in st.session_state:
        st.session_state["session_id"] = uuid.uuid4().hex[:12]
    return st.session_state["session_id"]


def current_run_dir(default: Path) -> Path:
    """The open run: the ``run`` query parameter (survives reloads), else ``default``.

    Switching pages in the sidebar drops the query parameters, so the session remembers the open
    run too and puts it back in the URL (otherwise the next page would silently show the launch run).
    """
    chosen = st.query_params.get("run") or st.session_state.get("open_run_dir")
    if not chosen:
        return default
    st.session_state["open_run_dir"] = chosen
    if st.query_params.get("run") != chosen:
        st.query_params["run"] = chosen
    return Path(chosen)


def open_run(run_dir: str | Path) -> None:
    """Switch this session to another run folder."""
    st.query_params["run"] = str(Run(run_dir).directory)
    st.query_params.pop("uid", None)
    st.session_state.pop("map_rows", None)


def start_job(ctx: Context, config: RunConfig | None = None) -> None:
    """Start (or rejoin) scoring of the open run in the background; errors are shown, not raised.

    Without a ``config`` the job resumes with the settings the run recorded
    (:func:`ecif.jobs.launch.recorded_config`).
    """
    try:
        ctx.manager.start(config or recorded_config(ctx.run.directory))
    except Exception as error:  # the engine may be missing or reject a setting: tell the curator
        st.session_state["job_error"] = f"Could not start scoring: {type(error).__name__}: {error}"


def build_context(default_run: Path, manifest: str | None) -> Context:
    """The run, its decisions and scores for this script run; starts scoring when needed.

    Scoring of the launch run (the demo, or ``--run``/``--manifest``) starts automatically, once
    per session, when it has no results and no job yet or its job was interrupted by a killed
    server; a failed or cancelled job waits for the curator.
    """
    run = Run(current_run_dir(default_run))
    ctx = Context(run=run, manager=data.job_manager(), store=open_store(run, session_id()))
    status = ctx.manager.status(run.directory)
    auto_key = f"auto_started::{run.directory}"
    if run.directory == default_run and not run.is_scored and not st.session_state.get(auto_key) \
            and (status is None or status.get("state") == "interrupted"):
        st.session_state[auto_key] = True
        start_job(ctx, RunConfig(run.directory, manifest=Path(manifest).expanduser().resolve()) if manifest else None)
    ctx.refresh()
    return ctx
