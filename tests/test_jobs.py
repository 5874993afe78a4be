"""JobManager: progress file, one job per run, cancellation, failure, resume, interrupted jobs."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from ecif.config import RunConfig
from ecif.jobs.manager import JobManager, read_status
from ecif.progress import Reporter
from ecif.run import JOB_FILE, atomic_write_json

STAGES = ("data", "features", "scores")


class FakePipeline:
    """Stages of a few steps each, cached as marker files so a second run skips them (like the
    engine's stage cache); ``gate`` lets a test hold the job mid-stage."""

    def __init__(self, steps: int = 5, fail_at: str | None = None):
        self.steps = steps
        self.fail_at = fail_at
        self.gate = threading.Event()
        self.gate.set()
        self.computed: list[str] = []

    def __call__(self, config: RunConfig, reporter: Reporter) -> str:
        folder = Path(config.run_dir)
        for stage in STAGES:
            marker = folder / f"{stage}.done"
            if marker.exists():
                continue
            if stage == self.fail_at:
                raise RuntimeError(f"boom in {stage}")
            for _ in reporter.iterate(range(self.steps), stage):
                self.gate.wait(10)
            marker.write_text("ok")
            self.computed.append(stage)
        return "finished"


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_progress_file_and_result(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    manager = JobManager(pipeline, interval_s=0.0)
    job = manager.start(RunConfig(tmp_path))
    status = manager.wait(tmp_path, 10)
    assert job.result == "finished"
    assert status["state"] == "done" and status["stage"] == "scores"
    assert status["done"] == status["total"] == 5 and status["finished"] and status["started"]
    assert json.loads((tmp_path / JOB_FILE).read_text())["pid"] == os.getpid()


def test_second_start_returns_running_job_and_other_process_sees_it(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    pipeline.gate.clear()
    manager = JobManager(pipeline, interval_s=0.0)
    first = manager.start(RunConfig(tmp_path))
    assert manager.start(RunConfig(tmp_path)) is first
    wait_for(lambda: (read_status(tmp_path) or {}).get("stage") == "data")
    # A different manager (another session's view) reads the same state from disk.
    assert JobManager(pipeline).status(tmp_path)["state"] == "running"
    pipeline.gate.set()
    assert manager.wait(tmp_path, 10)["state"] == "done"


def test_cancel_then_resume_skips_cached_stages(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    manager = JobManager(pipeline, interval_s=0.0)
    pipeline.gate.clear()
    (tmp_path / "data.done").write_text("ok")  # "data" finished in an earlier run
    manager.start(RunConfig(tmp_path))
    wait_for(lambda: (read_status(tmp_path) or {}).get("stage") == "features")
    assert manager.cancel(tmp_path)
    pipeline.gate.set()
    status = manager.wait(tmp_path, 10)
    assert status["state"] == "cancelled" and status["stage"] == "features" and status["finished"]
    assert not manager.cancel(tmp_path)
    manager.start(RunConfig(tmp_path))
    assert manager.wait(tmp_path, 10)["state"] == "done"
    assert pipeline.computed == ["features", "scores"]  # data came from the cache, features redone


def test_failure_is_recorded(tmp_path: Path) -> None:
    manager = JobManager(FakePipeline(fail_at="features"), interval_s=0.0)
    manager.start(RunConfig(tmp_path))
    status = manager.wait(tmp_path, 10)
    assert status["state"] == "failed" and "boom in features" in status["error"]
    assert "RuntimeError" in status["traceback"]


def test_job_of_a_dead_process_is_interrupted(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / JOB_FILE, {"state": "running", "stage": "scores", "pid": 2**22 + 12345})
    assert read_status(tmp_path)["state"] == "interrupted"
    assert read_status(tmp_path / "nothing") is None


def test_throttled_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ecif.jobs.manager as manager_module

    writes: list[dict] = []
    real = manager_module.atomic_write_json
    monkeypatch.setattr(manager_module, "atomic_write_json",
                        lambda path, value: (writes.append(dict(value)), real(path, value)))
    manager = JobManager(FakePipeline(steps=200), interval_s=60.0)
    manager.start(RunConfig(tmp_path))
    assert manager.wait(tmp_path, 10)["state"] == "done"
    # start + (stage change + stage complete) per stage + finish, not one per step
    assert len(writes) <= 1 + 2 * len(STAGES) + 1


def test_app_command_and_default_run_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ecif.jobs.launch import app_command, app_script, run_dir_for

    monkeypatch.setenv("ECIF_CACHE", str(tmp_path))
    command = app_command(tmp_path / "run", tmp_path / "m.csv", port=9999)
    assert Path(command[command.index("run") + 1]) == app_script() and app_script().exists()
    for flag, value in (("--server.address", "127.0.0.1"), ("--server.port", "9999"),
                        ("--server.headless", "true"), ("--browser.gatherUsageStats", "false"),
                        ("--client.toolbarMode", "viewer")):  # no Deploy button in a local tool
        assert command[command.index(flag) + 1] == value
    assert command[command.index("--") + 1 :] == ["--run", str(tmp_path / "run"),
                                                  "--manifest", str(tmp_path / "m.csv")]
    assert run_dir_for() == tmp_path / "runs" / "demo"
    mine = run_dir_for(tmp_path / "m.csv")
    assert mine.parent == tmp_path / "runs" and mine.name.startswith("m-")
    assert run_dir_for(tmp_path / "m.csv", model="other") != mine


def test_a_job_records_its_config_and_is_resumed_with_it(tmp_path: Path) -> None:
    from dataclasses import replace

    from ecif.config import FinetuneConfig
    from ecif.jobs.launch import recorded_config
    from ecif.run import Run

    folder = tmp_path / "run"
    config = RunConfig(folder, manifest=tmp_path / "m.csv", trusted_split="trusted",
                       finetune=FinetuneConfig(delta=0.3, blocks=1))
    manager = JobManager(FakePipeline(), interval_s=0.0)
    manager.start(config)
    assert manager.wait(folder, 10)["state"] == "done"
    assert recorded_config(folder) == replace(config, run_dir=folder.resolve())  # from job.json
    Run(folder).update_info(settings=replace(config, model="other").settings())
    assert recorded_config(folder).model == "other"  # run.json, written by the pipeline, wins
    assert recorded_config(tmp_path / "new") == RunConfig(tmp_path / "new")  # nothing recorded: the demo
