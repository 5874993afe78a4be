"""Thread-pool map with progress and cancellation, for per-image work (checking, thumbnailing)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ecif.progress import Reporter

T = TypeVar("T")
R = TypeVar("R")

# Bounds the number of queued futures, so a million-row manifest does not hold a million of them.
_CHUNK = 2048


def default_workers() -> int:
    """Threads for image I/O: decoding and file access release the GIL, so use more than the cores."""
    return min(32, 4 * (os.cpu_count() or 1))


def threaded_map(
    function: Callable[[T], R],
    items: Sequence[T],
    reporter: Reporter,
    stage: str,
    workers: int | None = None,
) -> list[R]:
    """``[function(item) for item in items]`` computed in threads, in order, one progress step per item.

    A cancel raised by ``reporter`` drops the queued work and waits only for the running items.
    """
    executor = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="ecif-data")

    def results() -> Iterator[R]:
        for start in range(0, len(items), _CHUNK):
            yield from executor.map(function, items[start : start + _CHUNK])

    try:
        return list(reporter.iterate(results(), stage, total=len(items)))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
