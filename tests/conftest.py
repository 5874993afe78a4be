"""Shared test set-up.

Caches (backbone features, demo models trained for other seeds) live in ``<repo>/.ecif-cache`` so
that a second local run is fast.  The scored demo run that the pipeline, command-line, app and
browser tests share is built once per session, with the demo model shipped in ``assets/``.

Two environment variables re-run the suite in another regime, so that every threshold taken from
a trained model can be checked for its margin:

- ``ECIF_DEMO_SEED`` (default 0): the shared demo's data and model seed.  Any seed but 0 trains its
  own demo model first (about six minutes on two cores, then cached).
- ``ECIF_TORCH_THREADS``: torch's thread count for the whole session (default: torch's own).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("ECIF_CACHE", str(REPO / ".ecif-cache"))
DEMO_SEED = int(os.environ.get("ECIF_DEMO_SEED", "0"))
if os.environ.get("ECIF_TORCH_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["ECIF_TORCH_THREADS"]))

pytest_plugins = ["fixtures_data"]

#: The shared small demo: large enough for a useful model and for the planted pairs to be found,
#: small enough that training + scoring fit the suite's budget on two cores.
DEMO_N = 3000


@pytest.fixture(scope="session")
def demo_seed() -> int:
    """The shared demo's seed (``ECIF_DEMO_SEED``; 0, the app's demo, by default)."""
    return DEMO_SEED


@pytest.fixture(scope="session")
def scored_demo_run(tmp_path_factory) -> Path:
    """A finished demo run (shapes, n=3000 as in the app demo, 10% random-caption noise) scored end to end."""
    from ecif.config import DemoDataConfig, RunConfig
    from ecif.tasks.pipeline import run_pipeline

    name = f"shapes-{DEMO_N}" + (f"-seed{DEMO_SEED}" if DEMO_SEED else "")
    run_dir = Path(os.environ["ECIF_CACHE"]) / "test-runs" / name
    run_pipeline(RunConfig(run_dir=run_dir, demo=DemoDataConfig(n=DEMO_N, seed=DEMO_SEED)))
    return run_dir
