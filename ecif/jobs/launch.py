"""Starting the Streamlit app (``ecif app``) and building the configuration of a background run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ecif.config import RunConfig
from ecif.jobs.manager import read_status
from ecif.paths import cache_dir, text_sha256
from ecif.run import Run
from ecif.tasks.pipeline import default_demo_run_dir

#: The import package of the app: the repository's ``app/`` folder, shipped in the wheel under this
#: name by ``pip install .`` and mapped onto the checkout by ``pip install -e .`` (see setup.py).
APP_PACKAGE = "ecif_app"


def app_script() -> Path:
    """The app's entry script, ``main.py`` of :data:`APP_PACKAGE`, found by import (in the installed
    wheel or, for an editable install, in the checkout's ``app/``); the script is not executed."""
    try:
        spec = importlib.util.find_spec(f"{APP_PACKAGE}.main")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin:
        raise RuntimeError(f"the ecif app (package {APP_PACKAGE!r}) is not installed: reinstall ecif "
                           "with `pip install .` (or `pip install -e .` in a checkout)")
    return Path(spec.origin).resolve()


def run_dir_for(manifest: str | Path | None = None, model: str | None = None,
                checkpoint: str | Path | None = None, blocks: int = 0) -> Path:
    """The default run folder: the demo's without a manifest, else
    ``cache_dir()/runs/<manifest stem>-<8 hex of manifest path, model and checkpoint>``; a run whose
    influence scope takes ``blocks`` > 0 transformer blocks gets its own folder (``…-blocks<N>``)."""
    if manifest is None:
        folder = default_demo_run_dir()
    else:
        resolved = Path(manifest).expanduser().resolve()
        key = text_sha256(str(resolved), model or "", str(checkpoint or ""))[:8]
        folder = cache_dir() / "runs" / f"{resolved.stem}-{key}"
    return folder.with_name(f"{folder.name}-blocks{int(blocks)}") if blocks else folder


def recorded_config(run_dir: str | Path) -> RunConfig:
    """The configuration to resume ``run_dir`` with: the settings its ``run.json`` recorded, else
    those of its last job (``job.json``); with neither, the defaults (the built-in demo)."""
    settings = (Run(run_dir).info.get("settings")
                or (read_status(run_dir) or {}).get("settings") or {})
    return RunConfig.from_settings(Path(run_dir), settings)


def app_command(run_dir: str | Path | None = None, manifest: str | Path | None = None,
                port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line for the app (arguments after ``--`` go to the app)."""
    command = [sys.executable, "-m", "streamlit", "run", str(app_script()),
               "--server.address", host, "--server.port", str(port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--client.toolbarMode", "viewer",  # a local tool: no Deploy button or developer menu
               # The grid sets its bound pagination widget through Session State on purpose
               # (keyboard paging, filters restarting at page 1).
               "--global.disableWidgetStateDuplicationWarning", "true", "--"]
    if run_dir is not None:
        command += ["--run", str(Path(run_dir).expanduser().resolve())]
    if manifest is not None:
        command += ["--manifest", str(Path(manifest).expanduser().resolve())]
    return command


def launch_app(run_dir: str | Path | None = None, manifest: str | Path | None = None,
               port: int = 8501, host: str = "127.0.0.1", wait: bool = True) -> subprocess.Popen:
    """Run the app on ``run_dir`` (default: :func:`run_dir_for` the manifest, i.e. the demo run
    without one); a run without results is scored in the background at once.

    ``wait=True`` (the CLI) replaces this process with the Streamlit server, so Ctrl-C and signals
    reach the server itself and no orphan is left behind; ``wait=False`` starts it as a child
    process and returns it (tests, notebooks).
    """
    if run_dir is None and manifest is not None:
        run_dir = run_dir_for(manifest)
    command = app_command(run_dir, manifest, port, host)
    print(f"ecif app: http://{host}:{port}", file=sys.stderr, flush=True)
    if not wait:
        return subprocess.Popen(command)
    os.execv(command[0], command)
