"""Thumbnails: one JPEG per manifest row, made once, resumable, and a placeholder for broken images."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fixtures_data import write_bad_manifest, write_png
from PIL import Image

from ecif.data import load_manifest, make_thumbnails, thumbnail_path
from ecif.progress import Cancelled, Reporter
from ecif.run import MANIFEST_FILE, Run, atomic_write_parquet


def _run_with_rows(tmp_path: Path) -> Run:
    """A run whose manifest has 4 good images, then one wide image, then one that is broken on disk."""
    loaded = load_manifest(write_bad_manifest(tmp_path / "data").path)
    wide = write_png(tmp_path / "data" / "wide.png", size=(40, 20))
    broken = tmp_path / "data" / "later_broken.png"
    write_png(broken)
    frame = loaded.frame.copy()
    frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "uid": "wide", "filepath": str(wide)}
    frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "uid": "broken", "filepath": str(broken)}
    run = Run(tmp_path / "run")
    atomic_write_parquet(run.path(MANIFEST_FILE), frame)
    broken.write_bytes(b"garbage")  # the image went bad after the manifest was checked
    return run


def test_every_row_gets_a_thumbnail_once(tmp_path: Path) -> None:
    run = _run_with_rows(tmp_path)
    assert make_thumbnails(run, size=128) == 6
    for row in range(6):
        with Image.open(thumbnail_path(run, row)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 128
    with Image.open(thumbnail_path(run, 4)) as wide:
        assert wide.size == (128, 64)  # aspect ratio kept
    with Image.open(thumbnail_path(run, 5)) as placeholder:
        assert placeholder.size == (128, 128)

    assert make_thumbnails(run) == 0  # all made: nothing redone
    thumbnail_path(run, 2).unlink()
    thumbnail_path(run, 3).write_bytes(b"")  # e.g. left empty by a power failure
    assert make_thumbnails(run) == 2


def test_cancel_then_resume(tmp_path: Path) -> None:
    run = _run_with_rows(tmp_path)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        make_thumbnails(run, reporter=Reporter(cancel_event=cancel))
    assert not list(run.path("thumbs").glob(".*"))  # no temporary files left behind
    made_before = len(list(run.path("thumbs").glob("*.jpg")))
    assert made_before + make_thumbnails(run) == 6
