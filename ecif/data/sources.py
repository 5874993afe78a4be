"""Raw rows of manifests that may be larger than memory, read chunk by chunk.

Sharded sources (see :func:`find_shards`):

- parquet shards: a folder of ``*.parquet`` files, or a glob such as ``data/part-*.parquet``; each
  file is read in record batches (``pyarrow.parquet.ParquetFile.iter_batches``), never whole.
- webdataset tar shards as img2dataset writes them: ``NNNNN.tar`` holding ``KEY.jpg`` (any image
  extension) + ``KEY.txt`` (the caption) + optional ``KEY.json``, with img2dataset's
  ``NNNNN.parquet`` sidecar (``key``, ``caption``, ``status``, ``error_message``, ``url``, ...)
  beside it.  A folder holding ``*.tar`` files, or a glob such as ``shards/*.tar``.  One shard's
  listing is in memory at a time (img2dataset writes 10,000 samples per shard by default); the
  images stay in the tar and are named ``<tar path>::<member>`` (:mod:`ecif.data.images`).

Only the reading lives here; :mod:`ecif.data.manifest` canonicalises and validates the chunks.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow
import pyarrow.parquet as pq

from ecif.data.images import IMAGE_EXTENSIONS, TAR_SUFFIX, member_reference
from ecif.paths import file_sha256, text_sha256

PARQUET_SUFFIX = ".parquet"
SIDECAR_STATUS_OK = "success"
"""img2dataset's ``status`` of a sample that was downloaded (others: ``failed_to_download``, ...)."""
_SIDECAR_CONTROL_COLUMNS = ("key", "caption", "status", "error_message")
"""Sidecar columns that describe the download, not the sample (the rest are carried as extras)."""
_GLOB_CHARACTERS = frozenset("*?[")

ShardKind = Literal["parquet", "tar"]


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing, empty, unparseable, no image/caption column).

    The message is one line that starts with the file it is about; ``path`` is that file (or
    folder, or pattern) when the raiser knows it, else None.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)

    def __reduce__(self):  # keeps ``path`` across processes (Ray workers)
        return type(self), (str(self), self.path)


@dataclass
class RawChunk:
    """Consecutive input rows of one file, before validation.

    ``frame``: the input's columns as read.  ``base``: the folder relative image paths resolve
    against.  ``shard``: the shard's name relative to the source root (None for a one-file
    manifest).  ``problems``: per row, a reason it is unusable that was found while reading (a tar
    sample without an image, a failed download), or None for rows with none so far.
    """

    frame: pd.DataFrame
    base: Path
    shard: str | None = None
    problems: list[str | None] | None = None


@dataclass(frozen=True)
class ShardedSource:
    """The shard files of one data set, in read order (sorted by name)."""

    root: Path
    kind: ShardKind
    shards: tuple[Path, ...]

    def name(self, shard: Path) -> str:
        """The shard's name as reports show it: its path relative to ``root``."""
        return shard.relative_to(self.root).as_posix()

    def sha256(self) -> str:
        """Content hash of the data set.

        Parquet shards hold only text, so their bytes are hashed; a tar's size stands in for its
        images (hashing hundreds of MB per shard would make opening a data set as slow as
        decoding it), and its sidecar is hashed when present.
        """
        parts = []
        for shard in self.shards:
            if self.kind == "parquet":
                parts.append(f"{self.name(shard)}\t{file_sha256(shard)}")
            else:
                sidecar = shard.with_suffix(PARQUET_SUFFIX)
                sidecar_hash = file_sha256(sidecar) if sidecar.is_file() else "-"
                parts.append(f"{self.name(shard)}\t{shard.stat().st_size}\t{sidecar_hash}")
        return text_sha256(self.kind, *parts)

    def chunks(self, rows_per_chunk: int) -> Iterator[RawChunk]:
        """The rows shard by shard, at most ``rows_per_chunk`` per chunk (a chunk never spans shards)."""
        for shard in self.shards:
            name = self.name(shard)
            if self.kind == "parquet":
                for frame in parquet_batches(shard, rows_per_chunk):
                    yield RawChunk(frame, shard.parent, name)
                continue
            frame, problems = read_tar_shard(shard)
            for start in range(0, len(frame), rows_per_chunk):
                stop = start + rows_per_chunk
                yield RawChunk(frame.iloc[start:stop].reset_index(drop=True), shard.parent, name, problems[start:stop])


def _shard_kind(files: list[Path], described: str) -> ShardKind:
    suffixes = {file.suffix.lower() for file in files}
    if suffixes == {PARQUET_SUFFIX}:
        return "parquet"
    if suffixes == {TAR_SUFFIX}:
        return "tar"
    found = ", ".join(sorted(suffixes))
    raise ManifestError(f"{described}: shards must be all .parquet or all .tar files (found {found})", path=described)


def _is_img2dataset_files_layout(folder: Path, parquets: list[Path]) -> bool:
    """img2dataset's ``files`` output: each ``NNNNN.parquet`` sidecar has its images in ``NNNNN/``."""
    return all((folder / parquet.stem).is_dir() for parquet in parquets)


def find_shards(path: str | os.PathLike[str], table_stems: tuple[str, ...]) -> ShardedSource | None:
    """The sharded source ``path`` names, or None when it is an ordinary manifest.

    A glob (``*``, ``?``, ``[``) names its matching files.  A folder is sharded when it has no
    ``<stem>.*`` table for a stem in ``table_stems`` (those folders keep their own layout) and
    holds ``*.tar`` files, or ``*.parquet`` files that are not img2dataset ``files``-layout sidecars.
    """
    text = os.path.expanduser(os.fspath(path))
    if _GLOB_CHARACTERS & set(text):
        files = sorted(Path(match).resolve() for match in glob.glob(text) if os.path.isfile(match))
        if not files:
            raise ManifestError(f"{text}: no files match this pattern", path=text)
        root = Path(os.path.commonpath([file.parent for file in files]))
        return ShardedSource(root, _shard_kind(files, text), tuple(files))
    folder = Path(text).resolve()
    if not folder.is_dir() or any(next(folder.glob(f"{stem}.*"), None) for stem in table_stems):
        return None
    tars = sorted(file for file in folder.glob(f"*{TAR_SUFFIX}") if file.is_file())
    if tars:
        return ShardedSource(folder, "tar", tuple(tars))
    parquets = sorted(file for file in folder.glob(f"*{PARQUET_SUFFIX}") if file.is_file())
    if parquets and not _is_img2dataset_files_layout(folder, parquets):
        return ShardedSource(folder, "parquet", tuple(parquets))
    return None


def parquet_batches(path: Path, rows_per_chunk: int) -> Iterator[pd.DataFrame]:
    """The rows of one parquet file, at most ``rows_per_chunk`` at a time; ManifestError if unreadable."""
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=rows_per_chunk):
            yield batch.to_pandas()
    except (OSError, pyarrow.ArrowException) as error:
        raise ManifestError(f"{path}: cannot be read as parquet: {error}", path=path) from error


def _sample_key(member: str) -> tuple[str, str]:
    """webdataset's ``(key, extension)``: the key is the member path up to its name's first dot."""
    directory, _, name = member.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def read_tar_shard(shard: Path) -> tuple[pd.DataFrame, list[str | None]]:
    """One tar shard's samples as rows ``key``, ``filepath`` (tar member reference), ``caption``,
    plus the sidecar's descriptive columns; and per row, a reading problem or None.

    Rows: the tar's samples in archive order, then the sidecar's samples that are not in the tar
    (failed downloads, or a shard cut short), each with the reason.  ManifestError if the tar
    cannot be read.
    """
    samples: dict[str, dict[str, str]] = {}
    try:
        with tarfile.open(shard) as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, extension = _sample_key(info.name)
                sample = samples.setdefault(key, {})
                if extension == "txt":
                    handle = archive.extractfile(info)
                    sample["caption"] = handle.read().decode("utf-8", errors="replace").strip() if handle else ""
                elif f".{extension}" in IMAGE_EXTENSIONS:
                    sample["member"] = info.name
    except (OSError, tarfile.TarError) as error:
        raise ManifestError(f"{shard}: cannot be read as a tar shard: {error}", path=shard) from error

    records: list[dict[str, str | None]] = []
    problems: list[str | None] = []
    for key, sample in samples.items():
        member = sample.get("member")
        records.append(
            {
                "key": key,
                "filepath": member_reference(shard, member) if member else None,
                "caption": sample.get("caption"),
            }
        )
        problems.append(None if member else "no image in the tar for this key")
    frame = pd.DataFrame.from_records(records, columns=["key", "filepath", "caption"])

    sidecar_file = shard.with_suffix(PARQUET_SUFFIX)
    if not sidecar_file.is_file():
        return frame, problems
    try:
        sidecar = pd.read_parquet(sidecar_file)
    except (OSError, pyarrow.ArrowException) as error:
        raise ManifestError(f"{sidecar_file}: cannot be read as parquet: {error}", path=sidecar_file) from error
    if "key" not in sidecar.columns:
        raise ManifestError(f"{sidecar_file}: img2dataset sidecar without a key column", path=sidecar_file)
    sidecar = sidecar.assign(key=sidecar["key"].astype(str)).drop_duplicates("key")
    extras = [column for column in sidecar.columns if column not in _SIDECAR_CONTROL_COLUMNS]
    frame = frame.merge(sidecar[["key", *extras]], on="key", how="left")

    missing = sidecar[~sidecar["key"].isin(samples)]
    if missing.empty:
        return frame, problems
    status = missing["status"] if "status" in missing.columns else pd.Series(SIDECAR_STATUS_OK, index=missing.index)
    error_message = missing.get("error_message", pd.Series(None, index=missing.index, dtype=object))
    for state, message in zip(status, error_message, strict=True):
        if state == SIDECAR_STATUS_OK:
            problems.append("listed as downloaded in the sidecar but not in the tar")
        else:
            problems.append(f"not downloaded by img2dataset ({state}: {message})")
    failed = missing[["key", *extras]].assign(filepath=None, caption=missing.get("caption"))
    return pd.concat([frame, failed[frame.columns]], ignore_index=True), problems
