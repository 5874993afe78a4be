"""ecif curation app (``ecif app``): load a run, review harmful pairs, trace mispredictions, preview
edits, plot scores and export the cleaned manifest.

Arguments after ``--``: ``--run DIR`` (a run folder; default: the demo run, scored in the
background on first launch) and ``--manifest PATH`` (score this manifest into the run folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st
from streamlit import config as st_config

# Streamlit puts this folder on sys.path for `streamlit run`; AppTest and other runners may not.
# (Installed from the wheel, this folder is site-packages/ecif_app: `views` is found the same way.)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from views import (actions, context, export, filters, job_panel, load,  # noqa: E402
                   mispredictions, plots, review, whatif)

from ecif.jobs.launch import run_dir_for  # noqa: E402

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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ecif app", add_help=False)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--manifest", default=None)
    return parser.parse_known_args(argv)[0]


def main() -> None:
    hide_developer_toolbar()
    st.set_page_config(page_title="ecif · curate CLIP data", page_icon="🧹", layout="wide")
    args = parse_args(sys.argv[1:])
    launch_run = (args.run or run_dir_for(args.manifest)).expanduser().resolve()
    ctx = context.build_context(launch_run, args.manifest)
    ctx.pages = {
        "load": st.Page(lambda: load.render(ctx), title="Load", icon="📂", url_path="load"),
        "review": st.Page(lambda: review.render(ctx), title="Review", icon="🔎", url_path="review",
                          default=True),
        "mispredictions": st.Page(lambda: mispredictions.render(ctx), title="Mispredictions",
                                  icon="🎯", url_path="mispredictions"),
        "whatif": st.Page(lambda: whatif.render(ctx), title="What-if", icon="🧪", url_path="whatif"),
        "plots": st.Page(lambda: plots.render(ctx), title="Plots", icon="📈", url_path="plots"),
        "export": st.Page(lambda: export.render(ctx), title="Export", icon="📦", url_path="export"),
    }
    page = st.navigation(list(ctx.pages.values()))
    st.sidebar.caption(f"Run: `{ctx.run.directory}`")
    job_panel.progress_panel(ctx)
    if ctx.scored:
        # Rendered on every page so the filters (and the view they define) persist across pages.
        filters.sidebar_filters(ctx)
    actions.flash()
    page.run()


main()
