"""``pip install .`` gives a working ``ecif app``: the wheel carries the app and the data files.

The wheel is built (offline, ``--no-build-isolation``) from a copy of the checkout and installed
with ``--no-deps`` into a fresh virtual environment.  The dependencies come from this test's own
environment through a folder of links to its site-packages that leaves out the editable install of
ecif (its ``__editable__*`` finder and ``.pth``, ``ecif-*.dist-info``), so whatever ecif the fresh
environment imports can only come from the wheel (checked).  Everything runs outside the
repository, with ``$ECIF_CACHE`` in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: Not copied into the build's source tree when git cannot list the checkout's files.
SKIP_DIRS = {".git", ".venv", ".ecif-cache", ".pytest_cache", "build", "dist", "runs", "tmp",
             "test-artifacts", "__pycache__"}
#: Data files planted in the copy's assets/models/ (never in the repository) to check the rule.
PROBES = ("models/_packaging_probe.json", "models/_packaging_probe.safetensors")
HEALTH_TIMEOUT_S = 60


def copy_checkout(destination: Path) -> None:
    """The checkout's files as ``pip install .`` sees them: tracked and untracked but not ignored."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=REPO, capture_output=True, check=True, timeout=30).stdout
        names = [name for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        names = None
    if names is None:
        shutil.copytree(REPO, destination, ignore=lambda _, entries: [
            e for e in entries if e in SKIP_DIRS or e.endswith(".egg-info")])
        return
    for name in names:
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the source tree it was built from)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    copy_checkout(source)
    for probe in PROBES:
        (source / "assets" / probe).parent.mkdir(parents=True, exist_ok=True)
        (source / "assets" / probe).write_text("{}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   cwd=root, check=True, timeout=300)
    (wheel,) = (root / "dist").glob("ecif-*.whl")
    return wheel, source


def outer_site_packages_without_ecif(destination: Path) -> Path:
    """A folder of links to this environment's installed distributions, less its editable ecif."""
    destination.mkdir()
    folders = dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib"))
    for folder in folders:
        for entry in folder.iterdir():
            name = entry.name
            if (name.startswith("__editable__") or name.endswith(".pth") or name == "__pycache__"
                    or name in ("ecif", "ecif_app") or name.startswith(("ecif-", "ecif.egg"))
                    or (destination / name).exists()):
                continue
            (destination / name).symlink_to(entry, target_is_directory=entry.is_dir())
    return destination


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; returns its folder."""
    wheel, _ = built
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    shared = outer_site_packages_without_ecif(root / "shared-site-packages")
    # A path line in a .pth only extends sys.path (after the venv's own site-packages); .pth files
    # inside that folder are not processed, and the editable ones are not even linked.
    Path(purelib, "_ecif_test_shared_deps.pth").write_text(f"{shared}\n")
    return env_dir


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(ECIF_CACHE=str(tmp / "cache"), PYTHONNOUSERSITE="1", HOME=str(tmp / "home"))
    (tmp / "home").mkdir(exist_ok=True)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_wheel_ships_the_app_and_the_data_files(built) -> None:
    wheel, source = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ecif_app/main.py" in names
    views = {f"ecif_app/views/{p.name}" for p in (REPO / "app" / "views").glob("*.py")}
    assert "ecif_app/views/__init__.py" in views and "ecif_app/views/context.py" in views
    assert views <= names, sorted(views - names)
    # Every ecif package (discovered, not listed) and the architecture configs.
    packages = {f"{p.relative_to(source).as_posix()}" for p in (source / "ecif").rglob("__init__.py")}
    assert packages <= names, sorted(packages - names)
    configs = {f"ecif/models/configs/{p.name}" for p in (source / "ecif/models/configs").glob("*.json")}
    assert configs and configs <= names
    # Whatever is in assets/models (the shipped demo model) goes in; the README's screenshot does not.
    shipped = {f"ecif/_assets/{p.relative_to(source / 'assets').as_posix()}"
               for pattern in ("*.safetensors", "*.json") for p in (source / "assets/models").glob(pattern)}
    assert {f"ecif/_assets/{probe}" for probe in PROBES} <= shipped <= names
    assert not any(name.endswith(".png") for name in names)
    assert not any(name.startswith(("app/", "views/", "assets/", "tests/", "bench/")) for name in names)


def test_installed_app_renders_from_the_wheel(venv, tmp_path) -> None:
    """ecif, the app and the assets are imported from the fresh environment, and the app's script
    (found by ``ecif.jobs.launch.app_script``) renders with its pages on an empty run."""
    script = textwrap.dedent(f"""
        import importlib.metadata, json, sys
        from pathlib import Path
        import ecif, ecif_app
        from ecif.jobs.launch import app_script
        from ecif.models.demo import shipped_demo_checkpoint, shipped_demo_record
        from ecif.paths import asset_path
        from streamlit.testing.v1 import AppTest

        at = AppTest.from_file(str(app_script()), default_timeout=90)
        at.query_params["run"] = {str(tmp_path / "run")!r}  # not the demo: no scoring starts
        at.run()
        print(json.dumps({{
            "ecif": ecif.__file__, "ecif_app": ecif_app.__file__, "script": str(app_script()),
            "views": sys.modules["views"].__file__,
            "dist": str(importlib.metadata.distribution("ecif").locate_file("")),
            "editable_finder": any("Editable" in repr(f) for f in sys.meta_path)
                               or any(p.name.startswith("__editable__") for d in sys.path
                                      if Path(d).is_dir() for p in Path(d).iterdir()),
            "probe": str(asset_path({PROBES[0]!r})), "probe_exists": asset_path({PROBES[0]!r}).is_file(),
            # The shipped demo model, found and checksum-verified inside the installed wheel.
            "shipped": str(shipped_demo_checkpoint(shipped_demo_record()["cache_key"])),
            "exceptions": [e.value for e in at.exception],
            "headers": [h.value for h in at.header],
        }}))
    """)
    (tmp_path / "work").mkdir()
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path / "work",
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("ecif", "ecif_app", "script", "views", "dist", "probe", "shipped"):
        assert Path(found[key]).resolve().is_relative_to(venv.resolve()), (key, found[key])
    assert Path(found["script"]).name == "main.py"
    assert not found["editable_finder"]
    assert found["probe_exists"]
    assert not found["exceptions"], found["exceptions"]
    assert found["headers"] == ["Review"]


def test_ecif_app_serves_from_the_wheel(venv, tmp_path) -> None:
    port = free_port()
    (tmp_path / "work").mkdir()
    log_path = tmp_path / "app.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(venv / "bin" / "ecif"), "app", "--port", str(port)],
                                  cwd=tmp_path / "work", env=clean_env(tmp_path), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, answer = time.monotonic() + HEALTH_TIMEOUT_S, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                    answer = reply.read().decode().strip()
                if answer == "ok":
                    break
            except OSError:
                pass
            time.sleep(0.25)
        log_text = log_path.read_text(errors="replace")
        assert answer == "ok", f"no health answer (exit code {server.poll()}):\n{log_text[-4000:]}"
        cmdline = Path(f"/proc/{server.pid}/cmdline")  # `ecif app` execs `streamlit run SCRIPT`
        if cmdline.is_file():
            script = next(a for a in cmdline.read_text().split("\0") if a.endswith("main.py"))
            assert Path(script).resolve().is_relative_to(venv.resolve()), script
    finally:
        # The server and anything it started (a scoring job runs in its threads) share its group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
