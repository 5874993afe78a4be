"""A run folder: everything one scoring run produced, and the curator's decisions about it.

Layout (every file is written atomically, so a killed job never leaves a half-written artefact)::

    RUN/
      run.json                settings, model and manifest hashes, finished stages (reproduces the run)
      manifest.parquet        the valid manifest rows (canonical columns + extras), row order = ``row``
      bad_rows.parquet        rows the loader skipped: row, uid, filepath, reason (+ shard)
      classes.json            zero-shot classes and their prompts (when the data has labels)
      features.npz            backbone features: image [N, d_img], text [N, d_txt], prompts [K, d_txt]
      prompts.npz             backbone features of the zero-shot class prompts
      heads.safetensors       fine-tuned influence scope θ̂ and the starting heads θ₀
      finetune.json           convergence report of the fine-tuning (gradient norm, eigenvalue, ...)
      curvature.safetensors   the factorised curvature (dense Cholesky factor or EK-FAC factors)
      embeddings.npz          fine-tuned unit embeddings: image [N, e], text [N, e] (faiss, 2-D map)
      scores.parquet          one row per training pair: influence columns and baselines
      mispredictions.parquet  test/val items with zero-shot prediction (correct or not)
      index/                  faiss indexes, the row→uid map and index.json (settings, source)
      thumbs/                 thumbnails, made once
      decisions.sqlite        the curator's decisions (WAL; survives a killed server)
      edited/                 the closed-form edited checkpoint (model.safetensors) and edit.json
      exports/<UTC time>/     the app's default export folders (``Run.export_dir``)
      job.json                progress of the background job that fills this folder
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.parquet"
BAD_ROWS_FILE = "bad_rows.parquet"
CLASSES_FILE = "classes.json"
FEATURES_FILE = "features.npz"
HEADS_FILE = "heads.safetensors"
FINETUNE_FILE = "finetune.json"
EMBEDDINGS_FILE = "embeddings.npz"
SCORES_FILE = "scores.parquet"
MISPREDICTIONS_FILE = "mispredictions.parquet"
INDEX_DIR = "index"
#: Written last by every build of ``index/`` (:mod:`ecif.index.neighbours`), so its time names the
#: finished build.
INDEX_META_FILE = f"{INDEX_DIR}/index.json"
THUMBS_DIR = "thumbs"
DECISIONS_FILE = "decisions.sqlite"
JOB_FILE = "job.json"
EXPORTS_DIR = "exports"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably (fsync before the rename) and never half-written."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())

    atomic_write_with(path, write)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def atomic_write_with(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` then rename onto ``path``: readers see the old file or the new, never half of one.

    The temporary name is unique per process and thread (two writers of one regenerable file may
    race) and keeps ``path``'s suffix (``np.savez`` appends ``.npz`` to a name without it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_with(path, lambda temporary: frame.to_parquet(temporary, index=False))


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


class Run:
    """Paths and cached artefacts of one run folder. Cheap to construct; loads lazily."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory).expanduser().resolve()

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def info(self) -> dict[str, Any]:
        """Contents of ``run.json`` (empty dict before the run starts)."""
        return read_json(self.path(RUN_FILE), {})

    def update_info(self, **fields: Any) -> dict[str, Any]:
        info = self.info
        info.update(fields)
        atomic_write_json(self.path(RUN_FILE), info)
        return info

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def mtime(self, name: str) -> float:
        """When ``name`` was last written (0.0 while it is missing): a cache key for its contents."""
        path = self.path(name)
        return path.stat().st_mtime if path.exists() else 0.0

    @property
    def is_scored(self) -> bool:
        return self.has(SCORES_FILE)

    @property
    def is_run_folder(self) -> bool:
        """Whether a run was started here (it has a ``run.json``) or left its scores."""
        return self.has(RUN_FILE) or self.is_scored

    def export_dir(self, when: datetime | None = None) -> Path:
        """A new export folder, ``RUN/exports/<UTC time, YYYYmmdd-HHMMSS>`` (default: now)."""
        return self.path(EXPORTS_DIR) / (when or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")

    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.path(MANIFEST_FILE))

    def bad_rows(self) -> pd.DataFrame:
        if not self.has(BAD_ROWS_FILE):
            return pd.DataFrame(columns=["row", "uid", "filepath", "reason"])
        return pd.read_parquet(self.path(BAD_ROWS_FILE))

    def scores(self) -> pd.DataFrame:
        return pd.read_parquet(self.path(SCORES_FILE))

    def mispredictions(self) -> pd.DataFrame:
        return pd.read_parquet(self.path(MISPREDICTIONS_FILE))

    def finetune_report(self) -> dict[str, Any] | None:
        """The fine-tuning report (``finetune.json``) with the chosen ``δ`` and its sweep, or ``None``.

        ``converged`` False means the heads are not a well-conditioned minimiser and every score
        of the run is unreliable; ``warnings`` says why, one sentence each.
        """
        report = read_json(self.path(FINETUNE_FILE))
        if report is None:
            return None
        selection = self.info.get("stages", {}).get("fine-tune", {}).get("delta_selection")
        return {**report, "delta_selection": selection}

    def unconverged_warning(self) -> str | None:
        """One sentence to show before any score when the fine-tuned heads are not a well-conditioned
        minimiser (every score is then unreliable), or ``None``."""
        report = self.finetune_report()
        if report is None or report.get("converged", True):
            return None
        return ("the fine-tuned heads are not a well-conditioned minimum, so every influence score of this run is "
                "unreliable: " + " ".join(report.get("warnings", [])))

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r})"
