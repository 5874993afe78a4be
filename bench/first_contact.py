"""First contact: how long `make app` takes, on an empty cache, to show a scored Review page in Chromium.

What a new user does after `make install`: `make app`, open the page, wait.  The script starts
`make app` with a fresh, empty ``ECIF_CACHE`` (so nothing is reused: demo data, features,
fine-tuning, curvature, scores, index and thumbnails are all made), opens the page in headless
Chromium at 1400x1000, and times the first card of the ranked grid.  A screenshot is taken while
the stages and the progress bar show, and one of the scored page.  Then, on the run it made, it
compares the default solver (``auto`` = EK-FAC-preconditioned conjugate gradient) with the dense
reference it replaced: time, and Spearman of every influence column.

    .venv/bin/python -m bench.first_contact            # about 2 minutes
    .venv/bin/python -m bench.first_contact --no-solvers
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import REPO, argument_parser, machine_info, machine_markdown, markdown_table, publish, results_folder

CHROMIUM = os.environ.get("ECIF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
FIRST_CARD = "[class*='st-key-grid_open_']"
#: The issue's target for the first scored page on a 2-core machine.
TARGET_SECONDS = 90


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def time_first_scored_page(cache: Path, shots: Path, timeout_s: float) -> dict:
    """Start `make app` on an empty cache; seconds until the health check and the first scored card."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "ECIF_CACHE": str(cache)}
    log = open(cache.parent / "app.log", "wb")  # noqa: SIM115 - closed below
    started = time.perf_counter()
    server = subprocess.Popen(["make", "-s", "app", f"ARGS=--port {port}"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    result: dict = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            while True:  # the server answers once streamlit has started
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5_000)
                    break
                except Exception:
                    if server.poll() is not None or time.perf_counter() - started > timeout_s:
                        raise RuntimeError(f"the app did not start: {(cache.parent / 'app.log').read_text()[-2000:]}")
                    time.sleep(0.5)
            result["page_opened_s"] = time.perf_counter() - started
            page.get_by_text("Scoring").first.wait_for(timeout=60_000)
            time.sleep(3)
            page.screenshot(path=str(shots / "first_contact_progress.png"))
            page.locator(FIRST_CARD).first.wait_for(timeout=timeout_s * 1000)
            result["scored_page_s"] = time.perf_counter() - started
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "first_contact_scored.png"))
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    from ecif.tasks.pipeline import STAGES

    stages = json.loads((cache / "runs" / "demo" / "run.json").read_text())["stages"]
    result["stages"] = {name: stages[name].get("seconds") for name in STAGES if name in stages}
    return result


def solver_agreement(run_dir: Path) -> list[list]:
    """The run's solver (auto) against the dense reference: seconds, Spearman per influence column."""
    import numpy as np
    from scipy.stats import spearmanr

    from ecif.config import CurvatureConfig
    from ecif.curvature.solvers import build_solver
    from ecif.influence.scores import influence_on, self_influence
    from ecif.tasks.engine import load_engine
    from ecif.tasks.scoring import gradient_of

    engine = load_engine(run_dir)
    problem, theta = engine.problem, engine.theta
    gradient = gradient_of(engine.trusted_loss(), theta)
    columns = {}
    for name in ("dense", "auto"):
        started = time.perf_counter()
        solver = build_solver(problem, theta, CurvatureConfig(solver=name))
        influence = influence_on(problem, theta, solver, gradient)
        values = {"influence": np.asarray(influence.influence), "influence_first_order": np.asarray(influence.influence_first_order)}
        values["self_influence"] = np.asarray(self_influence(problem, theta, solver))
        values["self_influence_first_order"] = np.asarray(self_influence(problem, theta, solver, negative="first_order"))
        columns[name] = (time.perf_counter() - started, solver.name, values)
    dense_seconds, _, reference = columns["dense"]
    rows = []
    for name in ("dense", "auto"):
        seconds, solver_name, values = columns[name]
        rows.append([f"{name} ({solver_name})", f"{seconds:.1f}", f"{seconds / dense_seconds:.2f}×",
                     *(f"{spearmanr(values[c], reference[c])[0]:.4f}" for c in reference)])
    return rows


def main() -> None:
    parser = argument_parser(__doc__, __spec__.name)
    parser.add_argument("--no-solvers", action="store_true", help="skip the solver comparison")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        cache.mkdir()
        shots = results_folder(args.results)
        shots.mkdir(parents=True, exist_ok=True)
        timing = time_first_scored_page(cache, shots, args.timeout)
        machine = machine_info()
        verdict = "within" if timing["scored_page_s"] <= TARGET_SECONDS else "OVER"
        markdown = [
            "# First contact: `make app` on an empty cache to a scored Review page in Chromium",
            "",
            machine_markdown(machine),
            "",
            markdown_table(["step", "seconds"], [
                ["page opened (streamlit started)", f"{timing['page_opened_s']:.1f}"],
                ["first scored card shown", f"{timing['scored_page_s']:.1f}"],
            ]),
            "",
            f"Target {TARGET_SECONDS} s: {verdict}.",
            "",
            "Stages of the background job (run.json):",
            "",
            markdown_table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in timing["stages"].items()]),
        ]
        payload = {"machine": machine, **timing}
        if not args.no_solvers:
            os.environ["ECIF_CACHE"] = str(cache)
            rows = solver_agreement(cache / "runs" / "demo")
            payload["solvers"] = rows
            markdown += [
                "",
                "The default solver against the dense reference on this run (build and all four columns; "
                "Spearman of each column against the dense solver's):",
                "",
                markdown_table(["solver", "seconds", "vs dense", "influence", "influence_first_order",
                                "self_influence", "self_influence_first_order"], rows),
            ]
        publish("first_contact", payload, "\n".join(markdown), args.results)


if __name__ == "__main__":
    main()
