"""Data access shared by the pages: the job manager, the run's tables, its neighbour index and
thumbnails, each cached for the server process and keyed on the files' modification times."""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
import streamlit as st

from ecif.curation.media import thumbnail_path
from ecif.index.neighbours import NeighbourIndex
from ecif.jobs.manager import JobManager
from ecif.run import EMBEDDINGS_FILE, INDEX_META_FILE, MISPREDICTIONS_FILE, SCORES_FILE, Run
from ecif.tasks.detect import with_misalignment

#: Shown while a page waits for an engine call (``ecif.trace``, ``ecif.predict_edit``, ...).
ENGINE_SPINNER = ("Running {name}… (the first engine call after the server starts loads the run's "
                  "curvature, which can take a while; later calls are quick)")


@st.cache_resource
def job_manager() -> JobManager:
    """One job manager per server process, shared (thread-safely) by all sessions."""
    return JobManager()


@st.cache_data(max_entries=8, show_spinner=False)
def _read_parquet(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_parquet(path)


def _read_frame(run: Run, name: str) -> pd.DataFrame | None:
    """A run parquet file, cached until the file changes (keyed on its mtime); None while missing."""
    if not run.has(name):
        return None
    return _read_parquet(str(run.path(name)), run.mtime(name))


@st.cache_data(max_entries=8, show_spinner=False)
def _read_scores(path: str, mtime: float) -> pd.DataFrame:
    # Runs scored before the default detector existed get its column once per file version, not on every rerun.
    return with_misalignment(pd.read_parquet(path))


def scores(run: Run) -> pd.DataFrame | None:
    """The run's scores table (None until the run is scored), with the default detector's column
    (computed from the stored columns for runs scored before it existed)."""
    if not run.has(SCORES_FILE):
        return None
    return _read_scores(str(run.path(SCORES_FILE)), run.mtime(SCORES_FILE))


def mispredictions(run: Run) -> pd.DataFrame | None:
    """The run's mispredictions table (None until scoring has written it)."""
    return _read_frame(run, MISPREDICTIONS_FILE)


@st.cache_resource(max_entries=4, show_spinner="Building the neighbour index…")
def _neighbour_index(run_dir: str, mtimes: tuple[float, float]) -> NeighbourIndex:
    return NeighbourIndex.load(Run(run_dir))


def neighbour_index(run: Run) -> NeighbourIndex:
    """The run's faiss index (built on first use if the pipeline's index stage has not run)."""
    # The index's metadata is written last by every build, so its mtime names the finished build;
    # new embeddings change the key too, so the loader sees the index is stale and rebuilds it.
    return _neighbour_index(str(run.directory), (run.mtime(INDEX_META_FILE), run.mtime(EMBEDDINGS_FILE)))


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumbnail_b64(path: str, mtime: float) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def thumbnail_b64(run: Run, row: int, filepath: str) -> str:
    """The pair's thumbnail (made on first request) as base64 JPEG, cached until it is rewritten."""
    thumb = thumbnail_path(run, row, filepath)
    return _thumbnail_b64(str(thumb), thumb.stat().st_mtime)
