"""Thumbnails for the app's grid, made once per run: ``RUN/thumbs/<row>.jpg``.

``row`` is the position in ``RUN/manifest.parquet``.  Existing thumbnails are kept, so an
interrupted job resumes where it stopped.  Each file is written through a temporary file and a
rename, so a killed job never leaves a truncated thumbnail that would be skipped next time; unlike
:func:`ecif.run.atomic_write_bytes` there is no fsync (syncing each small file took longer than
making it), and an empty file left by a power failure is remade.  An image that cannot be read gets
a placeholder thumbnail instead of stopping the job.
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from ecif.data._parallel import threaded_map
from ecif.data.images import open_image
from ecif.progress import Reporter, as_reporter
from ecif.run import THUMBS_DIR, Run, atomic_write_with

JPEG_QUALITY = 85


def thumbnail_path(run: Run, row: int) -> Path:
    """Where the thumbnail of manifest row ``row`` lives (whether or not it exists yet)."""
    return run.path(THUMBS_DIR) / f"{row}.jpg"


@cache
def _placeholder(size: int) -> bytes:
    """JPEG bytes of a grey square with a red cross: 'this image could not be read'."""
    image = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    margin, width = size // 4, max(2, size // 16)
    draw.line((margin, margin, size - margin, size - margin), fill=(200, 40, 40), width=width)
    draw.line((margin, size - margin, size - margin, margin), fill=(200, 40, 40), width=width)
    return _jpeg(image)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _thumbnail_bytes(filepath: str, size: int) -> bytes:
    """The image scaled to fit a ``size`` x ``size`` box (aspect kept, small images enlarged)."""
    try:
        with open_image(filepath) as opened:
            opened.draft(None, (size, size))  # JPEG: decode at reduced scale, much faster for photos
            image: Image.Image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "P", "PA"):
                # Transparent areas on white, as a browser would show them.
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (255, 255, 255))
                image.paste(rgba, mask=rgba.getchannel("A"))
            return _jpeg(ImageOps.contain(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC))
    except Exception:  # PIL signals corrupt data with many exception types
        return _placeholder(size)


def _is_made(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def make_thumbnails(run: Run, reporter: Reporter | None = None, size: int = 128) -> int:
    """Write the missing thumbnails of every row of ``run.manifest()`` (``size`` in pixels, the
    longer side); return how many were written.  Progress is reported under ``"thumbnails"``."""
    frame = run.manifest()
    run.path(THUMBS_DIR).mkdir(parents=True, exist_ok=True)
    missing = [
        (row, filepath)
        for row, filepath in enumerate(frame["filepath"])
        if not _is_made(thumbnail_path(run, row))
    ]

    def write(item: tuple[int, str]) -> None:
        row, filepath = item
        data = _thumbnail_bytes(filepath, size)
        atomic_write_with(thumbnail_path(run, row), lambda temporary: temporary.write_bytes(data))

    threaded_map(write, missing, as_reporter(reporter), "thumbnails")
    return len(missing)
