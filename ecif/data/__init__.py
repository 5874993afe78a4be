"""Data: demo datasets, manifest loading (whole or streamed) and validation, zero-shot classes, thumbnails."""

from ecif.data.classes import ZeroShotClasses
from ecif.data.demo import make_demo_data
from ecif.data.images import open_image
from ecif.data.manifest import (
    LoadedManifest,
    ManifestChunk,
    ManifestError,
    bad_rows_report,
    iter_manifest_chunks,
    load_manifest,
    write_manifest_subset,
)
from ecif.data.thumbnails import make_thumbnails, thumbnail_path

__all__ = [
    "LoadedManifest",
    "ManifestChunk",
    "ManifestError",
    "ZeroShotClasses",
    "bad_rows_report",
    "iter_manifest_chunks",
    "load_manifest",
    "make_demo_data",
    "make_thumbnails",
    "open_image",
    "thumbnail_path",
    "write_manifest_subset",
]
