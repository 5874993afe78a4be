"""How long the app's Review page takes to render a page of cards, as the run grows.

Renders the real app (``app/main.py``) with ``streamlit.testing`` on synthetic run folders of
500, 2,000 and 5,000 scored pairs (real PNG thumbnails, scores, embeddings, an empty decisions
database) and prints the server-side time of one rerun of the Review page (24 cards), median of
five, with the ratio to the 500-pair run.  The browser adds its own paint time on top (the
end-to-end test's screenshots show the same page).

    .venv/bin/python -m bench.review_page
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from bench.common import REPO, machine_info, machine_markdown, markdown_table

sys.path.insert(0, str(REPO / "tests"))  # the synthetic run builder the app's tests use
from app_fixtures import build_synthetic_run  # noqa: E402

SIZES = (500, 2000, 5000)
REPEATS = 5


def render_seconds(run_dir: Path) -> tuple[float, float]:
    """(first render, median of REPEATS reruns) of the Review page, in seconds."""
    app = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=120)
    app.query_params["run"] = str(run_dir)
    started = time.perf_counter()
    app.run()
    first = time.perf_counter() - started
    if app.exception:
        raise RuntimeError(app.exception)
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        app.run()
        times.append(time.perf_counter() - started)
    return first, statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ECIF_CACHE"] = str(Path(folder) / "cache")
        rows, baseline = [], None
        for size in SIZES:
            run = build_synthetic_run(Path(folder) / f"run{size}", n_train=size, n_val=50)
            first, median = render_seconds(run.directory)
            baseline = baseline or median
            rows.append([f"{size:,}", f"{first:.2f}", f"{median:.3f}", f"{median / baseline:.2f}×"])
        print(machine_markdown(machine_info()))
        print(markdown_table(["pairs", "first render (s)", "rerun, median of 5 (s)", "vs 500 pairs"], rows))


if __name__ == "__main__":
    main()
