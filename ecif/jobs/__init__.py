"""Background scoring jobs (progress on disk) and the app launcher."""

from ecif.jobs.launch import launch_app, recorded_config, run_dir_for
from ecif.jobs.manager import JobManager, read_status

__all__ = ["JobManager", "launch_app", "read_status", "recorded_config", "run_dir_for"]
