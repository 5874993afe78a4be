"""Background scoring jobs for the app: one worker thread per run folder, progress on disk.

The app owns one :class:`JobManager` per server process (``st.cache_resource``), shared by every
browser session, so all its methods are thread-safe.  A worker never touches Streamlit: its
:class:`~ecif.progress.Reporter` callback writes ``RUN/job.json`` (atomically, throttled), and pages
poll that file.  Because the state is on disk, a reload, a second tab or a second server process
sees the same progress, and a job killed with its process is reported as ``interrupted``; starting
it again resumes from the pipeline's per-stage cache.

``job.json``: ``state`` (running | done | failed | cancelled | interrupted), ``stage``, ``done``,
``total``, ``error``, ``started``, ``finished``, ``updated`` (UTC ISO), ``pid``, and ``settings``
(``RunConfig.settings()`` of the job, so any process can resume it:
:func:`ecif.jobs.launch.recorded_config`).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecif.config import RunConfig
from ecif.progress import Cancelled, Reporter
from ecif.run import JOB_FILE, atomic_write_json, read_json

Pipeline = Callable[[RunConfig, Reporter], Any]
FINISHED_STATES = ("done", "failed", "cancelled", "interrupted")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_pipeline(config: RunConfig, reporter: Reporter) -> Any:
    """``ecif.tasks.pipeline.run_pipeline`` (imported on first use: the engine loads torch and open_clip)."""
    from ecif.tasks.pipeline import run_pipeline

    return run_pipeline(config, reporter)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The job state of ``run_dir`` from ``job.json`` (None when no job ever ran there).

    A ``running`` job whose process is gone is reported as ``interrupted``.
    """
    status = read_json(Path(run_dir) / JOB_FILE)
    if status and status.get("state") == "running" and not _pid_alive(int(status.get("pid", -1))):
        status["state"] = "interrupted"
    return status


@dataclass
class Job:
    """One background run: its folder, configuration, worker thread and cancel switch."""

    run_dir: Path
    config: RunConfig
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    result: Any = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class _ProgressFile:
    """Writes ``job.json``: every stage change and finish at once, other updates at most every
    ``interval_s`` (a fast loop must not spend its time rewriting a file)."""

    def __init__(self, path: Path, interval_s: float, settings: dict[str, Any]):
        self.path = path
        self.interval_s = interval_s
        self.status: dict[str, Any] = {
            "state": "running", "stage": "start", "done": 0, "total": 0, "error": None,
            "started": _now(), "finished": None, "pid": os.getpid(), "settings": settings,
        }
        self._last_write = 0.0
        self._write()

    def _write(self) -> None:
        self.status["updated"] = _now()
        atomic_write_json(self.path, self.status)
        self._last_write = time.monotonic()

    def progress(self, stage: str, done: int, total: int) -> None:
        new_stage = stage != self.status["stage"]
        self.status.update(stage=stage, done=int(done), total=int(total))
        if new_stage or (total and done >= total) or time.monotonic() - self._last_write >= self.interval_s:
            self._write()

    def finish(self, state: str, error: str | None = None) -> None:
        self.status.update(state=state, error=error, finished=_now())
        self._write()


class JobManager:
    """Starts, cancels and reports background pipeline runs (one live job per run folder)."""

    def __init__(self, pipeline: Pipeline = default_pipeline, interval_s: float = 0.5):
        self._pipeline = pipeline
        self._interval_s = interval_s
        self._jobs: dict[Path, Job] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(run_dir: str | Path) -> Path:
        return Path(run_dir).expanduser().resolve()

    def start(self, config: RunConfig) -> Job:
        """Run ``pipeline(config, reporter)`` for ``config.run_dir`` (made absolute) in a worker thread.

        If a job for this folder is already running, that job is returned and nothing new starts.
        A finished run is started again cheaply: the pipeline skips every cached stage.
        ``config.settings()`` is recorded in ``job.json`` so the job can be resumed later.
        """
        key = self._key(config.run_dir)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.alive:
                return job
            job = Job(run_dir=key, config=replace(config, run_dir=key))
            key.mkdir(parents=True, exist_ok=True)
            progress = _ProgressFile(key / JOB_FILE, self._interval_s, job.config.settings())
            job.thread = threading.Thread(target=self._work, args=(job, progress),
                                          name=f"ecif-job-{key.name}", daemon=True)
            self._jobs[key] = job
            job.thread.start()
            return job

    def _work(self, job: Job, progress: _ProgressFile) -> None:
        reporter = Reporter(callback=progress.progress, cancel_event=job.cancel_event)
        try:
            job.result = self._pipeline(job.config, reporter)
        except Cancelled:
            progress.finish("cancelled")
        except BaseException as error:  # the worker must record every failure, not die silently
            progress.status["traceback"] = traceback.format_exc(limit=8)
            progress.finish("failed", f"{type(error).__name__}: {error}")
        else:
            progress.finish("done")

    def job(self, run_dir: str | Path) -> Job | None:
        """The job this process started for ``run_dir`` (None if none)."""
        with self._lock:
            return self._jobs.get(self._key(run_dir))

    def cancel(self, run_dir: str | Path) -> bool:
        """Ask the running job of ``run_dir`` to stop at its next step; False if none is running."""
        job = self.job(run_dir)
        if job is None or not job.alive:
            return False
        job.cancel_event.set()
        return True

    def status(self, run_dir: str | Path) -> dict[str, Any] | None:
        """Progress of ``run_dir`` as recorded on disk (see :func:`read_status`)."""
        return read_status(self._key(run_dir))

    def wait(self, run_dir: str | Path, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Block until this process's job for ``run_dir`` ends (for the CLI and tests)."""
        job = self.job(run_dir)
        if job is not None and job.thread is not None:
            job.thread.join(timeout_s)
        return self.status(run_dir)
