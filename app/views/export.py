"""Export page: everything kept, or exactly the current view, in formats that train straight away."""

from __future__ import annotations

import streamlit as st
from views.context import Context

from ecif.curation.export import FORMATS, export_run

DOWNLOAD_LIMIT_BYTES = 200 * 2**20


def render(ctx: Context) -> None:
    st.header("Export")
    if not ctx.scored:
        st.info("Available once the run is scored.")
        return
    view_rows = ctx.view.index.tolist()
    mode = st.radio("What to export", ["kept", "view"], key="export_mode", horizontal=True,
                    format_func={"kept": "Everything kept (all splits, minus the dropped bin)",
                                 "view": f"Exactly this view ({len(view_rows)} pairs; dropped ones "
                                         "left out)"}.get)
    formats = st.multiselect("Formats", FORMATS, default=["csv", "jsonl", "parquet"], key="export_formats")
    out_dir = st.text_input("Export folder", str(ctx.run.export_dir()), key="export_dir")
    st.caption("Each split in its own files: train.FORMAT (the training pairs only), val.FORMAT and "
               "test.FORMAT, and train_uids.txt, val_uids.txt, test_uids.txt (sorted uids). Always "
               "written too: decisions.csv (every decision), run.json "
               "(settings, hashes, counts), the edited checkpoint when one exists, and index/ (the faiss "
               "index rebuilt for the exported pairs, dropped pairs gone). File paths are "
               "absolute: train with `--train-data OUT/train.csv --csv-separator , --csv-img-key filepath "
               "--csv-caption-key title`.")
    if st.button("Export", key="export_go", type="primary", disabled=not formats):
        result = export_run(ctx.run, out_dir, view_rows=view_rows if mode == "view" else None,
                            formats=formats)
        st.session_state["export_result"] = result
    result = st.session_state.get("export_result")
    if result is None:
        return
    counts = result.counts
    st.success(f"Exported {counts['kept']} pairs ({counts['dropped']} dropped left out, "
               f"{counts['relabelled']} relabelled) to `{result.out_dir}`")
    for name, path in result.files.items():
        left, right = st.columns([4, 1])
        left.code(str(path), language=None)
        # Large files (a checkpoint, a huge manifest) and the index folder stay on disk: the path
        # above is the way.
        if path.is_file() and path.stat().st_size <= DOWNLOAD_LIMIT_BYTES:
            right.download_button(f"Download {name}", path.read_bytes(), file_name=path.name,
                                  key=f"download_{name}")
