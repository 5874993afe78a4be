"""Thumbnails for the review grid.

The pipeline's "thumbnails" stage (:func:`ecif.data.thumbnails.make_thumbnails`) writes
``RUN/thumbs/<row>.jpg`` for every pair ahead of time.  The grid reads those, and makes a missing
one on first request at the same path, so it also works on a run whose thumbnail stage has not run
(yet) and never re-encodes an image per render.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from PIL import ImageOps

from ecif.data.images import open_image
from ecif.data.thumbnails import JPEG_QUALITY
from ecif.data.thumbnails import thumbnail_path as stage_thumbnail_path
from ecif.run import Run, atomic_write_with

THUMB_SIZE = 128  # the thumbnail stage's default, so both kinds look alike


def thumbnail_path(run: Run, row: int, filepath: str | Path) -> Path:
    """``RUN/thumbs/<row>.jpg`` for manifest ``row``, made from ``filepath`` if missing."""
    path = stage_thumbnail_path(run, int(row))
    if not path.exists():
        with open_image(filepath) as image:
            small = ImageOps.contain(image.convert("RGB"), (THUMB_SIZE, THUMB_SIZE))
        buffer = BytesIO()
        small.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        # A regenerable cache file: rename for atomicity, no fsync (it cost more than the encode).
        # Unique per thread (atomic_write_with): the pipeline's thumbnail stage may be writing the same file now.
        atomic_write_with(path, lambda temporary: temporary.write_bytes(buffer.getvalue()))
    return path
