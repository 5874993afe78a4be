"""Helpers for the browser tests: start/stop the real Streamlit server, launch headless Chromium,
wait for Streamlit to settle, and take screenshots into ``<repo>/test-artifacts``.

The server is started exactly as ``ecif app`` starts it (:func:`ecif.jobs.launch.app_command`), but
as a child process, so a test can SIGKILL it and start it again on the same run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ecif.jobs.launch import app_command

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("ECIF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
#: First render of a page (imports, parquet reads, faiss index, thumbnails) on a busy 2-core box.
FIRST_RENDER_MS = 90_000
#: Anything after that: a button callback and the rerun it causes.
ACTION_MS = 45_000


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class AppServer:
    """One ``streamlit run app/main.py -- --run DIR`` child process."""

    run_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    _log: object | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    def command(self) -> list[str]:
        return app_command(self.run_dir, port=self.port)

    def start(self, timeout_s: float = 90.0) -> AppServer:
        """Start the server and wait until its health endpoint answers."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n==== start {' '.join(self.command())}\n".encode())
        self._log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # app_command runs `python -m streamlit` directly: the child *is* the server process.
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"app server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"app server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server process itself and reap it."""
        assert self.process is not None
        os.kill(self.process.pid, sig)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server if it still runs (SIGTERM, then SIGKILL); safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (the system one; nothing is downloaded), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


# ------------------------------------------------------------------------------- page helpers
def button(page, key: str):
    """The button of the Streamlit widget with ``key`` (rendered in ``.st-key-<key>``).

    ``:visible`` because a button with a ``help`` tooltip is rendered twice, once hidden.
    """
    return page.locator(f".st-key-{key} button:visible")


def wait_idle(page, timeout_ms: int = ACTION_MS) -> None:
    """Wait until the script run that the last interaction started has finished.

    Streamlit marks stale elements while a rerun is in flight and shows its status widget; both go
    away when the run ends.
    """
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
                 && !document.querySelector('[data-stale="true"]')""",
        timeout=timeout_ms,
    )


def click(page, key: str, timeout_ms: int = ACTION_MS) -> None:
    """Click the button with ``key`` once it is enabled, then wait for the rerun."""
    target = button(page, key)
    target.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function(
        "(sel) => { const b = document.querySelector(sel); return b && !b.disabled; }",
        arg=f".st-key-{key} button", timeout=timeout_ms)
    target.click()
    wait_idle(page, timeout_ms)


def hide_transients(page) -> None:
    """Hide toasts and the deploy/menu chrome so screenshots show the app only."""
    page.add_style_tag(content="""
        [data-testid="stToastContainer"], [data-testid="stStatusWidget"],
        [data-testid="stAppDeployButton"] { visibility: hidden !important; }""")


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save ``test-artifacts/<name>``; full page means the whole scrolled main area.

    Streamlit scrolls inside its own container, not the document, so Playwright's ``full_page``
    alone shows just the viewport: grow the viewport to the content height for the shot.
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    hide_transients(page)
    size = page.viewport_size or {"width": 1400, "height": 1000}
    if full_page:
        height = page.evaluate("""() => Math.max(document.documentElement.scrollHeight,
            ...Array.from(document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"], section'))
               .map(e => e.scrollHeight))""")
        page.set_viewport_size({"width": size["width"], "height": min(max(int(height), size["height"]), 8000)})
        wait_idle(page)
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
    return path
