"""Open the image a manifest ``filepath`` names: a file on disk, or a member of a tar shard.

img2dataset's webdataset output keeps the images inside ``NNNNN.tar`` shards.  Such an image is
named ``<absolute path of the tar>::<member name>``, e.g. ``/data/laion/00000.tar::000000012.jpg``
(see :func:`member_reference`); every reader of images (manifest checks, features, thumbnails)
opens it through :func:`open_image`, so the shards are never unpacked to disk.
"""

from __future__ import annotations

import io
import os
import tarfile
from functools import lru_cache
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MEMBER_SEPARATOR = "::"
"""Separates a tar shard's path from the member name in a ``filepath``."""
TAR_SUFFIX = ".tar"


def member_reference(archive: str | os.PathLike[str], member: str) -> str:
    """The ``filepath`` of ``member`` inside the tar file ``archive``."""
    return f"{os.fspath(archive)}{MEMBER_SEPARATOR}{member}"


def split_member_reference(filepath: str) -> tuple[str, str] | None:
    """``(tar path, member name)`` if ``filepath`` names a tar member, else None.

    Only a left part ending in ``.tar`` counts, so an ordinary file name containing ``::`` still
    reads as a file.
    """
    archive, separator, member = filepath.partition(MEMBER_SEPARATOR)
    if separator and member and archive.lower().endswith(TAR_SUFFIX):
        return archive, member
    return None


@lru_cache(maxsize=32)
def _tar_index(archive: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """Member name -> (byte offset of its data, size in bytes) of the regular files in ``archive``.

    Keyed by the tar's size and modification time too, so a rewritten shard is indexed again.
    Reading a member then costs one seek instead of a scan of the tar's headers.
    """
    with tarfile.open(archive) as tar:
        return {info.name: (info.offset_data, info.size) for info in tar if info.isfile()}


def read_member(archive: str, member: str) -> bytes:
    """The bytes of ``member`` in the tar ``archive``; FileNotFoundError if either is missing."""
    stat = os.stat(archive)
    try:
        offset, size = _tar_index(archive, stat.st_size, stat.st_mtime_ns)[member]
    except KeyError:
        raise FileNotFoundError(f"{archive} has no member {member!r}") from None
    with open(archive, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def open_image(filepath: str | os.PathLike[str]) -> Image.Image:
    """``PIL.Image.open`` of a file or of a tar member reference (use it in a ``with`` block)."""
    reference = split_member_reference(os.fspath(filepath))
    if reference is None:
        return Image.open(filepath)
    return Image.open(io.BytesIO(read_member(*reference)))


def image_exists(filepath: str) -> bool:
    """Whether the file, or the tar member, is there (without decoding it)."""
    reference = split_member_reference(filepath)
    if reference is None:
        return os.path.isfile(filepath)
    archive, member = reference
    try:
        stat = os.stat(archive)
        return member in _tar_index(archive, stat.st_size, stat.st_mtime_ns)
    except (OSError, tarfile.TarError):
        return False


def image_problem(filepath: str | None, decode: bool) -> str | None:
    """Why the image cannot be used, or None.  ``decode`` opens and verifies it with PIL."""
    if filepath is None:
        return "no image path"
    if "://" in filepath:
        return "not a local file (download the images first, e.g. with img2dataset)"
    if not image_exists(filepath):
        return "missing file"
    if decode:
        try:
            with open_image(filepath) as image:
                image.verify()
        except Exception as error:  # PIL signals corrupt data with many exception types
            return f"undecodable image: {type(error).__name__}: {error}"
    return None


def image_signature(filepath: str) -> str:
    """``size\\x1emtime_ns`` of the file holding the image (the tar, for a member), or ``missing``.

    Cache keys use it as a cheap stand-in for the image's content.
    """
    reference = split_member_reference(filepath)
    try:
        stat = os.stat(reference[0] if reference else filepath)
    except OSError:
        return "missing"
    return f"{stat.st_size}\x1e{stat.st_mtime_ns}"


def resolve_image_path(base: Path, filepath: str) -> str:
    """``filepath`` made absolute against ``base`` (for a tar member: the tar's path only)."""
    reference = split_member_reference(filepath)
    archive, member = reference if reference else (filepath, None)
    absolute = os.path.abspath(os.path.join(base, os.path.expanduser(archive)))
    return absolute if member is None else member_reference(absolute, member)
