"""Progress reporting and cancellation shared by the command line, the app's background jobs and the library.

Every long loop in ecif takes an optional :class:`Reporter`.  It prints a tqdm bar on the command
line, forwards ``(stage, done, total)`` to a callback (the app's job manager writes it to disk) and
raises :class:`Cancelled` at the next step once its cancel event is set, so a job stops cleanly
between two cached units of work and resumes from the cache next time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``callback(stage, done, total)``; ``total`` is 0 when unknown."""


class Cancelled(RuntimeError):
    """Raised inside a long job when its cancel event is set."""


@dataclass
class Reporter:
    """Where a long job reports progress and learns that it must stop.

    ``show_bar`` prints a tqdm bar to stderr (the command line); ``callback`` receives every update
    (the app); ``cancel_event`` stops the job at its next step.
    """

    callback: ProgressCallback | None = None
    cancel_event: threading.Event | None = None
    show_bar: bool = False
    _stage: str = field(default="", init=False)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job has been asked to stop."""
        if self.cancel_event is not None and self.cancel_event.is_set():
            raise Cancelled(f"cancelled during {self._stage or 'start-up'}")

    def report(self, stage: str, done: int, total: int = 0) -> None:
        self._stage = stage
        if self.callback is not None:
            self.callback(stage, done, total)
        self.check()

    def iterate(self, items: Iterable[T], stage: str, total: int | None = None) -> Iterator[T]:
        """Yield ``items`` while reporting one step per item under ``stage``."""
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = 0
        bar = None
        if self.show_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total or None, desc=stage, leave=False)
        self.report(stage, 0, total)
        try:
            for done, item in enumerate(items, start=1):
                yield item
                if bar is not None:
                    bar.update(1)
                self.report(stage, done, total)
        finally:
            if bar is not None:
                bar.close()


def as_reporter(reporter: Reporter | None) -> Reporter:
    """The given reporter, or a silent one that never cancels."""
    return reporter if reporter is not None else Reporter()
