"""Background scoring jobs (progress on disk) and the app launcher."""

from ecif.jobs.launch import launch_app
from ecif.jobs.manager import JobManager, read_status

__all__ = ["JobManager", "launch_app", "read_status"]
