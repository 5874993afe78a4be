"""State shared by every page: the open run, cached artefacts, the job panel, filters and cards.

Pages receive a :class:`Context` built once per script run by ``main.py``.  Everything here is
presentation and wiring; scoring, filtering, neighbours and exports are library calls.
"""

from __future__ import annotations

import base64
import html
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from streamlit import config as st_config

from ecif.curation.media import thumbnail_path
from ecif.curation.review import (STATUSES, Filters, apply_filters, decide, open_store,
                                  queue_counts, review_table, score_columns, sort_table)
from ecif.curation.store import DecisionStore
from ecif.curation.units import si_format
from ecif.index.neighbours import META_FILE, NeighbourIndex
from ecif.jobs.launch import build_config
from ecif.jobs.manager import JobManager
from ecif.run import EMBEDDINGS_FILE, INDEX_DIR, SCORES_FILE, Run

STATUS_ICONS = {"pending": "⏳", "accepted": "✅", "relabelled": "✏️", "dropped": "🗑️"}
FILTER_KEYS = ("status", "q", "corrupted", "split")
RANGE_PREFIX = "r_"


TOOLBAR_OPTION = "client.toolbarMode"


def hide_developer_toolbar() -> None:
    """Hide Streamlit's developer toolbar (Deploy, Rerun, Clear cache): this is a local tool.

    ``ecif app`` passes ``--client.toolbarMode viewer`` (:func:`ecif.jobs.launch.app_command`); this
    covers a plain ``streamlit run app/main.py``.  The option is server-wide and is sent to the
    browser when a script run starts, so the run that first sets it reruns once to apply it.  A
    mode chosen explicitly (flag, config file, environment) is left alone.
    """
    if st_config.is_manually_set(TOOLBAR_OPTION):
        return
    st.set_option(TOOLBAR_OPTION, "viewer")
    st.rerun()


# ---------------------------------------------------------------------------- cached resources
@st.cache_resource
def job_manager() -> JobManager:
    """One job manager per server process, shared (thread-safely) by all sessions."""
    return JobManager()


@st.cache_data(max_entries=8, show_spinner=False)
def _read_parquet(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_parquet(path)


def read_frame(run: Run, name: str) -> pd.DataFrame | None:
    """A run parquet file, cached until the file changes (keyed on its mtime)."""
    path = run.path(name)
    if not path.exists():
        return None
    return _read_parquet(str(path), path.stat().st_mtime)


@st.cache_resource(max_entries=4, show_spinner="Building the neighbour index…")
def _neighbour_index(run_dir: str, mtimes: tuple[float, float]) -> NeighbourIndex:
    return NeighbourIndex.load(Run(run_dir))


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumbnail_b64(path: str, mtime: float) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def neighbour_index(run: Run) -> NeighbourIndex:
    """The run's faiss index (built on first use if the pipeline's index stage has not run)."""
    # index.json is written last by every build, so its mtime names the finished build; new
    # embeddings change the key too, so the loader sees the index is stale and rebuilds it.
    markers = (run.path(INDEX_DIR) / META_FILE, run.path(EMBEDDINGS_FILE))
    mtimes = tuple(m.stat().st_mtime if m.exists() else 0.0 for m in markers)
    return _neighbour_index(str(run.directory), mtimes)


# ---------------------------------------------------------------------------- context
@dataclass
class Context:
    """What one script run knows about the open run and the curator's view of it."""

    run: Run
    manager: JobManager
    store: DecisionStore
    table: pd.DataFrame | None = None  # scores + status + current caption (None until scored)
    view: pd.DataFrame | None = None  # ``table`` filtered and sorted as the sidebar says
    filters: Filters = field(default_factory=Filters)
    sort_by: str = "influence"
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
        scores = read_frame(self.run, SCORES_FILE)
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
    st.query_params["run"] = str(Path(run_dir).expanduser().resolve())
    st.query_params.pop("uid", None)
    st.session_state.pop("map_rows", None)


def start_job(ctx: Context, settings: dict[str, Any] | None = None) -> None:
    """Start (or rejoin) scoring of the open run in the background; errors are shown, not raised.

    ``settings`` are plain run settings (see :func:`ecif.jobs.launch.build_config`).  Without them
    the job resumes with the settings the run recorded (``run.json``, else its last ``job.json``).
    """
    if settings is None:
        settings = (ctx.run.info.get("settings")
                    or (ctx.manager.status(ctx.run.directory) or {}).get("settings") or {})
    try:
        ctx.manager.start(ctx.run.directory, build_config(ctx.run.directory, settings), settings)
    except Exception as error:  # the engine may be missing or reject a setting: tell the curator
        st.session_state["job_error"] = f"Could not start scoring: {type(error).__name__}: {error}"


def build_context(default_run: Path, manifest: str | None) -> Context:
    """The run, its decisions and scores for this script run; starts scoring when needed.

    Scoring of the launch run (the demo, or ``--run``/``--manifest``) starts automatically, once
    per session, when it has no results and no job yet or its job was interrupted by a killed
    server; a failed or cancelled job waits for the curator.
    """
    run = Run(current_run_dir(default_run))
    ctx = Context(run=run, manager=job_manager(), store=open_store(run, session_id()))
    status = ctx.manager.status(run.directory)
    auto_key = f"auto_started::{run.directory}"
    if run.directory == default_run and not run.is_scored and not st.session_state.get(auto_key) \
            and (status is None or status.get("state") == "interrupted"):
        st.session_state[auto_key] = True
        start_job(ctx, {"manifest": str(Path(manifest).expanduser().resolve())} if manifest else None)
    ctx.refresh()
    return ctx


# ---------------------------------------------------------------------------- job progress
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


# ---------------------------------------------------------------------------- filters
def _range_key(column: str) -> str:
    return f"{RANGE_PREFIX}{column}"


def first_page() -> None:
    """A changed filter or order starts the grid again at its first page.

    Set, not deleted: a deleted bound widget would be re-initialised from the old ``?page=``.
    """
    st.session_state["page"] = st.session_state["grid_page"] = 1


def clear_filters(table: pd.DataFrame) -> None:
    """Reset every filter widget (its bound query parameter follows) and the map selection."""
    for key in (*FILTER_KEYS, *(_range_key(c) for c in score_columns(table))):
        st.session_state.pop(key, None)
    st.session_state.pop("map_rows", None)
    first_page()


def sidebar_filters(ctx: Context) -> None:
    """Filters, sort and queue counts in the sidebar; sets ``ctx.filters`` and ``ctx.view``.

    Every widget is bound to a query parameter (``bind="query-params"``), so a reload or a shared
    link shows the same view.
    """
    table = ctx.table
    assert table is not None
    with st.sidebar:
        counts = queue_counts(table)
        st.progress(counts["reviewed_fraction"],
                    text=f"Reviewed {counts['reviewed']} of {counts['total']}")
        st.caption(" · ".join(f"{STATUS_ICONS[s]} {s} {counts[s]}" for s in STATUSES))
        st.subheader("Filters")
        statuses = st.multiselect("Status", STATUSES, key="status", bind="query-params",
                                  on_change=first_page)
        text = st.text_input("Caption contains", key="q", bind="query-params", on_change=first_page)
        corrupted = None
        if "corrupted" in table.columns:
            choice = st.segmented_control("Known corrupted", ["yes", "no"], key="corrupted",
                                          bind="query-params", on_change=first_page)
            corrupted = None if choice is None else choice == "yes"
        splits: list[str] = []
        if "split" in table.columns and table["split"].nunique() > 1:
            splits = st.multiselect("Split", sorted(table["split"].unique()), key="split",
                                    bind="query-params", on_change=first_page)
        ranges: dict[str, tuple[float, float]] = {}
        with st.expander("Score ranges"):
            for column in score_columns(table):
                low, high = float(table[column].min()), float(table[column].max())
                if low == high:
                    continue
                chosen = st.slider(column, low, high, (low, high), step=(high - low) / 200,
                                   key=_range_key(column), bind="query-params", format="%.3g",
                                   on_change=first_page)
                if tuple(chosen) != (low, high):
                    ranges[column] = (float(chosen[0]), float(chosen[1]))
        sortable = [*score_columns(table), *(c for c in ("rank", "row") if c in table.columns)]
        sort_by = st.selectbox("Sort by", sortable, key="sort", bind="query-params", on_change=first_page,
                               help="Suspicious end first (most harmful for influence).")
        reverse = st.toggle("Reverse order", key="reverse", bind="query-params", on_change=first_page)
        selection = st.session_state.get("map_rows")
        ctx.filters = Filters(ranges=ranges, statuses=list(statuses), splits=list(splits),
                              text=text or "", corrupted=corrupted, rows=selection)
        ctx.sort_by, ctx.reverse = sort_by, reverse
        view = apply_filters(table, ctx.filters)
        default_order = sort_table(view, sort_by)
        ctx.view = default_order.iloc[::-1] if reverse else default_order
        if selection is not None:
            st.info(f"Map selection: {len(selection)} pairs (wins over the filters)")
        st.markdown(f"**{len(ctx.view)}** of {len(table)} pairs match")
        st.button("Clear filters", key="clear_filters", on_click=clear_filters, args=(table,),
                  disabled=ctx.filters.is_empty())


# ---------------------------------------------------------------------------- actions and cards
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


def harm_bar(pos: float, neg: float, scale: float) -> str:
    """HTML bar of the positive-role and negative-role influence (red = harmful, green = helpful)."""
    def part(label: str, value: float) -> str:
        width = 0 if scale <= 0 else min(abs(value) / scale, 1.0) * 100
        colour = "#d62728" if value < 0 else "#2ca02c"
        return (f"<div style='display:flex;align-items:center;gap:4px;font-size:11px'>"
                f"<span style='width:26px;color:#666'>{label}</span>"
                f"<div style='flex:1;background:#eee;height:7px;border-radius:3px'>"
                f"<div style='width:{width:.0f}%;background:{colour};height:7px;border-radius:3px'></div>"
                f"</div><span style='width:52px;text-align:right'>{si_format(value, signed=True)}</span></div>")
    return part("pos", pos) + part("neg", neg)


def readable(frame: pd.DataFrame | pd.Series, columns: Sequence[str] | None = None):
    """``frame`` for ``st.dataframe`` with its number ``columns`` (default: all numeric ones) written by
    :func:`~ecif.curation.units.si_format` (``−200µ``, not ``-0.000``); the values, and so sorting,
    stay numbers."""
    frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
    if columns is None:
        columns = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    return frame.style.format(si_format, subset=list(columns))


def influence_scale(table: pd.DataFrame) -> float:
    """The largest role magnitude in the run, so bars are comparable across cards."""
    columns = [c for c in ("influence_pos", "influence_neg") if c in table.columns]
    return float(table[columns].abs().to_numpy().max()) if columns else 1.0


def pair_card(ctx: Context, pair: pd.Series, key: str, scale: float,
              extra: str | None = None, actions: bool = True, stacked: bool = False) -> None:
    """One pair as a card: thumbnail, rank and status, caption, harm bar, decision buttons
    (in one row, or ``stacked`` in two for narrow cards)."""
    row = int(pair["row"])
    status = pair.get("status", "pending")
    rank = f"#{int(pair['rank'])}" if "rank" in pair and pair["rank"] == pair["rank"] else ""
    caption = html.escape(str(pair["caption"]))
    if "scored_caption" in pair and pair["scored_caption"] != pair["caption"]:
        caption = f"<s>{html.escape(str(pair['scored_caption']))}</s> → {caption}"
    bar = (harm_bar(float(pair["influence_pos"]), float(pair["influence_neg"]), scale)
           if "influence_pos" in pair else "")
    thumb = thumbnail_path(ctx.run, row, pair["filepath"])
    with st.container(border=True):
        # One HTML block per card (image inlined): a 24-card page is then ~24 elements, not ~120,
        # which is what keeps the grid fast in the browser.
        st.html(f"<img src='data:image/jpeg;base64,{_thumbnail_b64(str(thumb), thumb.stat().st_mtime)}'"
                f" style='width:100%;aspect-ratio:1;object-fit:contain;border-radius:6px'>"
                f"<div style='margin:4px 0'><b>{rank}</b> {STATUS_ICONS.get(status, '')} {status}"
                f"{' · ' + html.escape(extra) if extra else ''}</div>"
                f"<div class='ecif-caption' style='margin-bottom:4px'>{caption}</div>{bar}")
        if not actions:
            return
        buttons = st.container(key=f"{CARD_BUTTONS}{key}_{row}")  # compact padding: CARD_CSS
        if stacked:  # narrow cards: "Open" on its own line, the two decisions below it
            left, (middle, right) = buttons.container(), buttons.columns(2, gap="small")
        else:  # "Open" gets the room its word needs; the decisions are single glyphs
            left, middle, right = buttons.columns([2, 1, 1], gap="small")
        left.button("Open", key=f"{key}_open_{row}", on_click=open_pair, args=(str(pair["uid"]),),
                    width="stretch", help="Detail view: full image, all scores, caption suggestion, "
                                          "similar pairs (Esc returns to the grid)")
        middle.button("✓", key=f"{key}_acc_{row}", help="Accept", on_click=act,
                      args=(ctx, "accept", [row]), width="stretch")
        if status == "dropped":
            right.button("↩", key=f"{key}_res_{row}", help="Restore from the bin", on_click=act,
                         args=(ctx, "restore", [row]), width="stretch")
        else:
            right.button("✗", key=f"{key}_drop_{row}", help="Drop (to the bin)", on_click=act,
                         args=(ctx, "drop", [row]), width="stretch")


#: Cards per row above which a card's buttons take two lines ("Open" no longer fits beside ✓ and ✗
#: at 1400 px with the sidebar open).
STACK_ABOVE = 5
CARD_BUTTONS = "card_buttons_"
#: Card buttons with a narrow side padding, so a glyph still fits at 8 cards per row.
CARD_CSS = (f"<style>[class*='st-key-{CARD_BUTTONS}'] button {{padding-left:4px;padding-right:4px;"
            "min-width:0}</style>")


def card_grid(ctx: Context, pairs: pd.DataFrame, key: str, columns: int = 4,
              extra_column: str | None = None, actions: bool = True, scale: float | None = None) -> None:
    """Cards laid out ``columns`` per row; ``scale``: the bars' full width (default: the run's largest role)."""
    if scale is None:
        scale = influence_scale(ctx.table) if ctx.table is not None else 1.0
    if actions:
        st.html(CARD_CSS)  # style only: takes no room on the page
    for start in range(0, len(pairs), columns):
        cells = st.columns(columns)
        for cell, (_, pair) in zip(cells, pairs.iloc[start : start + columns].iterrows()):
            with cell:
                extra = (None if extra_column is None
                         else f"{extra_column} {si_format(pair[extra_column], signed=True)}")
                pair_card(ctx, pair, key, scale, extra=extra, actions=actions,
                          stacked=columns > STACK_ABOVE)


ENGINE_SPINNER = ("Running {name}… (the first engine call after the server starts loads the run's "
                  "curvature, which can take a while; later calls are quick)")


def engine_call(name: str) -> Any | None:
    """``ecif.<name>`` if the engine provides it, else None (the page says what is missing)."""
    import ecif

    try:
        return getattr(ecif, name)
    except AttributeError:
        return None

