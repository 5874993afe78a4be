"""What every command prints: progress bars on stderr, text or ``--json`` on stdout, and tables."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecif.progress import Reporter


class _Bars:
    """One tqdm bar per stage, for ``Reporter.callback`` (stderr, so ``--json`` stays clean)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total or None, desc=stage, leave=False, file=sys.stderr)
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _reporter(args: argparse.Namespace) -> Reporter:
    return Reporter(callback=_Bars(quiet=getattr(args, "json", False)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, pd.DataFrame):
        return [_jsonable(record) for record in value.to_dict(orient="records")]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(_jsonable(payload), indent=2))
    else:
        print(text)


def _table(frame: pd.DataFrame, columns: list[str] | None = None, limit: int = 20) -> str:
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.4g}".format):
        return frame.head(limit).to_string(index=False)


def _name_unconverged(run) -> None:
    """Say on stderr, before any score, that the run's heads are not a well-conditioned minimiser."""
    warning = run.unconverged_warning()
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
