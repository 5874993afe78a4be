"""Data: the built-in demo datasets, manifest loading and validation, zero-shot classes, thumbnails."""

from ecif.data.classes import ZeroShotClasses
from ecif.data.demo import make_demo_data
from ecif.data.manifest import LoadedManifest, ManifestError, bad_rows_report, load_manifest
from ecif.data.thumbnails import make_thumbnails, thumbnail_path

__all__ = [
    "LoadedManifest",
    "ManifestError",
    "ZeroShotClasses",
    "bad_rows_report",
    "load_manifest",
    "make_demo_data",
    "make_thumbnails",
    "thumbnail_path",
]
