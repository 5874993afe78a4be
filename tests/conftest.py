"""Shared test set-up.

Caches (the trained demo model, backbone features) live in ``<repo>/.ecif-cache`` so that a
second local run is fast; CI starts from a fresh clone and trains once per session.  The scored
demo run that the pipeline, command-line, app and browser tests share is built once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("ECIF_CACHE", str(REPO / ".ecif-cache"))

pytest_plugins = ["fixtures_data"]

#: The shared small demo: large enough for a useful model and for the planted pairs to be found,
#: small enough that training + scoring fit the suite's budget on two cores.
DEMO_N = 3000


@pytest.fixture(scope="session")
def scored_demo_run(tmp_path_factory) -> Path:
    """A finished demo run (shapes, n=3000 as in the app demo, 10% random-caption noise) scored end to end."""
    from ecif.tasks.pipeline import DemoDataConfig, RunConfig, run_pipeline

    run_dir = Path(os.environ["ECIF_CACHE"]) / "test-runs" / f"shapes-{DEMO_N}"
    run_pipeline(RunConfig(run_dir=run_dir, demo=DemoDataConfig(n=DEMO_N)))
    return run_dir
